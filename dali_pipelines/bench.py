"""Decode benchmark: training samples per second from the same clips through DALI (CPU), torchcodec, and ffmpeg.

    python -m dali_pipelines.bench                              # 16 synthetic 10-s clips, paper preset, 2 threads
    python -m dali_pipelines.bench --root s3://bucket/ds --clips 64 --threads 8 --config small

Prints one JSON object. Every figure is clips (= training samples) per second over the same clips and the same
windows (`draw_params` of epoch 1, after a warm-up epoch 0 that builds pipelines, starts workers and fills caches):
  dali_cpu      DaliClipLoader(device="cpu", num_threads=T): decode the window, augment, log-mel -> batch dict
  torchcodec    ClipDataset in a DataLoader with T worker processes: the same work, the same dict
  ffmpeg_null   the floor: `ffmpeg -threads 1 -ss <window start> -t <window> -i clip.webm -pix_fmt rgb24 -f null -`
                plus the same for the FLAC, T processes at a time; decode and colour conversion only, no augmentation
                or features. `ffmpeg_null_decode_only` leaves out process start-up (ffmpeg's own -benchmark time).
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

from flipray.config import load_config
from flipray.data import ClipDataset, EpochSampler, collate, draw_params
from flipray.store import Store, is_s3, upload_dataset


def cpu_name() -> str:
    match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()) \
        if Path("/proc/cpuinfo").exists() else None
    return match.group(1).strip() if match else "unknown"


def bench_dali(cfg, root: str, split: str, batch_size: int, threads: int, device: str = "cpu") -> float:
    from dali_pipelines.pretext import DaliClipLoader
    loader = DaliClipLoader(cfg, split, train=True, root=root, batch_size=batch_size, device=device,
                            num_threads=threads, epoch=0)
    for _ in loader:  # warm-up epoch: pipeline build, first decodes
        pass
    start, n = time.perf_counter(), 0
    for batch in loader:  # epoch 1
        n += batch["label"].shape[0]
    if device == "gpu":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bench_torchcodec(cfg, root: str, split: str, batch_size: int, threads: int) -> float:
    from torch.utils.data import DataLoader
    ds = ClipDataset(cfg, split, train=True, root=root)
    rates = []
    loader_args = dict(batch_size=batch_size, collate_fn=collate, num_workers=threads, persistent_workers=threads > 0)
    sampler = EpochSampler(len(ds), cfg.train.seed, epoch=0)
    loader = DataLoader(ds, sampler=sampler, **loader_args)
    for epoch in (0, 1):  # epoch 0 warms up (worker start-up); persistent workers carry over
        sampler.epoch = epoch
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["label"].shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates[-1]


def bench_ffmpeg(cfg, clips: list[dict], files: Path, threads: int) -> tuple[float, float]:
    """(wall-clock rate, rate from ffmpeg's own -benchmark real time) of decoding each clip's epoch-1 window."""
    def one(i_clip):
        i, clip = i_clip
        p = draw_params(cfg, clip["num_frames"], cfg.train.seed, 1, i, train=True)
        t0 = p.start_frame / cfg.data.fps
        decode_s = 0.0
        for media, extra in ((clip["video"], ["-pix_fmt", "rgb24"]), (clip["audio"], [])):
            out = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-benchmark", "-threads", "1",
                                  "-ss", f"{t0:.3f}", "-t", f"{cfg.data.window_s}", "-i", str(files / media),
                                  *extra, "-f", "null", "-"], capture_output=True, text=True, check=True)
            decode_s += float(re.search(r"rtime=([\d.]+)s", out.stderr).group(1))
        return decode_s

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        decode = list(pool.map(one, enumerate(clips)))
    wall = time.perf_counter() - start
    return len(clips) / wall, len(clips) / (sum(decode) / threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dali_pipelines.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="dataset root (folder or s3://); default: synthesise --clips clips in a temp dir")
    p.add_argument("--clips", type=int, default=16, help="clips to time (synthesised, or the first of --root)")
    p.add_argument("--config", default="paper", help="preset or YAML: frames, crop and mels of the samples")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu", action="store_true", help="also time DaliClipLoader(device='gpu')")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="flipray-bench-") as tmp:
        tmp = Path(tmp)
        if args.root:
            rows = Store(args.root).read_manifest()[:args.clips]
        else:
            from flipray import synth
            print(f"synthesising {args.clips} 10-s clips ...", file=sys.stderr)
            synth.generate(tmp / "synth", args.clips, seed=0, workers=args.threads)
            rows = Store(tmp / "synth").read_manifest()
        # One split holding exactly the timed clips, local copies for ffmpeg; DALI and torchcodec read --root.
        root = args.root or str(tmp / "synth")
        sub = tmp / "bench-ds"
        (sub / "clips").mkdir(parents=True)
        store = Store(root)
        for row in rows:
            for key in ("video", "audio", "meta"):
                (sub / row[key]).write_bytes(store.get(row[key]))
        bench_rows = [{**r, "split": "train"} for r in rows]
        (sub / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_rows))
        read_root = str(sub)
        if is_s3(root):  # time reads from S3, as training does: the same clips under a temporary prefix
            read_root = root.rstrip("/") + f"/.bench-{os.getpid()}"
            upload_dataset(sub, read_root)
        cfg = load_config(args.config, [f"data.root={read_root}", "data.cache=false"])
        try:
            result = {"clips": len(rows), "config": args.config, "frames": cfg.data.num_frames, "crop": cfg.data.crop,
                      "n_mels": cfg.data.n_mels, "window_s": cfg.data.window_s, "threads": args.threads,
                      "batch_size": args.batch_size, "root": args.root or "synthetic (local)",
                      "cpu": cpu_name(), "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
            result["dali_cpu_clips_per_s"] = round(
                bench_dali(cfg, read_root, "train", args.batch_size, args.threads), 2)
            result["torchcodec_clips_per_s"] = round(
                bench_torchcodec(cfg, read_root, "train", args.batch_size, args.threads), 2)
            wall, decode = bench_ffmpeg(cfg, rows, sub, args.threads)
            result["ffmpeg_null_clips_per_s"] = round(wall, 2)
            result["ffmpeg_null_decode_only_clips_per_s"] = round(decode, 2)
            if args.gpu:
                result["dali_gpu_clips_per_s"] = round(
                    bench_dali(cfg, read_root, "train", args.batch_size, args.threads, "gpu"), 2)
        finally:
            if is_s3(root):
                for key in Store(read_root).list():
                    Store(read_root).delete(key)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
