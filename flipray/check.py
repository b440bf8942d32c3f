"""`flipray check`: do a video's stereo channels look swapped, and where? `flipray fix`: swap them back.

    flipray check my-video.mp4 other.mkv                     # newest registered flipray-pretext model (make demo)
    flipray check my-video.mp4 --model runs/demo/checkpoint.pt --plot timeline.png
    flipray check videos/*.mp4 --json --ray                  # a batch as Ray tasks on the running local cluster
    flipray fix my-video.mp4 --out fixed.mp4                 # video stream copied, audio channels swapped back

A 2.87-s window slides over the video every --hop seconds, seen exactly as training saw it (the same functions of
flipray.pretext.data); each window is scored as is, mirrored+swapped, swapped and mirrored, so a model's bias cancels.
The verdict (swapped | correct | undecidable) comes from the mean P(swapped) and how many windows agree; inputs that
cannot be checked get one line each and the batch goes on. Exit codes (`check`): 0 none swapped, 1 some swapped (as a
whole or in a stretch: an edit), 2 some unchecked (or a --plot not written) or a usage error (3: both), 4 no trained
model (also: not a flipray checkpoint, an MLflow server that does not answer, a --tracking-uri file that is not an
MLflow store); `fix`: 0 written, 2 bad input, 5 ffmpeg failed, and after a failure the input and --out are as before.
Details and the --json fields: docs/check.md; every bad input and fault: docs/reliability.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flipray.config import Config
from flipray.atomic import atomic_output
from flipray.media import FFmpegError, MediaError, ffmpeg, file_arg, probe as probe_file, require_stereo_video
from flipray.optional import require
from flipray.tracking import NoModelError, load_pretrained
from flipray.pretext.data import (FRAME_FITS, SampleParams, first_line, make_sample, resize_square,
                                  window_frame_indices)

DEFAULT_MODEL = "models:/flipray-pretext/latest"
EXIT_SWAPPED, EXIT_UNCHECKED, EXIT_NO_MODEL, EXIT_FFMPEG = 1, 2, 4, 5
FRAME_EPS_S = 1e-4  # the frame played at k/fps is the one whose pts is k/fps: step past float round-off
AUDIO_SLACK_S = 0.1  # audio a little shorter than the video (encoder padding, muxing): pad the last window


@dataclass
class CheckOptions:
    hop_s: float = 1.0              # window hop; a 2.87-s window at 1 s covers every moment about three times
    margin: float = 0.03            # mean calibrated P(swapped) must be this far from 0.5 for a verdict: the largest
                                    # margin leaving <= 5% of a tuning set's 3-s clips undecidable, measured on two
                                    # held-out sets (docs/stereo.md); > 0 so a model at chance (P ~ 0.5) never guesses
    min_agree: float = 0.6          # and at least this fraction of scored windows must be on its side of 0.5
    min_run: int = 3                # consecutive confident windows that make a segment (~5 s of video at a 1-s hop)
    run_margin: float = 0.1         # a window is confident for a segment at P beyond 0.5 -/+ this: stricter than the
                                    # verdict's margin, so a few noisy windows of a long video do not make an "edit"
    min_windows: int = 3            # a video with fewer windows at hop_s (a short clip) gets one at every grid frame,
    pad_s: float = 0.5              # and windows reaching up to pad_s beyond either end (edge frames, silent audio)
    silence_dbfs: float = -60.0     # windows with a lower RMS (both channels, before normalisation) are not scored
    dual_mono_db: float = -40.0     # side (L-R) this far below mid (L+R) over the whole file: dual mono
    frame_fit: str = "squash"       # how a wide video becomes the model's square frames: squash | pad | crop (its
                                    # centre square loses the sides: 0.75 right against 0.90 on 16:9 clips, docs/stereo.md)
    batch_size: int = 16            # windows per forward pass (each window is 4 inputs, the test-time VIEWS)
    device: str = "cpu"


@dataclass
class CheckResult:
    path: str
    verdict: str = "undecidable"   # correct | swapped | undecidable
    p_swapped: float | None = None
    windows: int = 0               # windows scored (silent ones are not)
    agree_fraction: float | None = None
    error: str | None = None       # why the input could not be checked
    reason: str | None = None      # short code (flipray.media.REASONS): missing empty not-a-video corrupt no-video ...
    silent_windows: int = 0
    duration_s: float | None = None
    window_s: float | None = None  # the model's window length
    swapped_segments: list = field(default_factory=list)  # [start_s, end_s] where min_run windows in a row say swapped
    cues: dict | None = None       # classical cues (flipray.cues): GCC-PHAT delay, level difference, capture guess,
                                   # the side the picture moves on, and whether audio and picture sides agree
    timeline: list = field(default_factory=list)  # [start_s, P(swapped) or None for a silent window]


class CheckError(MediaError):
    """An input that cannot be checked; `reason` is the short code in the JSON (flipray.media.REASONS, or "usage"),
    the message says why."""


# ---------------------------------------------------------------------------------------------------------------------
# The model

def load_check_model(spec: str | None = None, tracking: str | None = None):
    """(SpatialAlignmentNet in eval mode, Config) from a checkpoint path / run folder or a models:/ URI.

    Resolved by flipray.tracking.load_pretrained; a missing store or model, or a model trained for another pretext
    task, raises NoModelError with what to do about it.
    """
    spec = spec or DEFAULT_MODEL
    model, cfg = load_pretrained(spec, tracking)
    task, channels = getattr(cfg.train, "task", "flip"), getattr(cfg.data, "audio_channels", 2)
    if task != "flip" or channels != 2:
        raise NoModelError(f"{spec} was trained for the {task!r} pretext task on {channels}-channel audio; flipray "
                           f"check needs a stereo flip-task model (flipray-pretext, as `make demo` trains)")
    return model, cfg


# ---------------------------------------------------------------------------------------------------------------------
# Reading a video onto the model's grid

@dataclass
class Media:
    frames: torch.Tensor          # uint8 (K, resize, resize, 3): the grid frames the windows need, in `frame_pos` order
    frame_pos: dict[int, int]     # grid frame index -> row of `frames`
    wave: torch.Tensor            # float (2, S) at the model's sample rate, sample 0 = grid frame 0
    starts: list[int]             # window start frames on the grid (negative: a padded window of a short clip)
    duration_s: float
    grid_frames: int = 0          # frames on the grid: windows overhanging the end repeat the last one


def window_starts(grid_frames: int, audio_samples: int, cfg: Config, hop_s: float, min_windows: int = 1,
                  pad_s: float = 0.0) -> list[int]:
    """Start frames of the windows: every hop from 0, plus one ending at the end of the shorter stream. A video with
    fewer than `min_windows` such windows (a clip of a few seconds) gets a window at every grid frame instead, and
    windows overhanging either end by up to pad_s (negative starts; window_frames / window_audio pad them), so its
    verdict rests on several views of the evidence rather than one."""
    fps, sr = cfg.data.fps, cfg.data.sample_rate
    by_audio = math.floor((audio_samples + AUDIO_SLACK_S * sr - cfg.window_samples) / sr * fps)
    last = min(grid_frames - cfg.window_frames, by_audio)
    if last < 0:
        return []
    hop = max(1, round(hop_s * fps))
    starts = list(range(0, last + 1, hop))
    starts = starts if starts[-1] == last else starts + [last]
    if len(starts) < min_windows:
        pad = round(pad_s * fps)
        starts = list(range(-pad, last + pad + 1))
    return starts


def open_media(path: str | Path, cfg: Config, opts: CheckOptions) -> Media:
    """Decode what the windows need; raises CheckError for anything that cannot be checked."""
    path = str(path)
    info = require_stereo_video(probe_file(path), "check")  # missing, empty, not-a-video, no-video, no-audio, mono...
    try:  # every decode error, wherever it surfaces, is this file's, not the batch's
        return _decode(path, info.video_duration_s, cfg, opts)
    except (RuntimeError, ValueError, OSError) as e:  # torchcodec's words for what FFmpeg could not decode
        raise CheckError("corrupt", f"cannot decode it ({_why(e)}): damaged, or an incomplete download") from None


def _decode(path: str, header_s: float | None, cfg: Config, opts: CheckOptions) -> Media:
    from torchcodec.decoders import AudioDecoder, VideoDecoder
    vdec = VideoDecoder(path, dimension_order="NHWC", seek_mode="exact")  # exact: scans every packet
    adec = AudioDecoder(path, sample_rate=cfg.data.sample_rate)
    vm = vdec.metadata
    t0 = vm.begin_stream_seconds or 0.0
    end = vm.end_stream_seconds if vm.end_stream_seconds is not None else t0 + (vm.duration_seconds or 0.0)
    fps = cfg.data.fps
    grid = max(0, math.ceil((end - t0) * fps - 1e-6))  # frames k with t0 + k / fps < end
    if header_s and end - t0 < header_s - max(1.0, 0.05 * header_s):
        # the index (moov at the front: -movflags +faststart) promises more than the packets hold
        raise CheckError("corrupt", f"cut short: the file says {header_s:.1f} s of video, only {end - t0:.1f} s is "
                                    f"there (an incomplete download?)")
    samples = adec.get_all_samples()
    wave = samples.data.float()
    # sample 0 of `wave` plays at samples.pts_seconds; make it grid time 0 (= the first video frame)
    offset = round((t0 - samples.pts_seconds) * cfg.data.sample_rate)
    wave = wave[:, offset:] if offset >= 0 else torch.nn.functional.pad(wave, (-offset, 0))
    duration = min(end - t0, wave.shape[1] / cfg.data.sample_rate)
    starts = window_starts(grid, wave.shape[1], cfg, opts.hop_s, opts.min_windows, opts.pad_s)
    if not starts:
        raise CheckError("too-short", f"{duration:.2f} s of video with audio is shorter than one "
                                      f"{cfg.data.window_s:.2f}-s window")

    needed = sorted({i for s in starts for i in window_frames(cfg, s, grid)})
    chunks = []
    for j in range(0, len(needed), 64):  # resize as we go: a long 1080p video never sits in memory whole
        times = [t0 + k / fps + FRAME_EPS_S for k in needed[j:j + 64]]
        chunks.append(resize_square(vdec.get_frames_played_at(times).data, cfg.data.resize, opts.frame_fit))
    return Media(torch.cat(chunks), {k: r for r, k in enumerate(needed)}, wave, starts, duration, grid)


def _why(e: Exception) -> str:
    return first_line(e).strip().rstrip(".")


def _db(x: torch.Tensor) -> float:
    return 20 * math.log10(max(float(x), 1e-12))


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


# ---------------------------------------------------------------------------------------------------------------------
# Scoring

# Test-time views (joint_flip, swap) of a window: as is; mirrored with its channels swapped (the joint flip of
# training: alignment kept, same answer); channels swapped (the answer flips); mirrored only (= joint flip + swap:
# the answer flips). Averaging p, p, 1 - p, 1 - p cancels any bias of the model towards either answer and makes
# P(swapped) of a channel-swapped video exactly 1 - P(swapped) of the original.
VIEWS = ((False, False), (True, False), (False, True), (True, True))


@torch.no_grad()
def score_windows(model, cfg: Config, media: Media, starts: list[int], opts: CheckOptions) -> list[float]:
    """Calibrated P(swapped) of each window, averaged over the four test-time VIEWS. Frames and waveforms go to the
    model's device together; the model's front end turns the waveforms into features there."""
    margin = (cfg.data.resize - cfg.data.crop) // 2  # the evaluation crop: centre, no jitter
    device = next(model.parameters()).device
    temperature = float(getattr(model, "temperature", 1.0))  # fitted on the validation split (train.calibrate)
    out = []
    for b in range(0, len(starts), opts.batch_size):
        videos, audios = [], []
        for s in starts[b:b + opts.batch_size]:
            frames = media.frames[[media.frame_pos[i] for i in window_frames(cfg, s, media.grid_frames)]]
            wave = window_audio(media.wave, s, cfg)
            for joint_flip, swap in VIEWS:
                sample = make_sample(frames, wave, SampleParams(s, margin, margin, 1.0, 1.0, 1.0, joint_flip, swap),
                                     cfg)
                videos.append(sample["video"])
                audios.append(sample["audio"])
        logits = model(torch.stack(videos).to(device), torch.stack(audios).to(device)).float()
        p = torch.sigmoid(logits / temperature).cpu()
        p = p.view(-1, len(VIEWS))
        out += ((p[:, 0] + p[:, 1] + (1 - p[:, 2]) + (1 - p[:, 3])) / 4).tolist()
    return out


def window_frames(cfg: Config, start_frame: int, grid_frames: int) -> list[int]:
    """The window's grid frames; a padded window (before the start or past the end) repeats the edge frame."""
    return [min(max(i, 0), max(grid_frames - 1, 0)) for i in window_frame_indices(cfg, start_frame)]


