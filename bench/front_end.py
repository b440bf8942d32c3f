"""Cost per sample of each audio front end (flipray.pretext.data.AudioFeatures), on CPU and, when present, CUDA.

    python -m bench.front_end                       # demo and paper presets, every model.front_end, JSON on stdout
    python -m bench.front_end --batch 32 --repeats 5

The loaders hand the model the waveform; this is the work the model's front end adds per sample on the training
device (one 2.87-s stereo window -> log-mels, + IPD, + GCC-PHAT). Median of `repeats` timed batches after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from flipray.config import FRONT_ENDS, load_config
from flipray.pretext.data import AudioFeatures


def time_front_end(preset: str, front_end: str, device: str, batch: int, repeats: int) -> dict:
    cfg = load_config(preset, [f"model.front_end={front_end}"])
    features = AudioFeatures(cfg).to(device)
    wave = (torch.randn(batch, 2, cfg.window_samples, generator=torch.Generator().manual_seed(0)) * 0.1).to(device)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = features(wave)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first pass is the warm-up (allocator, FFT plans)
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) / batch * 1e3
    return {"preset": preset, "front_end": front_end, "device": device, "channels": out.shape[1],
            "ms_per_sample": round(ms, 3), "batch": batch, "repeats": repeats}


def run(batch: int = 16, repeats: int = 3) -> list[dict]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [time_front_end(p, f, d, batch, repeats) for d in devices for p in ("demo", "paper") for f in FRONT_ENDS]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.front_end", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = run(args.batch, args.repeats)
    for r in rows:
        print(f"{r['device']:5s} {r['preset']:6s} {r['front_end']:8s} {r['channels']} ch  "
              f"{r['ms_per_sample']:.2f} ms/sample", file=sys.stderr)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
