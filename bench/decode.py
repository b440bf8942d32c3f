"""Decode benchmark: training samples per second from the same clips through DALI (CPU), torchcodec, and ffmpeg.

    python -m bench.decode                                   # 16 synthetic 10-s clips, paper preset, 2 threads
    python -m bench.decode --root s3://bucket/ds --clips 64 --threads 8 --config small
    python -m bench.decode --gpu                             # also DALI's mixed backend (NVDEC), on a GPU node

Prints one JSON object. Every figure is clips (= training samples) per second over the same clips and the same
windows (`draw_params` of epoch 1, after a warm-up epoch 0 that builds pipelines, starts workers and fills caches):
  dali_cpu      DaliClipLoader(device="cpu", num_threads=T): decode the window, augment, log-mel -> batch dict
  torchcodec    ClipDataset in a DataLoader with T worker processes: the same work, the same dict
  ffmpeg_null   `ffmpeg -threads 1 -ss <window start> -t <window> -i clip.webm -pix_fmt rgb24 -f null -` plus the
                same for the FLAC, T processes at a time: decode and colour conversion only, no augmentation or
                features, wall clock with process start-up.
  ffmpeg_decode_only  the floor: the same ffmpeg runs, counting only ffmpeg's own -benchmark real time
                (ffmpeg_video_only / ffmpeg_audio_only: the VP9 and the FLAC part alone).
The ratios divide each loader's rate by the floor's, measured in the same run: the share of raw decode speed a loader
keeps after its augmentation, features and batching (1.0 would be decode-bound with no overhead).
This is a benchmark, not a test: numbers depend on the machine; run it where you train.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import machine, synthetic_data
from flipray.config import load_config
from flipray.pretext.data import ClipDataset, EpochSampler, collate, draw_params
from flipray.dataset.store import Store, is_s3, upload_dataset


def bench_dali(cfg, root: str, split: str, batch_size: int, threads: int, device: str = "cpu",
               py_workers: int = 0) -> float:
    from dali_pipelines.pretext import DaliClipLoader
    loader = DaliClipLoader(cfg, split, train=True, root=root, batch_size=batch_size, device=device,
                            num_threads=threads, py_workers=py_workers, epoch=0,
                            device_id=torch.cuda.current_device() if device == "gpu" else 0)
    for _ in loader:  # warm-up epoch: pipeline build, first decodes
        pass
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["label"].shape[0]
    if device == "gpu":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bench_torchcodec(cfg, root: str, split: str, batch_size: int, threads: int) -> float:
    from torch.utils.data import DataLoader
    ds = ClipDataset(cfg, split, train=True, root=root)
    sampler = EpochSampler(len(ds), cfg.train.seed, epoch=0)
    loader = DataLoader(ds, sampler=sampler, batch_size=batch_size, collate_fn=collate, num_workers=threads,
                        persistent_workers=threads > 0)
    rates = []
    for epoch in (0, 1):  # epoch 0 warms up (worker start-up); persistent workers carry over
        sampler.epoch = epoch
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["label"].shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates[-1]


def bench_ffmpeg(cfg, clips: list[dict], files: Path, threads: int) -> dict:
    """Rates of decoding each clip's epoch-1 window with ffmpeg, `threads` processes at a time: wall clock (with
    process start-up), and from ffmpeg's own -benchmark real time for video + audio, video only, audio only."""
    def one(i_clip):
        i, clip = i_clip
        p = draw_params(cfg, clip["num_frames"], cfg.train.seed, 1, i, train=True)
        t0 = p.start_frame / cfg.data.fps
        seconds = []
        for media, extra in ((clip["video"], ["-pix_fmt", "rgb24"]), (clip["audio"], [])):
            out = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-benchmark", "-threads", "1",
                                  "-ss", f"{t0:.3f}", "-t", f"{cfg.data.window_s}", "-i", str(files / media),
                                  *extra, "-f", "null", "-"], capture_output=True, text=True, check=True)
            seconds.append(float(re.search(r"rtime=([\d.]+)s", out.stderr).group(1)))
        return seconds

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        decode = list(pool.map(one, enumerate(clips)))
    wall = time.perf_counter() - start
    video, audio = sum(v for v, _ in decode), sum(a for _, a in decode)
    return {"ffmpeg_null": len(clips) / wall, "ffmpeg_decode_only": len(clips) * threads / (video + audio),
            "ffmpeg_video_only": len(clips) * threads / video, "ffmpeg_audio_only": len(clips) * threads / audio}


def run(root: str | None = None, clips: int = 16, config: str = "paper", threads: int = 2, batch_size: int = 8,
        gpu: bool = False, py_workers: int = 0) -> dict:
    """The decode benchmark as a dict (see the module docstring); `root` None = synthetic 10-s clips (cached)."""
    with tempfile.TemporaryDirectory(prefix="flipray-bench-") as tmp:
        tmp = Path(tmp)
        source = root or str(synthetic_data(clips, 10.0))
        store = Store(source)
        rows = store.read_manifest()[:clips]
        # One split holding exactly the timed clips, with local copies for ffmpeg; DALI and torchcodec read them
        # from here, or from S3 when --root is on S3.
        sub = tmp / "bench-ds"
        (sub / "clips").mkdir(parents=True)
        for row in rows:
            for key in ("video", "audio", "meta"):
                (sub / row[key]).write_bytes(store.get(row[key]))
        (sub / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
        read_root = str(sub)
        if is_s3(source):  # time reads from S3, as training does: the same clips under a temporary prefix
            read_root = source.rstrip("/") + f"/.bench-{os.getpid()}"
            upload_dataset(sub, read_root)
        cfg = load_config(config, [f"data.root={read_root}", "data.cache=false"])
        result = {"clips": len(rows), "config": config, "frames": cfg.data.num_frames, "crop": cfg.data.crop,
                  "n_mels": cfg.data.n_mels, "window_s": cfg.data.window_s, "threads": threads,
                  "batch_size": batch_size, "root": root or f"synthetic ({len(rows)} x 10 s, local)"}
        try:
            rates = {"dali_cpu": bench_dali(cfg, read_root, "train", batch_size, threads, py_workers=py_workers),
                     "torchcodec": bench_torchcodec(cfg, read_root, "train", batch_size, threads)}
            rates.update(bench_ffmpeg(cfg, rows, sub, threads))
            if gpu:
                rates["dali_gpu"] = bench_dali(cfg, read_root, "train", batch_size, threads, "gpu", py_workers)
        finally:
            if is_s3(source):
                for key in Store(read_root).list():
                    Store(read_root).delete(key)
    floor = rates["ffmpeg_decode_only"]
    result["clips_per_s"] = {k: round(v, 2) for k, v in rates.items()}
    result["ratio_to_floor"] = {k: round(v / floor, 3) for k, v in rates.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="dataset root (folder or s3://); default: synthetic 10-s clips kept in data/bench")
    p.add_argument("--clips", type=int, default=16, help="clips to time (the first of --root)")
    p.add_argument("--config", default="paper", help="preset or YAML: frames, crop and mels of the samples")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--py-workers", type=int, default=0, help="DALI external_source worker processes")
    p.add_argument("--gpu", action="store_true", help="also time DaliClipLoader(device='gpu')")
    args = p.parse_args(argv)
    result = {"machine": machine(), **run(args.root, args.clips, args.config, args.threads, args.batch_size,
                                          args.gpu, args.py_workers)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