def window_audio(wave: torch.Tensor, start_frame: int, cfg: Config) -> torch.Tensor:
    """The window's samples; silence where it overhangs the audio (a padded window, or audio a little short)."""
    s0 = round(start_frame / cfg.data.fps * cfg.data.sample_rate)
    before = max(-s0, 0)
    w = wave[:, max(s0, 0):s0 + cfg.window_samples]
    if before or w.shape[1] < cfg.window_samples:
        w = torch.nn.functional.pad(w, (before, cfg.window_samples - before - w.shape[1]))
    return w


def runs(timeline: list, opts: CheckOptions, swapped: bool, window_s: float, duration_s: float) -> list[list[float]]:
    """[start_s, end_s] of every run of at least opts.min_run consecutive windows that confidently say `swapped`
    (P >= 0.5 + run_margin) or, with swapped=False, correct (P <= 0.5 - run_margin); a silent window ends a run.

    A run spans its windows' centres, half a hop either side (a window half in, half out of a swapped stretch is
    the one that turns), and reaches the start or end of the video when its first or last window does.
    """
    found, run = [], []
    half_hop = (timeline[1][0] - timeline[0][0]) / 2 if len(timeline) > 1 else window_s / 2
    for i, (start, p) in enumerate(timeline + [[None, None]]):
        if p is not None and (p >= 0.5 + opts.run_margin if swapped else p <= 0.5 - opts.run_margin):
            run.append(i)
            continue
        if len(run) >= opts.min_run:
            a = 0.0 if run[0] == 0 else timeline[run[0]][0] + window_s / 2 - half_hop
            b = duration_s if run[-1] == len(timeline) - 1 else timeline[run[-1]][0] + window_s / 2 + half_hop
            found.append([round(a, 2), round(b, 2)])
        run = []
    return found


