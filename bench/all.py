"""Every CPU-side benchmark in one process tree and one sitting: decode, training step, model cost.

    python -m bench.all                                       # ~10 min on an idle 2-core machine
    python -m bench.all --quick                               # ~3 min: fewer clips, samples and rounds
    python -m bench.all --json-out docs/bench-cpu.json --md-out table.md

Runs, in order:
  model      parameters and FLOPs per sample (forward; forward + backward) of the demo and paper presets and of
             ResNet-50, counted by torch.utils.flop_counter on the meta device; bytes per sample from data/demo
  decode     bench.decode: DALI CPU, torchcodec and the raw ffmpeg floor on the same windows of the same clips
             (paper preset: 18 frames, 224 px, 128 mels); ratios to the ffmpeg decode-only floor
  cache      bench.cache: S3 GETs per sample per epoch with the node-local clip cache off and on, and loader
             samples/s with 0 and 30 ms per S3 request, one request at a time against 8 in flight (moto + a
             delaying proxy, started for the run)
  train      bench.train: forward + backward + optimizer samples/s of the demo preset (global batch 32) and the
             paper preset (batch 4), plain PyTorch vs Ray Train with 1 and 2 workers, data-wait fraction;
             ratios to plain PyTorch; achieved GFLOP/s = samples/s x the counted FLOPs
and prints one JSON document on stdout (also --json-out) and a markdown table on stderr (also --md-out). The
machine (CPU model, cores, versions) and the load average at the start and end are in the JSON: on a shared machine
the absolute figures move with the load, the ratios much less, because each is measured against its baseline in the
same run (training modes take turns in rotating order).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train.py: OpenMP spinning on a busy machine

from bench import cache, decode, train
from bench.common import machine
from bench.project import clip_bytes, model_cost, resnet50_cost

# (default, --quick) settings; sized so the default finishes in about 10 minutes on an idle 2-core machine
SETTINGS = {
    "decode": ({"clips": 16, "batch_size": 8}, {"clips": 8, "batch_size": 4}),
    "cache": ({"clips": 32, "batch_size": 8, "delay_ms": 30.0}, {"clips": 8, "batch_size": 4, "delay_ms": 30.0}),
    "demo": ({"overrides": [], "samples": 320, "repeats": 3, "warmup": 3},
             {"overrides": [], "samples": 64, "repeats": 1, "warmup": 1}),
    "paper": ({"overrides": ["train.batch_size=4"], "samples": 8, "repeats": 1, "warmup": 1},
              {"overrides": ["train.batch_size=2"], "samples": 2, "repeats": 1, "warmup": 1}),
}
LABELS = {"plain": "plain PyTorch", "ray_1": "Ray Train, 1 worker", "ray_2": "Ray Train, 2 workers (DDP)"}


def run(quick: bool = False, data: str | None = None, threads: int | None = None,
        modes: tuple[str, ...] = train.MODES, skip: tuple[str, ...] = (), clips_root: str = "data/demo",
        settings: dict | None = None) -> dict:
    """The whole benchmark as a dict; `settings` replaces parts of SETTINGS, e.g. {"demo": {"samples": 8}}."""
    import ray
    import torch
    threads = threads or torch.get_num_threads()
    pick = {k: {**v[1 if quick else 0], **(settings or {}).get(k, {})} for k, v in SETTINGS.items()}
    t0 = time.time()
    report = {"machine": machine(), "settings": {"quick": quick, "data": data or "synthetic (cached)",
                                                 "threads": threads, "modes": list(modes), **pick}}
    report["load_average_1_5_15"] = {"start": report["machine"]["load_average_1_5_15"]}
    report["model"] = {"demo": model_cost("demo"), "paper": model_cost("paper"), "resnet50": resnet50_cost()}
    if (Path(clips_root) / "manifest.jsonl").exists():
        report["clip_bytes"] = clip_bytes(clips_root)
    if "decode" not in skip:
        print("decode benchmark ...", file=sys.stderr)
        report["decode"] = decode.run(root=data, config="paper", threads=threads, **pick["decode"])
    if "cache" not in skip:
        print("S3 request / cache benchmark ...", file=sys.stderr)
        report["cache"] = cache.run(root=data, threads=threads, **pick["cache"])
    started = False
    if any(m.startswith("ray") for m in modes) and not ray.is_initialized() and {"demo", "paper"} - set(skip):
        ray.init(address="local", num_cpus=max(threads, 2), include_dashboard=False, logging_level="warning",
                 log_to_driver=False)
        started = True
    try:
        for preset in ("demo", "paper"):
            if preset in skip:
                continue
            print(f"training benchmark, {preset} preset ...", file=sys.stderr)
            s = pick[preset]
            r = train.run(preset, s["overrides"], data, samples=s["samples"], repeats=s["repeats"],
                          warmup=s["warmup"], threads=threads, modes=modes)
            gflop = report["model"][preset]["fwd_bwd_gflop_per_sample"]
            for m in r["modes"].values():
                m["achieved_gflop_per_s"] = m["samples_per_s"]["median"] * gflop
            report[f"train_{preset}"] = r
    finally:
        if started:
            ray.shutdown()
    report["load_average_1_5_15"]["end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.time() - t0, 1)
    return report


def markdown(report: dict) -> str:
    """One table: every figure with its ratio to the floor or baseline of the same run."""
    lines = ["| benchmark | variant | rate | ratio | to | data wait | GFLOP/s |", "|---|---|---|---|---|---|---|"]
    if "decode" in report:
        d = report["decode"]
        what = (f"decode, paper window ({d['frames']} x {d['crop']} px, {d['n_mels']} mels), {d['clips']} clips, "
                f"{d['threads']} threads")
        names = {"ffmpeg_decode_only": "ffmpeg decode only (floor)", "ffmpeg_video_only": "ffmpeg, VP9 video only",
                 "ffmpeg_audio_only": "ffmpeg, FLAC audio only", "dali_cpu": "DALI CPU pipeline",
                 "torchcodec": f"torchcodec ClipDataset ({d['threads']} workers)",
                 "ffmpeg_null": "ffmpeg -f null, wall (process start-up)", "dali_gpu": "DALI mixed (NVDEC)"}
        for i, (k, name) in enumerate((k, n) for k, n in names.items() if k in d["clips_per_s"]):
            lines.append(f"| {what if i == 0 else ''} | {name} | {d['clips_per_s'][k]:.1f} clips/s | "
                         f"{d['ratio_to_floor'][k]:.2f} | floor | | |")
    for preset in ("demo", "paper"):
        r = report.get(f"train_{preset}")
        if not r:
            continue
        s = r["setup"]
        what = (f"train step, {preset} preset ({s['parameters'] / 1e6:.2f} M params), batch {s['batch_size']}, "
                f"{s['samples_per_run']} samples x {s['rounds']} round(s)")
        for i, (mode, m) in enumerate(r["modes"].items()):
            sps = m["samples_per_s"]
            ratio = 1.0 if mode == "plain" else r["ratios"].get(f"{mode}/plain")
            spread = f" ({sps['min']:.2f}-{sps['max']:.2f})" if len(sps["runs"]) > 1 else ""
            lines.append(f"| {what if i == 0 else ''} | {LABELS[mode]} x {m['threads_per_worker']} thread(s) | "
                         f"{sps['median']:.2f} samples/s{spread} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} | {'plain' if ratio is not None else ''} | "
                         f"{m['data_wait_fraction']:.0%} | {m['achieved_gflop_per_s']:.0f} |")
    if "cache" in report:
        c = report["cache"]
        for k, v in c["gets_per_sample"].items():
            loader, on = k.split("_cache_")
            lines.append(f"| S3 GETs per sample, epochs 0 / 1 / 2 ({c['clips']} clips) | {loader}, cache {on} | "
                         f"{' / '.join(f'{x:.2f}' for x in v)} | | | | |")
        d = f"{c['delay_ms']:g}ms"
        for name, rates in (("fetch stage", c["fetch_stage_samples_per_s"]),
                            *((f"{n} loader", {k[len(n) + 1:]: v for k, v in c["loader_samples_per_s"].items()
                                               if k.startswith(n + "_")}) for n in ("dali", "torchcodec"))):
            lines.append(f"| {name}, {d} per S3 request (batch {c['batch_size']}) | 8 in flight / 1 | "
                         f"{rates[d + '_threads8']:.1f} / {rates[d + '_threads1']:.1f} samples/s | "
                         f"{rates[d + '_threads8'] / rates[d + '_threads1']:.2f} | 1 in flight | | |")
    mach = report["machine"]
    load = report["load_average_1_5_15"]
    lines.append("")
    lines.append(f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GB, torch "
                 f"{mach['versions'].get('torch')}, ray {mach['versions'].get('ray')}, DALI "
                 f"{mach['versions'].get('nvidia-dali-cuda130')}, ffmpeg {mach['versions'].get('ffmpeg')}; load "
                 f"average (1/5/15 min) {load['start']} at the start, {load.get('end')} at the end; "
                 f"{report.get('wall_s', 0) / 60:.1f} min in all.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer clips, samples and rounds (~3 min)")
    p.add_argument("--data", default=None, help="dataset root for every part (default: synthetic clips, cached)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--modes", default=",".join(train.MODES), help="training modes (subset of plain,ray_1,ray_2)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: decode, cache, demo, paper")
    p.add_argument("--clips-root", default="data/demo", help="dataset whose clip sizes give bytes per sample")
    p.add_argument("--json-out", default=None, metavar="PATH")
    p.add_argument("--md-out", default=None, metavar="PATH")
    args = p.parse_args(argv)
    stdout = train.json_stdout()
    report = run(args.quick, args.data, args.threads, tuple(args.modes.split(",")),
                 tuple(s for s in args.skip.split(",") if s), args.clips_root)
    table = markdown(report)
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if args.md_out:
        Path(args.md_out).write_text(table + "\n")
    print(table, file=sys.stderr)
    stdout.write(text + "\n")
    stdout.flush()
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
