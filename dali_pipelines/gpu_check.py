"""GPU check: the pretext pipeline with device="gpu" (NVDEC video decode, augmentation and log-mel on the GPU).

    python -m dali_pipelines.gpu_check                               # 32 synthetic 10-s clips, paper preset
    python -m dali_pipelines.gpu_check --root s3://bucket/ds --batch-size 32 --epochs 3

Needs a CUDA GPU (the tests never run it). It checks that the batches come back as CUDA tensors in the contract's
shapes, that the GPU and CPU pipelines agree on the same samples (same clips, labels and windows; log-mel within
float tolerance; frames within codec tolerance, since NVDEC + DALI's GPU colour conversion and libavcodec + swscale
round differently), and prints samples per second for device="gpu" and device="cpu" as one JSON line.
Exit status 0 when every check passes, 1 when one fails, 2 when there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dali_pipelines.pretext import DaliClipLoader
from flipray.config import load_config


def epoch_rate(loader, epochs: int) -> tuple[float, list[dict]]:
    """Samples/s over `epochs` epochs after a warm-up epoch; also returns the warm-up epoch's batches."""
    first = list(loader)
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            n += batch["label"].shape[0]
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start), first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dali_pipelines.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="dataset root (folder or s3://); default: synthesise --clips clips")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--split", default="train")
    p.add_argument("--config", default="paper")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=4, help="DALI CPU threads (FLAC decode, callback hand-off)")
    p.add_argument("--py-workers", type=int, default=2, help="external_source worker processes (spawn)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device: run this on a GPU node"}))
        return 2

    with tempfile.TemporaryDirectory(prefix="flipray-gpu-check-") as tmp:
        root, split = args.root, args.split
        if not root:
            from flipray.synth import scenes as synth
            root, split = str(Path(tmp) / "synth"), "train"
            rows = synth.generate(root, args.clips, seed=0)
            # every clip in one split, so the check times all of them
            (Path(root) / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n"
                                                               for r in rows))
        cfg = load_config(args.config, [f"data.root={root}", "data.cache=false"])
        common = dict(batch_size=args.batch_size, num_threads=args.threads, py_workers=args.py_workers, epoch=0,
                      device_id=torch.cuda.current_device())
        gpu_rate, gpu_batches = epoch_rate(DaliClipLoader(cfg, split, train=True, device="gpu", **common),
                                           args.epochs)
        cpu_rate, cpu_batches = epoch_rate(DaliClipLoader(cfg, split, train=True, device="cpu", **common), 1)

    checks = {}
    g, c = gpu_batches[0], cpu_batches[0]
    d = cfg.data
    checks["cuda_tensors"] = g["video"].is_cuda and g["audio"].is_cuda
    checks["video_shape"] = tuple(g["video"].shape[1:]) == (d.num_frames, 3, d.crop, d.crop)
    checks["audio_shape"] = tuple(g["audio"].shape[1:]) == (2, d.n_mels, cfg.mel_frames)
    checks["same_samples"] = g["clip_id"] == c["clip_id"] and torch.equal(g["label"].cpu(), c["label"].cpu()) \
        and torch.allclose(g["start_s"].cpu(), c["start_s"].cpu())
    loud = c["audio"] > -6  # above the float-noise floor (see tests/test_dali.py)
    audio_err = (g["audio"].cpu() - c["audio"])[loud].abs().max().item()
    video_err = (g["video"].cpu() - c["video"]).abs().mean().item()
    checks["audio_close"] = audio_err < 5e-3
    checks["video_close"] = video_err < 0.1
    skipped = sum(b["skipped"] for b in gpu_batches)
    result = {"ok": all(checks.values()), "checks": checks, "gpu": torch.cuda.get_device_name(),
              "gpu_clips_per_s": round(gpu_rate, 1), "cpu_clips_per_s": round(cpu_rate, 1),
              "audio_max_err": audio_err, "video_mean_err": round(video_err, 4), "skipped": skipped,
              "config": args.config, "batch_size": args.batch_size, "root": args.root or f"synthetic ({args.clips})"}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