def decide(timeline: list, opts: CheckOptions, window_s: float, duration_s: float) -> tuple[str, float, float]:
    """(verdict, mean P(swapped), fraction of scored windows on the mean's side of 0.5) of a [start_s, P] timeline."""
    probs = [q for _, q in timeline if q is not None]
    p = sum(probs) / len(probs)
    agree = sum((q > 0.5) == (p > 0.5) for q in probs) / len(probs)
    if runs(timeline, opts, True, window_s, duration_s) and runs(timeline, opts, False, window_s, duration_s):
        return "undecidable", p, agree  # swapped in one stretch, correct in another: an edit, not one verdict
    if agree >= opts.min_agree and p >= 0.5 + opts.margin:
        return "swapped", p, agree
    if agree >= opts.min_agree and p <= 0.5 - opts.margin:
        return "correct", p, agree
    return "undecidable", p, agree


def check_file(path: str | Path, model, cfg: Config, opts: CheckOptions | None = None) -> CheckResult:
    """Check one video; never raises for a bad input (the result carries `error` and `reason` instead)."""
    opts = opts or CheckOptions()
    result = CheckResult(str(path))
    try:
        media = open_media(path, cfg, opts)
        result.duration_s, result.window_s = round(media.duration_s, 3), cfg.data.window_s
        loud = [_db(_rms(window_audio(media.wave, s, cfg))) >= opts.silence_dbfs for s in media.starts]
        if not any(loud):
            raise CheckError("silent", f"silent audio: every window is below {opts.silence_dbfs:.0f} dBFS")
        left, right = media.wave[0], media.wave[1]
        if _db(_rms(left - right)) - _db(_rms(left + right)) < opts.dual_mono_db:
            raise CheckError("dual-mono", "dual mono: both channels carry the same signal, so swapping them changes "
                                          "nothing")
        scored = [s for s, keep in zip(media.starts, loud) if keep]
        probs = iter(score_windows(model, cfg, media, scored, opts))
        result.timeline = [[round(s / cfg.data.fps, 3), round(next(probs), 4) if keep else None]
                           for s, keep in zip(media.starts, loud)]
        result.windows, result.silent_windows = len(scored), len(media.starts) - len(scored)
        result.verdict, p, agree = decide(result.timeline, opts, cfg.data.window_s, result.duration_s)
        result.swapped_segments = runs(result.timeline, opts, True, cfg.data.window_s, result.duration_s)
        result.p_swapped, result.agree_fraction = round(p, 4), round(agree, 4)
        result.cues = classical_cues(media, cfg)
    except MediaError as e:
        result.error, result.reason = str(e), e.reason
    return result


