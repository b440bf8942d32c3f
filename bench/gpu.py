"""GPU benchmark of one node (run through bench/gpu.sh): decode, the paper-preset step, and whether data keeps up.

    bench/gpu.sh OUT                         # on the GPU node; writes OUT/gpu.json (+ gpu.log, nvidia-smi.txt)
    bench/gpu.sh --dry-run OUT               # tiny CPU settings: checks the script end to end anywhere
    python -m bench.gpu --out OUT [--clips 64] [--batch 32] [--steps 15]

Everything runs on data it makes itself (flipray.synth.scenes, --clips 10-s clips; nothing is downloaded), in this order,
writing OUT/gpu.json after every part so a run cut short still leaves what it measured:
  step       the library loop (flipray.pretext.train.train_one_epoch) on the paper preset with random inputs already on the
             GPU: fp32, bf16 autocast, bf16 + channels_last at batch --batch, then bf16 + channels_last at several
             batches; samples/s per GPU, ms per step, peak GPU memory (torch.cuda.max_memory_allocated)
  decode     DaliClipLoader samples/s over the synthetic clips: device="gpu" (NVDEC mixed decode + GPU augment and
             log-mel) and device="cpu", the same clips and windows
  end_to_end the loop fed by the DALI GPU loader (bf16 + channels_last): samples/s and data-wait fraction. The
             pipeline keeps up when the loader's rate is above the step's (keeps_up = loader / step > 1) and the
             data-wait fraction stays small
  compile    torch.compile of the same step (bf16 + channels_last): compile seconds, samples/s, speedup over eager
  gpu_check  python -m dali_pipelines.gpu_check on the same clips: GPU/CPU pipeline parity checks
  fixed_paths (first) bench/gpu_paths.py: `flipray check` scoring on CUDA, every model variant prepared with
             channels_last and trained, gradient accumulation under 2-rank DDP (identical parameters)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from bench.common import machine
from flipray.config import load_config
from flipray.pretext.models import SpatialAlignmentNet
from flipray.pretext.train import make_optimizer, new_state, train_one_epoch


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False}
    p = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}", "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def random_batches(cfg, batch: int, n: int, device) -> list[dict]:
    """n distinct batches of the contract's shapes, already on the device: the step without any data cost."""
    d = cfg.data
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(min(n, 4)):  # 4 distinct batches, cycled: enough to defeat any caching, little memory
        out.append({"video": torch.randn(batch, d.num_frames, 3, d.crop, d.crop, generator=g).to(device),
                    "audio": torch.randn(batch, 2, cfg.window_samples, generator=g).clamp(-1, 1).to(device),
                    "label": (torch.rand(batch, generator=g) < 0.5).float().to(device), "skipped": 0})
    return [out[i % len(out)] for i in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(cfg, device, batch: int, steps: int, warmup: int, amp: bool, channels_last: bool,
              compile_backend: str | None = None) -> dict:
    """samples/s of train_one_epoch over `steps` steps after `warmup` (which includes any compilation)."""
    cfg.train.amp = amp
    # channels_last on CUDA only, as jobs/pretext.py: on this project's CPUs oneDNN's channels_last backward
    # corrupted the heap or hung (torch 2.11), so a --dry-run keeps the default layout
    channels_last = channels_last and device.type == "cuda"
    torch.manual_seed(0)
    model = SpatialAlignmentNet(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    run_model = torch.compile(model, backend=compile_backend) if compile_backend else model
    state = new_state()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_one_epoch(run_model, random_batches(cfg, batch, warmup, device), optimizer, cfg, device, state)
    sync(device)
    warmup_s = time.perf_counter() - t0
    batches = random_batches(cfg, batch, steps, device)
    sync(device)
    t0 = time.perf_counter()
    stats = train_one_epoch(run_model, batches, optimizer, cfg, device, state)
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"batch": batch, "amp_bf16": amp and device.type == "cuda", "channels_last": channels_last,
           "compiled": compile_backend, "steps": steps, "samples_per_s": stats["n"] / seconds,
           "ms_per_step": seconds / steps * 1e3, "warmup_s": warmup_s}
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, run_model, optimizer, batches
    return out


def loader_rate(cfg, root: str, device: str, batch: int, threads: int, py_workers: int, device_id: int) -> dict:
    from dali_pipelines.pretext import DaliClipLoader
    loader = DaliClipLoader(cfg, "train", train=True, root=root, batch_size=batch, device=device,
                            num_threads=threads, py_workers=py_workers, device_id=device_id, epoch=0)
    t0 = time.perf_counter()
    for _ in loader:  # warm-up epoch: pipeline build, first decodes
        pass
    build_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for _ in range(2):
        for b in loader:
            n += b["label"].shape[0]
    if device == "gpu":
        torch.cuda.synchronize()
    return {"samples_per_s": n / (time.perf_counter() - t0), "first_epoch_s": build_s, "threads": threads,
            "py_workers": py_workers, "batch": batch, "samples": n, "skipped": len(loader.skipped)}


def end_to_end(cfg, root: str, device, batch: int, threads: int, py_workers: int, epochs: int) -> dict:
    """The loop fed by DALI (GPU decode on CUDA, CPU otherwise): samples/s and the share spent waiting for data."""
    from dali_pipelines.pretext import DaliClipLoader
    cfg.train.amp = True
    torch.manual_seed(0)
    model = SpatialAlignmentNet(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    state = new_state()
    loader = DaliClipLoader(cfg, "train", train=True, root=root, batch_size=batch,
                            device="gpu" if device.type == "cuda" else "cpu", num_threads=threads,
                            py_workers=py_workers, device_id=device.index or 0, epoch=0)
    train_one_epoch(model, loader, optimizer, cfg, device, state)  # warm-up epoch
    totals = {"n": 0, "seconds": 0.0, "wait": 0.0}
    for _ in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        s = train_one_epoch(model, loader, optimizer, cfg, device, state)
        sync(device)
        seconds = time.perf_counter() - t0
        totals["n"] += s["n"]
        totals["seconds"] += seconds
        totals["wait"] += s["data_wait_fraction"] * seconds
    return {"samples_per_s": totals["n"] / totals["seconds"], "data_wait_fraction": totals["wait"] / totals["seconds"],
            "samples": totals["n"], "epochs": epochs, "batch": batch}


def make_data(root: Path, clips: int, duration_s: float) -> str:
    """Synthetic clips, every one in the train split (the loaders time one split)."""
    from flipray.synth.scenes import generate
    if not (root / "manifest.jsonl").exists():
        rows = generate(root, clips, seed=0, duration_s=duration_s)
        (root / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    return str(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu.json")
    p.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU: demo preset, 4 short clips")
    p.add_argument("--config", default="paper")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch of the main step figures")
    p.add_argument("--batches", default="8,16,32,64", help="batches of the bf16 + channels_last curve")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI CPU threads")
    p.add_argument("--py-workers", type=int, default=4, help="DALI external_source worker processes")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--data-dir", default=None, help="where to synthesise the clips (default: a temp folder)")
    args = p.parse_args(argv)
    if args.dry_run:  # every code path once, in seconds, without a GPU
        args.config, args.clips, args.batch, args.batches = "demo", 4, 2, "2"
        args.steps, args.warmup, args.threads, args.py_workers = 2, 1, 1, 0
        args.compile_backend = "aot_eager"  # dynamo + AOT autograd without C++ code generation
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    report = {"machine": {**machine(), "gpu_info": gpu_info()}, "dry_run": args.dry_run, "device": str(device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "errors": {}}
    if not args.dry_run and device.type != "cuda":
        report["errors"]["device"] = "no CUDA device: bench/gpu.sh needs a GPU (or --dry-run)"

    def save():
        (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")

    def part(name, fn):
        t0 = time.time()
        print(f"[bench.gpu] {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - keep going: the other parts still measure something
            report["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"[bench.gpu] {name} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        save()

    def step_part():
        cfg = load_config(args.config)
        rows = []
        runs = [(args.batch, False, False), (args.batch, True, False), (args.batch, True, True)]
        runs += [(int(b), True, True) for b in args.batches.split(",") if int(b) != args.batch]
        for batch, amp, cl in runs:
            variant = f"{'bf16' if amp else 'fp32'}{' + channels_last' if cl else ''}, eager"
            try:  # one row failing (e.g. out of memory at the largest batch) keeps the others
                rows.append({"variant": variant, **time_step(cfg, device, batch, args.steps, args.warmup, amp, cl)})
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": variant, "batch": batch, "error": f"{type(e).__name__}: {e}"[:500]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["step"] = rows
            save()
        return rows

    def compile_part():
        cfg = load_config(args.config)
        r = time_step(cfg, device, args.batch, args.steps, args.warmup, True, True, args.compile_backend)
        eager = next((s for s in report.get("step", []) if s["variant"] == "bf16 + channels_last, eager"
                      and s["batch"] == args.batch and "samples_per_s" in s), None)
        r["speedup_over_eager"] = r["samples_per_s"] / eager["samples_per_s"] if eager else None
        report.setdefault("step", []).append({"variant": f"bf16 + channels_last, compiled ({args.compile_backend})",
                                              **r})
        return r

    def fixed_paths():  # the GPU-only defects' paths (bench/gpu_paths.py): check on CUDA, variants, DDP accumulation
        from bench.gpu_paths import accumulation, check_on_device, variants
        return {"check": check_on_device(device), "variants": variants(device), "accumulation": accumulation(device)}

    part("fixed_paths", fixed_paths)
    with tempfile.TemporaryDirectory(prefix="flipray-gpu-bench-") as tmp:
        data_dir = Path(args.data_dir or Path(tmp) / "synth")
        part("data", lambda: {"root": make_data(data_dir, args.clips, 4.0 if args.dry_run else 10.0),
                              "clips": args.clips})
        root = report.get("data", {}).get("root")
        part("step", step_part)
        dec = None
        if root:
            cfg = load_config(args.config, [f"data.root={root}", "data.cache=false"])
            dali_device = "gpu" if device.type == "cuda" else "cpu"
            part("decode", lambda: {
                f"dali_{dali_device}": loader_rate(cfg, root, dali_device, args.batch, args.threads, args.py_workers,
                                                   device.index or 0),
                **({"dali_cpu": loader_rate(cfg, root, "cpu", args.batch, args.threads, args.py_workers, 0)}
                   if dali_device == "gpu" else {})})
            dec = report.get("decode", {}).get(f"dali_{dali_device}")
            if dec:
                report["decode"]["dali_gpu_samples_per_s"] = dec["samples_per_s"] if dali_device == "gpu" else None
            part("end_to_end", lambda: end_to_end(load_config(args.config, [f"data.root={root}", "data.cache=false"]),
                                                  root, device, args.batch, args.threads, args.py_workers, 2))
        step_rate = next((s["samples_per_s"] for s in report.get("step", []) if "samples_per_s" in s
                          and s["variant"] == "bf16 + channels_last, eager" and s["batch"] == args.batch), None)
        if step_rate and dec:
            report["keeps_up"] = {"loader_samples_per_s": dec["samples_per_s"], "step_samples_per_s": step_rate,
                                  "loader_over_step": dec["samples_per_s"] / step_rate,
                                  "end_to_end_data_wait": report.get("end_to_end", {}).get("data_wait_fraction")}
            save()
        part("compile", compile_part)
        if root:
            def gpu_check():
                r = subprocess.run([sys.executable, "-m", "dali_pipelines.gpu_check", "--root", root,
                                    "--config", args.config, "--batch-size", str(min(args.batch, 16)),
                                    "--threads", str(args.threads), "--py-workers", str(args.py_workers)],
                                   capture_output=True, text=True, timeout=240, check=False)
                lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
                result = json.loads(lines[-1]) if lines else {"stderr": r.stderr[-2000:]}
                return {"returncode": r.returncode, **result}
            part("gpu_check", gpu_check)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print(json.dumps({k: report.get(k) for k in ("device", "keeps_up", "errors")}), file=sys.stderr)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
