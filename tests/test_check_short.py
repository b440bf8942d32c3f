"""`flipray check` on short clips: dense, padded windows for a 3-s video, the classical cues its JSON reports
(GCC-PHAT delay, level difference, capture guess, the side the picture moves on), and the decision on the result.

    .venv/bin/python -m pytest tests/test_check_short.py -x -q
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from flipray import check
from flipray.config import load_config
from flipray.cues import audio_cues, guess_capture, motion_side
from flipray.pretext.models import SpatialAlignmentNet
from flipray.synth import scenes as synth

SR = 16000


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def make_video(out: Path, capture: dict, azimuth: float, seconds: float = 3.0, swap: bool = False) -> Path:
    """A `seconds`-long H.264/AAC mp4: a white square bobbing up and down on the side of `azimuth`, heard from
    there by `capture` (noise bursts), 30 fps, 48 kHz AAC; `swap` swaps the channels."""
    fps, size = 30, 192
    n = round(seconds * fps)
    frames = np.full((n, size, size, 3), 40, np.uint8)
    x0 = size // 2 + int(np.sign(azimuth)) * size // 4 - 16
    for i in range(n):
        y0 = 40 + int(60 * abs(np.sin(i / 8)))
        frames[i, y0:y0 + 32, x0:x0 + 32] = 230
    mono = synth.source_signal("noise", round(seconds * SR), SR, np.random.default_rng(0))
    stereo = synth.render_capture(mono, azimuth, SR, capture)
    stereo = 0.5 * stereo / np.abs(stereo).max()
    wav = out.with_suffix(".wav")
    sf.write(wav, (stereo[::-1] if swap else stereo).T, SR)
    raw = out.with_suffix(".rgb")
    raw.write_bytes(frames.tobytes())
    _ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}", "-r", str(fps), "-i", str(raw),
            "-i", str(wav), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
            "-ar", "48000", "-b:a", "128k", "-shortest", str(out))
    raw.unlink()
    wav.unlink()
    return out


def test_a_short_clip_is_scored_on_dense_padded_windows():
    cfg = load_config("demo")
    # 3 s at 6 Hz: 18 grid frames = one 2.87-s window at the 1-s hop; dense: every frame, 0.5 s (3 frames) overhang
    assert check.window_starts(18, 3 * SR, cfg, 1.0) == [0]
    assert check.window_starts(18, 3 * SR, cfg, 1.0, min_windows=3, pad_s=0.5) == list(range(-3, 4))
    long = check.window_starts(60, 10 * SR, cfg, 1.0, min_windows=3, pad_s=0.5)
    assert long[0] == 0 and long[1] == 6  # a long video keeps the hop
    wave = torch.arange(1, 3 * SR + 1, dtype=torch.float32).repeat(2, 1)
    early = check.window_audio(wave, -3, cfg)  # starts 0.5 s before the video: 8000 samples of silence first
    assert early.shape == (2, cfg.window_samples) and (early[:, :8000] == 0).all()
    assert torch.equal(early[:, 8000:], wave[:, :cfg.window_samples - 8000])
    late = check.window_audio(wave, 3, cfg)
    assert torch.equal(late[:, :3 * SR - 8000], wave[:, 8000:]) and (late[:, 3 * SR - 8000:] == 0).all()
    assert check.window_frames(cfg, -3, 18) == [0, 0, 3, 6, 9, 12] and check.window_frames(cfg, 3, 18)[-1] == 17


@pytest.mark.parametrize("kind,capture", [("spaced", {"type": "spaced", "spacing_m": 0.4}),
                                          ("spaced", {"type": "spaced", "spacing_m": 0.2}),  # 0.33 ms at 35 deg
                                          ("phone", {"type": "phone", "spacing_m": 0.06}),   # 0.1 ms
                                          ("coincident", {"type": "coincident", "layout": "xy", "angle_deg": 45.0}),
                                          ("binaural", {"type": "binaural", "head_radius_m": 0.0875})])
def test_classical_cues_of_a_3s_video_and_of_its_swapped_copy(tmp_path, kind, capture):
    cfg = load_config("demo")
    opts = check.CheckOptions()
    media = check.open_media(make_video(tmp_path / "left.mp4", capture, -35.0), cfg, opts)
    swapped = check.open_media(make_video(tmp_path / "swapped.mp4", capture, -35.0, swap=True), cfg, opts)
    a, b = check.classical_cues(media, cfg), check.classical_cues(swapped, cfg)
    assert a["visual_side"] == b["visual_side"] == -1 and a["visual_motion_x"] < -0.3  # the square is on the left
    if kind == "coincident":
        assert abs(a["gcc_phat_delay_ms"]) < 0.04 and a["gcc_side"] == 0  # no time difference at all
    else:
        assert a["gcc_phat_delay_ms"] > 0.05 and a["gcc_side"] == -1  # the left hears it first
        assert b["gcc_phat_delay_ms"] == pytest.approx(-a["gcc_phat_delay_ms"], abs=0.02) and b["gcc_side"] == 1
    if kind in ("coincident", "binaural"):
        assert a["level_side"] == -1 and b["level_side"] == 1
    assert a["sides_agree"] is True and b["sides_agree"] is False
    assert a["capture_guess"] == kind


def test_capture_guess_rules():
    assert guess_capture(1.2, 0.9, 0.0, 0.0) == "spaced" and guess_capture(-0.2, 0.9, 1.0, 0.5) == "spaced"
    assert guess_capture(0.0, 0.9, -3.0, -3.5) == "coincident"
    assert guess_capture(0.3, 0.9, -1.0, -6.0) == "binaural" and guess_capture(-0.1, 0.9, 1.0, 4.0) == "binaural"
    assert guess_capture(0.08, 0.9, 0.0, 0.1) == "phone" and guess_capture(-0.14, 0.9, 2.0, 3.0) == "phone"
    assert guess_capture(0.5, 0.05, 0.0, 0.0) == "unknown"  # no coherent delay
    still = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    assert motion_side(still) == (None, 0)
    assert audio_cues(torch.zeros(2, SR))["gcc_side"] == 0


def test_a_3s_video_gets_a_verdict_from_its_windows_and_a_swapped_copy_the_opposite_one(tmp_path):
    """An untrained model (its answer is arbitrary, but exactly mirrored): seven windows are scored, every view of
    the swapped copy gives 1 - P, so the two videos get opposite verdicts or are both undecidable."""
    cfg = load_config("demo")
    torch.manual_seed(0)
    net = SpatialAlignmentNet(cfg).eval()
    capture = {"type": "spaced", "spacing_m": 0.3}
    a = check.check_file(make_video(tmp_path / "a.mp4", capture, 30.0), net, cfg)
    b = check.check_file(make_video(tmp_path / "b.mp4", capture, 30.0, swap=True), net, cfg)
    assert a.error is None and a.windows == b.windows == 7 and a.timeline[0][0] == pytest.approx(-0.5)
    for (_, p), (_, q) in zip(a.timeline, b.timeline):
        assert p + q == pytest.approx(1.0, abs=2e-3)  # AAC codes the two channels alike, up to its rounding
    flipped = {"swapped": "correct", "correct": "swapped", "undecidable": "undecidable"}
    assert b.verdict == flipped[a.verdict]
    assert a.cues["gcc_side"] == 1 and b.cues["gcc_side"] == -1 and a.cues["visual_side"] == 1


def test_check_scores_with_the_models_calibrated_temperature(tmp_path):
    """P(swapped) = sigmoid(logit / temperature): the same untrained model at an enormous temperature says 0.5."""
    cfg = load_config("demo")
    torch.manual_seed(0)
    net = SpatialAlignmentNet(cfg).eval()
    video = make_video(tmp_path / "a.mp4", {"type": "spaced", "spacing_m": 0.3}, 30.0)
    raw = check.check_file(video, net, cfg)
    net.temperature.fill_(1e6)
    flat = check.check_file(video, net, cfg)
    # an untrained model's P is near 0.5 (measured 3e-4 off with the default front end), 30x further than at T=1e6
    assert max(abs(p - 0.5) for _, p in raw.timeline) > 1e-4
    assert max(abs(p - 0.5) for _, p in flat.timeline) < 1e-5 and flat.verdict == "undecidable"