def classical_cues(media: Media, cfg: Config) -> dict:
    """flipray.cues on the whole video: audio cues, the side the picture moves on, and whether they agree (a
    disagreement suggests swapped channels, when the moving thing is the one that sounds)."""
    from flipray.cues import audio_cues, motion_side
    cues = audio_cues(media.wave, cfg.data.sample_rate)
    cues["visual_motion_x"], cues["visual_side"] = motion_side(media.frames)
    audio_side = cues["gcc_side"] or cues["level_side"]
    cues["sides_agree"] = None if not (audio_side and cues["visual_side"]) else audio_side == cues["visual_side"]
    return cues


def check_files(paths: list[str], model, cfg: Config, opts: CheckOptions | None = None, use_ray: bool = False,
                progress: bool = True) -> list[CheckResult]:
    """Check every path, in order. With use_ray, as Ray tasks on the cluster this process is (or can get) connected
    to; without one, in-process. Either way with a progress bar (tqdm, on stderr)."""
    from tqdm import tqdm
    opts = opts or CheckOptions()
    if use_ray and connect_ray():
        ray = require("ray")
        remote = ray.remote(num_cpus=1)(_check_task)
        model_ref = ray.put((model.cpu(), cfg))
        # workers run elsewhere (another folder, maybe another node: the files must be on a shared file system)
        refs = [remote.remote(os.path.abspath(p), model_ref, dataclasses.replace(opts, device="cpu")) for p in paths]
        order = {ref: i for i, ref in enumerate(refs)}
        results: list[CheckResult | None] = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), desc="checking (Ray)", unit="video", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = order[done[0]]
                results[i] = dataclasses.replace(ray.get(done[0]), path=str(paths[i]))
                bar.update(1)
        return results
    model = model.to(opts.device)
    results = []
    for p in tqdm(paths, desc="checking", unit="video", disable=not progress or len(paths) < 2):
        results.append(check_file(p, model, cfg, opts))
    return results


