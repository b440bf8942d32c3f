"""Ingest real videos into the clip store, as a Ray job: 10-s clips, VP9 256x256 6 fps + FLAC 16 kHz stereo + sidecar.

    flipray ingest --videos ~/my-videos --out s3://bucket/my-videos/                   # a folder of your videos
    flipray ingest --csv yt-asmr.csv --videos data/yt-asmr --out s3://bucket/asmr/     # YouTube-ASMR URL list
    flipray ingest --dataset data/synth --out s3://bucket/synth/                       # a clip-format dataset
    python -m jobs.ingest --videos ~/my-videos --out data/my-videos                      # a local folder works too

On a cluster: `ray job submit --working-dir . -- python -m jobs.ingest --videos s3://bucket/raw/ --out s3://...`
(an s3:// prefix, each task fetching its source, flipray/dataset/sources.py; or a folder every node reads, e.g. a
shared file system; the store should then be S3). Without RAY_ADDRESS or --address a local Ray instance is started
with --num-cpus workers (on 127.0.0.1). Exit codes: 0 the manifest was written (merged with the one already in --out:
earlier clips stay); 1 no clip could be made; 2 a bad argument: a missing folder or CSV, a CSV without its header, a
manifest row that is malformed, or a Ray address that does not answer (one line saying which).

What happens: every source is probed with ffprobe (in Ray tasks); files with no video, no audio, mono or more than
two audio channels, unreadable or shorter than one clip are skipped with that reason. Each remaining source gives
floor(duration / clip length) clips, each a Ray task (one CPU): ffmpeg cuts the clip, makes the frames square
(--frame-fit: a wide picture squashed whole by default, as `flipray check` sees it, or its centre square cropped,
which loses the sides; a tall picture is cropped to its centre square either way), scales them to --size, resamples
to --fps with a keyframe every second (VP9, no audio) and writes the audio as 16 kHz 16-bit stereo FLAC (channel 0 =
left); the clip is checked (frame and sample counts) and uploaded through `flipray.dataset.store.upload_clip`, the
same path `flipray synth` output takes with --dataset. The manifest (splits by source video, checksums) is written
last, so an interrupted run leaves no dataset behind; re-running the same command skips every clip whose sidecar is
already stored with the same settings (sidecars go up after their video and audio), so it resumes where it stopped
without duplicates. The run ends with the count of clips ingested / already there / skipped, and why.

YouTube-ASMR: the CSV has a header row, `#` comments and columns `ytid, ts_start, ts_end` (seconds). Download each
segment yourself (it is your business which videos you may download), named `<ytid>_<start ms>_<end ms>.<ext>`:
    yt-dlp -f "bv*[height<=480]+ba/b[height<=480]" --download-sections "*12.5-72.5" \\
        -o "data/yt-asmr/abcdefghijk_12500_72500.%(ext)s" "https://www.youtube.com/watch?v=abcdefghijk"
A file that holds the whole video (it lasts at least until ts_end) is cut at [ts_start, ts_end]; a shorter file is
taken to be the downloaded segment itself. Rows whose file is missing are counted as "not downloaded".
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flipray import media, raylocal
from flipray.dataset.manifest import assign_splits
from flipray.optional import require
from flipray.dataset.store import Store, is_s3, upload_clip, upload_dataset

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".mov", ".m4v", ".avi"}
EXIT_NO_CLIPS, EXIT_BAD_INPUT = 1, 2  # 0: manifest written
INGEST_FRAME_FITS = ("squash", "crop")  # flipray.pretext.data.FRAME_FITS without "pad" (per-frame mean-colour bars)
CLIP_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
CONVENTIONS = ("azimuth deg, positive = listener's right, 0 = straight ahead; audio channel 0 = left; "
               "boxes [x0, y0, x1, y1] in pixels")


@dataclass
class Options:
    size: int = 256            # square frame side
    frame_fit: str = "squash"  # a wide picture: "squash" it whole (keeps objects at the sides, where the sound says
                               # they are; what `flipray check` does) | "crop" its centre square (loses the sides;
                               # ingest's only fit until squash came)
    fps: int = 6               # stored frame rate (the paper's 6 Hz)
    clip_s: float = 10.0       # clip length
    sample_rate: int = 16000
    max_clips_per_source: int = 0  # 0 = as many as fit
    timeout_s: int = 600       # per ffmpeg call

    def __post_init__(self):
        if self.frame_fit not in INGEST_FRAME_FITS:
            raise ValueError(f"frame fit must be one of {', '.join(INGEST_FRAME_FITS)}, got {self.frame_fit!r}")


@dataclass
class Source:
    path: str                  # the file
    name: str                  # how reports name it (relative path)
    scene_id: str              # splits are per scene: a source video (a YouTube id for the ASMR list)
    offset_s: float = 0.0      # where the usable part starts in the file
    length_s: float | None = None  # how long it is (None = to the end)
    extra: dict = field(default_factory=dict)  # provenance for the sidecar (ytid, ts_start, ts_end)


@dataclass
class ClipJob:
    clip_id: str
    source: Source
    start_s: float             # in the file
    index: int                 # clip number within the source
    picture_aspect: float = 1.0  # width over height, as displayed, of what the square frames show (the sidecar's)


class Skip(Exception):
    """A source or clip that is left out; `reason` is the category counted in the report, `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------------------------------
# Sources

def folder_sources(folder: str | os.PathLike) -> list[Source]:
    """Every video file under `folder` (by extension), with a scene id made from its name. `folder` may be an s3://
    prefix: the tasks then fetch their source themselves (flipray.dataset.sources)."""
    from flipray.dataset import sources as remote  # remote sources: listing and fetching live there
    if remote.is_remote(folder):
        found = remote.list_videos(str(folder), VIDEO_EXTS)
        paths, names = [p for p, _ in found], [n for _, n in found]
    else:
        folder = Path(folder)
        if folder.is_file():  # one video named directly
            if folder.suffix.lower() not in VIDEO_EXTS:
                raise ValueError(f"{folder}: not a folder, nor a video by its extension "
                                 f"({', '.join(sorted(VIDEO_EXTS))})")
            paths, names = [folder], [folder.name]
        elif not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        else:
            paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
            names = [p.relative_to(folder).as_posix() for p in paths]
    stems = collections.Counter(_clean(Path(n).with_suffix("").as_posix()) for n in names)
    sources = []
    for path, name in zip(paths, names):
        stem = Path(name).with_suffix("").as_posix()
        scene = _clean(stem)
        if scene != stem or stems[scene] > 1:  # renamed or shared (a.mp4 + a.mkv): a hash keeps the id unique
            scene = f"{scene}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        sources.append(Source(str(path), name, scene))
    return sources


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "video"


def csv_sources(csv_path: str | os.PathLike, folder: str | os.PathLike) -> tuple[list[Source], list[dict]]:
    """Sources of a YouTube-ASMR list (header row, `#` comments, ytid, ts_start, ts_end) found in `folder`.

    Returns (sources, skipped) where skipped rows carry the reason: a malformed row or a file not downloaded.
    """
    if str(folder).startswith("s3://"):
        raise ValueError(f"--csv reads the downloaded videos from a local folder, not {folder}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (where the list's videos were downloaded)")
    if not Path(csv_path).is_file():
        raise FileNotFoundError(f"{csv_path}: no such file")
    by_stem = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
            by_stem.setdefault(p.stem, p)
    try:  # utf-8-sig: spreadsheet programs start a saved CSV with a byte-order mark
        text = Path(csv_path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{csv_path}: no header row (expected ytid, ts_start, ts_end)")
    reader = csv.reader([line for _, line in lines], skipinitialspace=True)
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in ("ytid", "ts_start", "ts_end") if c not in header]
    if missing:
        raise ValueError(f"{csv_path}:{lines[0][0]}: header lacks columns {missing} (has {header})")
    col = {c: header.index(c) for c in ("ytid", "ts_start", "ts_end")}
    sources, skipped = [], []
    for (lineno, _), row in zip(lines[1:], reader):
        where = f"{Path(csv_path).name}:{lineno}"
        try:
            ytid = row[col["ytid"]].strip()
            t0, t1 = float(row[col["ts_start"]]), float(row[col["ts_end"]])
        except (IndexError, ValueError):
            skipped.append({"source": where, "reason": "bad CSV row", "detail": ",".join(row)})
            continue
        if not CLIP_ID_RE.match(ytid) or not (math.isfinite(t0) and math.isfinite(t1) and 0 <= t0 < t1):
            skipped.append({"source": where, "reason": "bad CSV row", "detail": f"ytid {ytid!r}, {t0}-{t1} s"})
            continue
        stem = f"{ytid}_{round(t0 * 1000)}_{round(t1 * 1000)}"
        if stem not in by_stem:
            skipped.append({"source": stem, "reason": "not downloaded", "detail": f"no {stem}.* in {folder}"})
            continue
        path = by_stem[stem]
        sources.append(Source(str(path), path.relative_to(folder).as_posix(), ytid, t0, t1 - t0,
                              {"ytid": ytid, "ts_start": t0, "ts_end": t1}))
    return sources, skipped


# ---------------------------------------------------------------------------------------------------------------------
# Probing and transcoding (plain functions; the Ray tasks below wrap them)

def probe(path: str, timeout: int = 60) -> dict:
    """{'duration': s, 'channels': 2, 'size': (w, h) as decoded, 'pixel_aspect': a pixel's w / h} of a source; Skip
    with the reason it cannot be used (the words of flipray.media's vocabulary, as `flipray check` uses it)."""
    try:
        info = media.require_stereo_video(media.probe(path, timeout), "learn from")
    except media.MediaError as e:
        raise Skip(media.LABELS[e.reason], str(e)) from None
    if info.duration_s is None:
        raise Skip("zero length", "no duration")
    return {"duration": info.duration_s, "channels": 2, "size": info.video_size, "pixel_aspect": info.pixel_aspect}


def picture_aspect(size: tuple[int, int] | None, pixel_aspect: float, frame_fit: str) -> float:
    """Width over height, as displayed, of the part of a source's picture that transcode's square frames show: a
    16:9 source squashed whole shows 1.778 in a square, its centre square cropped 1.0. Stored in the sidecar, so that
    whatever looks at the frames (the localization task's face detector) can stretch them back first."""
    if not size:
        return 1.0
    w, h = size
    crop_w, crop_h = (min(w, h), min(w, h)) if frame_fit == "crop" else (w, min(w, h))
    return round(crop_w * pixel_aspect / crop_h, 4)


def plan(source: Source, opts: Options) -> list[ClipJob]:
    """The clips of one source: probe it, then cut floor(usable length / clip length) clips."""
    info = probe(source.path)
    offset, length = source.offset_s, source.length_s
    if source.extra and info["duration"] < source.extra["ts_end"] - 0.5:
        offset = 0.0  # the file is the downloaded segment itself, not the whole video
    usable = info["duration"] - offset if length is None else min(length, info["duration"] - offset)
    n = int(usable // opts.clip_s + 1e-6)
    if opts.max_clips_per_source:
        n = min(n, opts.max_clips_per_source)
    if n < 1:
        raise Skip("too short", f"{usable:.2f} s usable, a clip is {opts.clip_s:g} s")
    jobs = []
    for k in range(n):
        start = offset + k * opts.clip_s
        # YouTube-ASMR clips are named by their time in the original video, so overlapping rows share clips
        t_id = source.extra.get("ts_start", 0.0) + k * opts.clip_s if source.extra else start
        jobs.append(ClipJob(f"{source.scene_id}_{round(t_id * 1000):07d}", source, start, k,
                            picture_aspect(info["size"], info["pixel_aspect"], opts.frame_fit)))
    return jobs


def transcode(job: ClipJob, out_dir: Path, opts: Options) -> tuple[Path, Path, int, int]:
    """Cut one clip into out_dir/<id>.webm + .flac with one ffmpeg run; returns (webm, flac, frames, samples)."""
    webm, flac = out_dir / f"{job.clip_id}.webm", out_dir / f"{job.clip_id}.flac"
    frames = round(opts.clip_s * opts.fps)
    # ffmpeg's crop centres by default; "squash" crops only a tall picture's height (flipray.pretext.data.resize_square)
    square = "crop='min(iw,ih)':'min(iw,ih)'" if opts.frame_fit == "crop" else "crop=iw:'min(iw,ih)'"
    vf = f"fps={opts.fps},{square},scale={opts.size}:{opts.size}:flags=area,setsar=1"
    try:
        media.ffmpeg(["-ss", f"{job.start_s:.3f}", "-t", f"{opts.clip_s:.3f}", "-i", job.source.path,
                      "-map", "0:v:0", "-an", "-sn", "-dn", "-vf", vf, "-frames:v", str(frames),
                      *media.vp9_args(opts.fps), str(webm),
                      "-map", "0:a:0", "-vn", "-sn", "-dn", *media.flac_args(opts.sample_rate), str(flac)],
                     timeout=opts.timeout_s)
    except media.FFmpegError as e:
        raise Skip("transcode failed", e.stderr[-300:]) from None
    # real lengths, by decoding: a FLAC with no samples claims 2^63-1 frames in its header
    n_frames = media.video_frames(webm) if webm.exists() else 0
    n_samples = media.audio_samples(flac) if flac.exists() else 0
    if n_frames == 0 or n_samples == 0:
        raise Skip("zero length", f"clip at {job.start_s:.1f} s decoded to {n_frames} frames, {n_samples} samples")
    if n_frames < 0.95 * frames or n_samples < 0.95 * opts.clip_s * opts.sample_rate:
        raise Skip("incomplete clip", f"clip at {job.start_s:.1f} s has {n_frames}/{frames} frames and "
                                      f"{n_samples / opts.sample_rate:.2f}/{opts.clip_s:g} s of audio")
    return webm, flac, n_frames, n_samples


def row_from_sidecar(sidecar: dict) -> dict:
    """The manifest row (without split) a stored sidecar describes: lets a re-run skip clips already uploaded."""
    cid = sidecar["clip_id"]
    return {"clip_id": cid, "scene_id": sidecar["scene_id"], "duration_s": sidecar["duration_s"],
            "fps": sidecar["fps"], "num_frames": sidecar["num_frames"], "sample_rate": sidecar["sample_rate"],
            "channels": sidecar["channels"], "video": f"clips/{cid}.webm", "audio": f"clips/{cid}.flac",
            "meta": f"clips/{cid}.json", "source": sidecar["source"],
            "video_sha256": sidecar["video_sha256"], "audio_sha256": sidecar["audio_sha256"]}


def ingest_clip(job: ClipJob, store: Store, opts: Options) -> dict:
    """Make and upload one clip unless it is already stored; {"status": "ingested"|"exists"|"skipped", ...}."""
    try:  # sidecars go up last: a stored sidecar means a complete clip
        sidecar = json.loads(store.get(f"clips/{job.clip_id}.json"))
        settings = (sidecar.get("width"), sidecar.get("fps"), sidecar.get("sample_rate"),
                    sidecar.get("frame_fit", "crop"))  # sidecars without it are from before squash, all cropped
        if settings == (opts.size, opts.fps, opts.sample_rate, opts.frame_fit) and "video_sha256" in sidecar:
            return {"status": "exists", "row": row_from_sidecar(sidecar)}
    except (FileNotFoundError, ValueError, KeyError):
        pass  # not there yet, unreadable, or made with other settings: make the clip (again)
    try:
        with tempfile.TemporaryDirectory(prefix="flipray-ingest-") as tmp:
            clips = Path(tmp) / "clips"
            clips.mkdir()
            _, flac, n_frames, n_samples = transcode(job, clips, opts)
            duration = round(min(opts.clip_s, n_samples / opts.sample_rate), 3)
            sidecar = {
                "clip_id": job.clip_id, "scene_id": job.source.scene_id, "source": f"ingest:{job.source.name}",
                "duration_s": duration, "fps": opts.fps, "num_frames": n_frames, "width": opts.size,
                "height": opts.size, "frame_fit": opts.frame_fit, "picture_aspect": job.picture_aspect,
                "sample_rate": opts.sample_rate, "channels": 2,
                "conventions": CONVENTIONS,
                "camera": {"hfov_deg": None}, "objects": [],
                "ingest": {"file": job.source.name, "start_s": round(job.start_s, 3), "clip": job.index,
                           **job.source.extra}}
            (clips / f"{job.clip_id}.json").write_text(json.dumps(sidecar))
            row = {k: sidecar[k] for k in ("clip_id", "scene_id", "duration_s", "fps", "num_frames",
                                           "sample_rate", "channels")}
            row.update(video=f"clips/{job.clip_id}.webm", audio=f"clips/{job.clip_id}.flac",
                       meta=f"clips/{job.clip_id}.json")
            row, _ = upload_clip(store, tmp, row)
        return {"status": "ingested", "row": row}
    except Skip as e:
        return {"status": "skipped", "reason": e.reason, "detail": e.detail}
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": "transcode timed out", "detail": f"over {opts.timeout_s} s"}


def plan_task(source: Source, opts: Options) -> dict:
    try:
        source = _on_this_node(source)
        return {"status": "ok", "jobs": plan(source, opts)}
    except Skip as e:
        return {"status": "skipped", "reason": e.reason, "detail": e.detail}
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": "unreadable", "detail": "ffprobe timed out"}


def clip_task(job: ClipJob, store: Store, opts: Options) -> dict:
    return ingest_clip(dataclasses.replace(job, source=_on_this_node(job.source)), store, opts)


def _on_this_node(source: Source) -> Source:
    """The source with a path this node can open: an s3:// object is fetched into the node's cache (sources.py)."""
    from flipray.dataset import sources as remote
    return dataclasses.replace(source, path=remote.localize(source.path))


def _fan_out(func, items: list, args: tuple, desc: str, progress: bool):
    """Run `func(item, *args)` as a Ray task (1 CPU: ffmpeg runs one thread) for every item, a bounded number in
    flight; yield (item, result)."""
    ray = require("ray")
    from tqdm import tqdm
    task = ray.remote(num_cpus=1)(func)
    limit = max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))  # keep the queue short, results streaming
    pending, todo = {}, iter(items)
    with tqdm(total=len(items), desc=desc, unit=desc.split()[-1], disable=not progress, file=sys.stderr) as bar:
        while True:
            while len(pending) < limit:
                item = next(todo, None)
                if item is None:
                    break
                pending[task.remote(item, *args)] = item
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as e:  # the task raised, or its worker died (OOM, node lost) after retries
                cause = getattr(e, "cause", None)  # what the task raised; Ray's own first line names only the task
                detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
                result = {"status": "skipped", "reason": "task failed",
                          "detail": (detail.strip().splitlines() or [""])[0][:300]}
            bar.update()
            yield item, result


# ---------------------------------------------------------------------------------------------------------------------
# The job

def run_ingest(out: str, videos: str | None = None, csv_path: str | None = None, dataset: str | None = None,
               opts: Options | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Ingest into `out` (s3://bucket/prefix or a folder); returns the report (also printed by main).

    Uses the Ray cluster this process is connected to (ray.init() first, or let main() do it).
    """
    opts = opts or Options()
    store = Store(out)
    if dataset:  # an existing clip-format dataset (e.g. flipray synth): the same per-clip upload, threads suffice
        res = upload_dataset(dataset, store, progress=progress)
        rows = store.read_manifest()
        return {"mode": "dataset", "clips_ingested": res["clips_sent"], "objects_sent": res["sent"],
                "clips_existing": res["clips"] - res["clips_sent"],
                "clips_skipped": {}, "sources": 0, "sources_skipped": {}, "skipped": [], "manifest": res["manifest"],
                "splits": dict(collections.Counter(r["split"] for r in rows))}
    if not videos:
        raise ValueError("give --videos (a folder; with --csv, where the list's videos were downloaded) or --dataset")
    if csv_path and videos.startswith("s3://"):
        raise ValueError(f"--csv reads the downloaded videos from a local folder, not {videos}")
    if csv_path:
        sources, skipped = csv_sources(csv_path, videos)
    else:
        sources, skipped = folder_sources(videos), []
    ray = require("ray")
    if not ray.is_initialized():
        raise RuntimeError("run_ingest needs Ray: call ray.init() first")
    n_sources = len(sources) + len(skipped)  # CSV rows that are malformed or not downloaded count as sources

    log.info("%d sources (%d skipped before probing) -> %s", len(sources), len(skipped), store.root)
    jobs = []
    for source, res in _fan_out(plan_task, sources, (opts,), "probe sources", progress):
        if res["status"] == "ok":
            jobs.extend(res["jobs"])
        else:
            skipped.append({"source": source.name, "reason": res["reason"], "detail": res["detail"]})
    unique = {}
    for job in jobs:  # overlapping YouTube-ASMR rows name the same clip: make it once
        unique.setdefault(job.clip_id, job)

    rows, counts, clip_skips = [], collections.Counter(), []
    for job, res in _fan_out(clip_task, list(unique.values()), (store, opts), "ingest clips", progress):
        counts[res["status"]] += 1
        if res["status"] == "skipped":
            clip_skips.append({"source": job.source.name, "clip_id": job.clip_id, "reason": res["reason"],
                               "detail": res["detail"]})
        else:
            rows.append(res["row"])

    report = {"mode": "csv" if csv_path else "videos", "sources": n_sources,
              "sources_skipped": dict(collections.Counter(s["reason"] for s in skipped)),
              "clips_ingested": counts["ingested"], "clips_existing": counts["exists"],
              "clips_skipped": dict(collections.Counter(s["reason"] for s in clip_skips)),
              "skipped": skipped + clip_skips, "manifest": None, "splits": {}}
    if rows:
        rows.sort(key=lambda r: r["clip_id"])
        splits = assign_splits([r["scene_id"] for r in rows], seed=seed)
        for row in rows:
            row["split"] = splits[row["scene_id"]]
        # last: only now is the dataset readable. Merged: clips of earlier runs into this --out stay listed, even
        # when their sources are not given (or not readable) this time; a scene keeps the split it had.
        report["manifest"] = store.write_manifest(rows, merge=True)
        report["splits"] = dict(collections.Counter(r["split"] for r in store.read_manifest()))
    return report


def print_report(report: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"clips ingested: {report['clips_ingested']}, already in the store: {report['clips_existing']}, "
          f"skipped: {sum(report['clips_skipped'].values())}", file=file)
    if report["sources_skipped"]:
        print(f"sources skipped ({sum(report['sources_skipped'].values())} of {report['sources']}): " +
              ", ".join(f"{r} {n}" for r, n in sorted(report["sources_skipped"].items())), file=file)
    for s in report["skipped"]:
        print(f"  skipped {s['source']}{' clip ' + s['clip_id'] if 'clip_id' in s else ''}: {s['reason']}"
              f"{' (' + s['detail'] + ')' if s['detail'] else ''}", file=file)
    print(f"manifest: {report['manifest'] or 'not written (no clips)'} {report['splits'] or ''}", file=file)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"}, sort_keys=True), file=file)


def main(argv: list[str] | None = None) -> int:
    defaults = Options()
    p = argparse.ArgumentParser(prog="flipray ingest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root: s3://bucket/prefix (AWS_* environment) or a folder")
    p.add_argument("--videos", help="folder of videos, one video file, or an s3:// prefix (with --csv: the local "
                                    "folder where the list's videos were downloaded)")
    p.add_argument("--csv", help="YouTube-ASMR list: header, # comments, ytid, ts_start, ts_end")
    p.add_argument("--dataset", help="upload an existing clip-format dataset (e.g. `flipray synth` output) instead")
    p.add_argument("--size", type=int, default=defaults.size, help="square frame side")
    p.add_argument("--frame-fit", choices=INGEST_FRAME_FITS, default=defaults.frame_fit,
                   help="wide video: squash it whole to a square (as flipray check does) or crop its centre square "
                        "(loses the sides); tall video is always centre-cropped")
    p.add_argument("--fps", type=int, default=defaults.fps)
    p.add_argument("--clip-seconds", type=float, default=defaults.clip_s)
    p.add_argument("--max-clips-per-video", type=int, default=0, help="0 = every clip that fits")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test assignment")
    p.add_argument("--address", default=None, help="Ray cluster address; unset: RAY_ADDRESS, else a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance; unset: all")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.videos, args.dataset)) != 1:
        p.error("give exactly one of --videos (optionally with --csv) and --dataset")
    if args.size % 2:
        p.error("--size must be even (yuv420p)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = Options(size=args.size, frame_fit=args.frame_fit, fps=args.fps, clip_s=args.clip_seconds,
                   max_clips_per_source=args.max_clips_per_video)
    start = time.time()
    try:  # bad sources and stores are reported in one line before any Ray instance starts
        # S3 that does not answer, a missing bucket, no access: one line here, not every clip failing later
        for option, root in (("--videos", args.videos), ("--out", args.out)):
            if root and is_s3(root):
                Store(root).check_reachable(option)
        if args.videos:
            (csv_sources(args.csv, args.videos) if args.csv else folder_sources(args.videos))
        if not is_s3(args.out) and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: a file, not a folder or an s3:// prefix")
        if not args.dataset:
            ray = require("ray")
            if not ray.is_initialized():
                raylocal.init(args.address, args.num_cpus, logging_level=logging.WARNING)
        report = run_ingest(args.out, videos=args.videos, csv_path=args.csv, dataset=args.dataset, opts=opts,
                            seed=args.seed)
    except (FileNotFoundError, ValueError, raylocal.RayUnreachable) as e:
        print(f"flipray ingest: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_report(report)
    print(f"done in {time.time() - start:.1f} s", file=sys.stderr)
    return 0 if report["manifest"] else EXIT_NO_CLIPS


if __name__ == "__main__":
    sys.exit(main())