def _check_task(path: str, model_and_cfg, opts: CheckOptions) -> CheckResult:
    torch.set_num_threads(1)  # one task per CPU the task asked for
    model, cfg = model_and_cfg
    return check_file(path, model, cfg, opts)


def connect_ray() -> bool:
    """Connect to the running Ray cluster (RAY_ADDRESS, e.g. from `eval "$(python -m cluster.local env)"`, or the one
    `ray start` last started on this machine); False, after one line saying why, when there is none or it does not
    answer within a few seconds (ray.init would wait minutes)."""
    ray = require("ray")
    from flipray.raylocal import RayUnreachable, cluster_address, join
    if ray.is_initialized():
        return True
    address, source = cluster_address(recorded=True)
    if not address:
        print("flipray check: no Ray cluster is running (start one: `python -m cluster.local up --ray` and "
              "`eval \"$(python -m cluster.local env)\"`); checking in this process", file=sys.stderr)
        return False
    try:
        join(address, source, logging_level="warning", log_to_driver=False)
        return True
    except (RayUnreachable, ConnectionError) as e:
        print(f"flipray check: {_why(e)}; checking in this process", file=sys.stderr)
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Output

def describe(r: CheckResult) -> str:
    """The one line `flipray check` prints per video."""
    if r.error:
        return f"{r.path}: cannot check: {r.error}"
    agree = f"{round(r.agree_fraction * r.windows)}/{r.windows} windows agree"
    silent = f", {r.silent_windows} silent windows skipped" if r.silent_windows else ""
    what = {"swapped": "channels look SWAPPED", "correct": "channels look correct",
            "undecidable": "undecidable"}[r.verdict]
    where = ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in r.swapped_segments)
    part = f"; swapped in {where}" if where and r.verdict != "swapped" else ""
    return f"{r.path}: {what} (P(swapped) {r.p_swapped:.2f}, {agree}{silent}, {r.duration_s:.1f} s){part}"


def looks_swapped(r: CheckResult) -> bool:
    """Swapped as a whole, or in a stretch (an edit: its segments are in the output); what exit code 1 means."""
    return not r.error and (r.verdict == "swapped" or bool(r.swapped_segments))


def exit_code(results: list[CheckResult]) -> int:
    code = EXIT_SWAPPED if any(looks_swapped(r) for r in results) else 0
    return code | (EXIT_UNCHECKED if any(r.error for r in results) else 0)


def plot_timeline(r: CheckResult, out: str | Path, opts: CheckOptions | None = None, thumbs: int = 10,
                  thumb_h: int = 96):
    """PNG: a strip of frames over P(swapped) per window (at the window's centre, spanning its 2.87 s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchcodec.decoders import VideoDecoder
    opts = opts or CheckOptions()
    dec = VideoDecoder(r.path, dimension_order="NHWC")
    t0 = dec.metadata.begin_stream_seconds or 0.0
    dur = r.duration_s
    n = max(3, min(thumbs, math.ceil(dur / 1.5)))
    frames = dec.get_frames_played_at([t0 + (i + 0.5) * dur / n for i in range(n)]).data
    h, w = frames.shape[1:3]
    tw = max(1, round(thumb_h * w / h))
    small = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=(thumb_h, tw),
                                            mode="bilinear", antialias=True)
    strip = torch.cat(list(small.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)), dim=1).numpy()
    fig_w = 10.0
    strip_h = fig_w * 0.88 * strip.shape[0] / strip.shape[1]  # axes ~88% of the figure width: no distortion
    fig, (ax_img, ax) = plt.subplots(2, 1, figsize=(fig_w, strip_h + 3.0), sharex=True,
                                     gridspec_kw={"height_ratios": [strip_h, 3.0]})
    ax_img.imshow(strip, extent=[0, dur, 0, 1], aspect="auto")
    ax_img.set_yticks([])
    half = r.window_s / 2
    scored = [(s, p) for s, p in r.timeline if p is not None]
    centres = [s + half for s, _ in scored]
    ax.axhspan(0.5 + opts.margin, 1.0, color="tab:red", alpha=0.08, lw=0)
    ax.axhspan(0.0, 0.5 - opts.margin, color="tab:green", alpha=0.08, lw=0)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    for i, (a, b) in enumerate(r.swapped_segments):
        ax.axvspan(a, b, color="tab:red", alpha=0.12, lw=0, label="looks swapped" if i == 0 else None)
    ax.plot(centres, [p for _, p in scored], "o-", color="tab:blue", ms=4, label="P(swapped), window centre")
    silent = [s + half for s, p in r.timeline if p is None]
    if silent:
        ax.plot(silent, [0.5] * len(silent), "x", color="gray", label="silent window (not scored)")
    ax.set_xlim(0, dur)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("P(channels swapped)")
    ax.text(dur, 0.5 + opts.margin, " swapped", va="bottom", ha="right", color="tab:red", fontsize=8)
    ax.text(dur, 0.5 - opts.margin, " correct", va="top", ha="right", color="tab:green", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax_img.set_title(describe(dataclasses.replace(r, path=Path(r.path).name)), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# fix

# Audio codecs each container takes (ffmpeg's muxers); anything else is re-encoded to the container's usual codec.
CONTAINER_AUDIO = {".mp4": ({"aac", "mp3", "ac3", "eac3", "opus", "alac"}, "aac"),
                   ".m4v": ({"aac", "mp3", "ac3", "eac3", "alac"}, "aac"),
                   ".mov": ({"aac", "mp3", "ac3", "alac", "pcm_s16le", "pcm_s24le", "pcm_f32le"}, "aac"),
                   ".webm": ({"opus", "vorbis"}, "opus"),
                   ".mkv": (None, "opus")}  # Matroska takes any codec ffmpeg can encode
ENCODERS = {"aac": "aac", "mp3": "libmp3lame", "opus": "libopus", "vorbis": "libvorbis", "flac": "flac",
            "ac3": "ac3", "eac3": "eac3", "alac": "alac", "pcm_s16le": "pcm_s16le", "pcm_s24le": "pcm_s24le",
            "pcm_f32le": "pcm_f32le"}


def fix_command(src: str | Path, dst: str | Path, streams: list[dict]) -> list[str]:
    """ffmpeg arguments (for flipray.media.ffmpeg): every stream copied, the audio re-encoded with its left and right
    swapped."""
    codec = streams[0]["codec_name"]
    allowed, fallback = CONTAINER_AUDIO.get(Path(dst).suffix.lower(), (None, "aac"))
    if codec not in ENCODERS or (allowed is not None and codec not in allowed):
        codec = fallback
    args = ["-i", str(src), "-map", "0",
            "-c", "copy", "-c:v", "copy", "-af", "pan=stereo|c0=c1|c1=c0", "-c:a", ENCODERS[codec]]
    rate = streams[0].get("bit_rate")
    if codec in ("aac", "mp3", "opus", "vorbis", "ac3", "eac3"):  # lossy: keep the source's bit rate
        args += ["-b:a", str(rate) if rate and str(rate).isdigit() else "192k"]
    return args + [file_arg(dst)]


def fix_file(src: str | Path, dst: str | Path) -> None:
    """Write `dst`: `src` with its stereo channels swapped (picture and other streams copied bit for bit).

    `dst` appears complete or not at all (ffmpeg writes a temporary file beside it, renamed over `dst` when it
    succeeded): a failed run leaves the input and any earlier `dst` as they were."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckError("missing", "no such file")
    if dst.exists() and os.path.samefile(src, dst):  # also a hard link or symlink to the input
        raise CheckError("usage", f"--out {dst} is the input itself (the same file or a link to it); write the fixed "
                                  f"copy to a new file")
    if not dst.parent.is_dir():
        raise CheckError("usage", f"--out {dst}: no such folder {dst.parent}")
    if dst.is_dir():
        raise CheckError("usage", f"--out {dst} is a folder; give the fixed copy's file name, e.g. "
                                  f"{dst / (src.stem + '-fixed' + src.suffix)}")
    streams = probe_file(src).audio
    if not streams:
        raise CheckError("no-audio", "no audio stream: nothing to swap")
    for s in streams:
        if s.get("channels") == 1:
            raise CheckError("mono", f"mono audio (stream {s['index']}, 1 channel): there is no left and right to swap")
        if s.get("channels") != 2:
            raise CheckError("channels", f"audio stream {s['index']} has {s.get('channels')} channels; fix swaps "
                                         f"stereo (2 channels) only")
    try:
        with atomic_output(dst) as tmp:
            ffmpeg(fix_command(src, tmp, streams))
    except FFmpegError as e:
        if "Unable to find a suitable output format" in e.stderr:  # the extension names no container ffmpeg writes
            raise CheckError("usage", f"--out {dst}: ffmpeg writes no container with the extension "
                                      f"'{dst.suffix or '(none)'}'; name the copy like the input, e.g. "
                                      f"{dst.with_suffix(src.suffix)}") from None
        why = "; ".join(line.strip() for line in e.stderr.strip().splitlines()[-2:])[-400:]
        raise RuntimeError(f"ffmpeg failed on {src} (nothing written): {why}") from None
    except OSError as e:  # a full disk (media.ffmpeg); atomic_output has removed the partial copy
        raise RuntimeError(f"ffmpeg failed on {src} (nothing written): {e.strerror} writing {dst}") from None


def fix_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flipray fix", description="Write a copy of VIDEO with its left and right audio "
                                "channels swapped: video (and any other stream) copied as is, audio re-encoded in "
                                "the same codec where the container takes it. Exit codes: 0 written, 2 bad input or "
                                "usage, 5 ffmpeg failed.")
    p.add_argument("video")
    p.add_argument("--out", required=True, help="the fixed copy (a new file; its extension picks the container)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not args.force:
        print(f"flipray fix: {args.out} exists (pass --force to overwrite it)", file=sys.stderr)
        return EXIT_UNCHECKED
    try:
        fix_file(args.video, args.out)
    except MediaError as e:
        print(f"flipray fix: {args.video}: {e}", file=sys.stderr)
        return EXIT_UNCHECKED
    except RuntimeError as e:
        print(f"flipray fix: {e}", file=sys.stderr)
        return EXIT_FFMPEG
    print(f"wrote {args.out} (audio channels swapped, video stream copied)")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flipray check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", help="video files (mp4, mkv, mov, webm, ...; any size, frame and sample rate)")
    p.add_argument("--model", default=None, help=f"checkpoint.pt, run folder or models:/ URI (default {DEFAULT_MODEL}"
                                                   f" in the default tracking store)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ (default: MLFLOW_TRACKING_URI, "
                                                        "else .flipray/local/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per video")
    p.add_argument("--plot", default=None, help="timeline PNG; with several videos, OUT-<video name>.png each")
    p.add_argument("--ray", action="store_true", help="score the videos as Ray tasks on the running cluster")
    p.add_argument("--hop", type=float, default=CheckOptions.hop_s, help="seconds between window starts")
    p.add_argument("--margin", type=float, default=CheckOptions.margin)
    p.add_argument("--min-agree", type=float, default=CheckOptions.min_agree)
    p.add_argument("--min-run", type=int, default=CheckOptions.min_run)
    p.add_argument("--run-margin", type=float, default=CheckOptions.run_margin,
                   help="a swapped/correct stretch is --min-run windows beyond 0.5 -/+ this")
    p.add_argument("--min-windows", type=int, default=CheckOptions.min_windows,
                   help="videos with fewer windows at --hop are scored at every frame, padded 0.5 s at each end")
    p.add_argument("--silence-dbfs", type=float, default=CheckOptions.silence_dbfs)
    p.add_argument("--frame-fit", choices=FRAME_FITS, default=CheckOptions.frame_fit,
                   help="wide video: squash it to a square, pad it above and below, or crop its centre square "
                        "(loses the sides); tall video is always centre-cropped")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    if (args.hop <= 0 or not 0 <= args.margin < 0.5 or not 0 <= args.run_margin < 0.5 or not 0 <= args.min_agree <= 1
            or args.min_run < 1):
        p.error("--hop must be positive, --margin and --run-margin in [0, 0.5), --min-agree in [0, 1], --min-run at "
                "least 1")
    try:
        model, cfg = load_check_model(args.model, args.tracking_uri)
    except NoModelError as e:
        print(f"flipray check: {e}", file=sys.stderr)
        return EXIT_NO_MODEL
    from flipray.pretext.train import resolve_device
    opts = CheckOptions(hop_s=args.hop, margin=args.margin, min_agree=args.min_agree, min_run=args.min_run,
                        run_margin=args.run_margin, min_windows=args.min_windows,
                        silence_dbfs=args.silence_dbfs, frame_fit=args.frame_fit, device=str(resolve_device(args.device)))
    results = check_files(args.videos, model, cfg, opts, use_ray=args.ray)
    if args.json:
        # one object per line: readable, and still one JSON document
        print("[\n" + ",\n".join(json.dumps(dataclasses.asdict(r)) for r in results) + "\n]")
    else:
        for r in results:
            print(describe(r))
    code = exit_code(results)
    for r, out in plot_paths(args.plot, results):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(out) as tmp:
                plot_timeline(r, tmp, opts)
            print(f"timeline: {out}", file=sys.stderr)
        except (OSError, RuntimeError, ValueError) as e:  # a plot that cannot be written is this video's, not the run's
            print(f"flipray check: {r.path}: cannot write the timeline {out}: {_why(e)}", file=sys.stderr)
            code |= EXIT_UNCHECKED
    return code


def plot_paths(plot: str | None, results: list[CheckResult]) -> list[tuple[CheckResult, Path]]:
    """(result, PNG path) of each checked video: `plot` itself for one input, else PLOT-<video stem>.png each, with
    -2, -3, ... where two inputs share a stem (a/x.mp4, b/x.mp4), so no plot overwrites another."""
    if not plot:
        return []
    base = Path(plot)
    suffix = base.suffix or ".png"
    if len(results) == 1:
        return [] if results[0].error else [(results[0], base.with_suffix(suffix))]
    out, taken = [], set()
    for r in results:
        stem, n = Path(r.path).stem, 1
        name = f"{base.stem}-{stem}{suffix}"
        while name in taken:
            n += 1
            name = f"{base.stem}-{stem}-{n}{suffix}"
        taken.add(name)
        if not r.error:
            out.append((r, base.with_name(name)))
    return out


if __name__ == "__main__":
    sys.exit(main())
