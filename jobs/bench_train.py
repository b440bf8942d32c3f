"""Training throughput of one model on one dataset: plain PyTorch vs Ray Train with 1 and 2 workers.

    python -m jobs.bench_train                                   # demo preset, 48 synthetic 4-s clips (cached)
    python -m jobs.bench_train --samples 640 --repeats 3 --data data/demo --json-out bench.json

All three modes run the library loop (`flipray.train.train_one_epoch`) on the same model (the `demo` preset, or
--config), the same clips (decoded into RAM, as the demo preset does, so decoding is not measured; `--set
data.cache=false` measures it) and the same global batch (`train.batch_size`, split over the workers with
`split_batch`). Each mode first runs --warmup optimizer steps (not timed), then --repeats timed runs of --samples
samples each; samples/s is global samples / wall time of one run, measured inside the training process (on Ray:
rank 0, after a barrier), and the median, min and max over the runs are reported. data_wait_fraction is the share of
that time spent waiting for the next batch. startup_s is the time from the start of a mode (for Ray: the
`trainer.fit()` call) to the first warmup step, of which data_prep_s is building the dataset; wall_s is the whole
mode, end to end.

Threads: Ray would give a 1-CPU worker OMP_NUM_THREADS=1, so the 1-worker run asks for --threads CPUs and sets
torch's thread count to --threads, as the plain loop does; the 2 workers get --threads / 2 each, the same CPUs in
all. The threads each mode used are in the JSON.

Ray is started in this process (`ray.init(address="local")`, no dashboard) and shut down at the end. The JSON
document goes to stdout (and --json-out), a table to stderr; everything else Ray or the loop prints goes to stderr.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flipray.config import config_from_dict, load_config
from flipray.data import ClipDataset, EpochSampler
from flipray.models import SpatialAlignmentNet, count_parameters
from flipray.train import make_loader, make_optimizer, new_state, split_batch, train_one_epoch


# ---------------------------------------------------------------------------------------------------------------------
# The measurement: identical in the plain process and on every Ray worker

class Timed:
    """Wraps a loader; `wait` accumulates the seconds spent waiting for each next batch."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch


def measure(cfg, model, dataset, device, rank: int, world: int, warmup_steps: int, samples: int, repeats: int,
            sync=lambda: None) -> dict:
    """Warm up, then time `repeats` runs of `samples` global samples; `sync` lines the ranks up before each run."""
    micro, accum = split_batch(cfg.train.batch_size, world, cfg.train.micro_batch_size)
    optimizer = make_optimizer(model, cfg)
    state = new_state()
    # This rank's shard of epoch after epoch (the sampler jobs/pretext.py uses), so a run can span epochs.
    order = itertools.chain.from_iterable(EpochSampler(len(dataset), cfg.train.seed, epoch, rank=rank, world=world)
                                          for epoch in itertools.count())

    def run(global_samples: int):
        loader = Timed(make_loader(dataset, cfg, list(itertools.islice(order, global_samples // world)), micro))
        sync()
        t0 = time.perf_counter()
        stats = train_one_epoch(model, loader, optimizer, cfg, device, state, world_size=world, accum_steps=accum)
        wall = time.perf_counter() - t0
        return {"samples_per_s": stats["n"] * world / wall, "data_wait_fraction": loader.wait / wall,
                "seconds": wall}

    t_first_step = time.time()
    run(warmup_steps * cfg.train.batch_size)
    return {"t_first_step": t_first_step, "runs": [run(samples) for _ in range(repeats)],
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def bench_worker(config: dict):
    """A Ray Train worker: jobs.pretext.train_worker's setup (DDP model, sharded data) without MLflow/checkpoints."""
    import ray.train
    import ray.train.torch
    t_enter = time.time()
    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    model = ray.train.torch.prepare_model(SpatialAlignmentNet(cfg))  # DDP (gloo) when world > 1
    t0 = time.time()
    dataset = ClipDataset(cfg, "train", train=True)
    data_prep_s = time.time() - t0
    sync = torch.distributed.barrier if world > 1 else (lambda: None)
    result = measure(cfg, model, dataset, device, rank, world, config["warmup"], config["samples"],
                     config["repeats"], sync)
    metrics = {**result, "t_worker_start": t_enter, "data_prep_s": data_prep_s}
    # Ray Train v2 hands the driver only metrics that come with a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


# ---------------------------------------------------------------------------------------------------------------------
# The driver

def run_plain(cfg, args) -> dict:
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    model = SpatialAlignmentNet(cfg)
    dataset = ClipDataset(cfg, "train", train=True)
    data_prep_s = time.time() - t_start
    r = measure(cfg, model, dataset, torch.device("cpu"), 0, 1, args.warmup, args.samples, args.repeats)
    return summarise(r, workers=1, startup_s=r["t_first_step"] - t_start, data_prep_s=data_prep_s,
                     wall_s=time.time() - t_start)


def run_ray(cfg, args, workers: int, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    threads = max(args.threads // workers, 1)
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": threads, "warmup": args.warmup, "samples": args.samples,
                           "repeats": args.repeats},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=f"bench-{workers}w-{time.strftime('%H%M%S')}", storage_path=storage))
    t_start = time.time()
    r = trainer.fit().metrics  # rank 0's report
    return summarise(r, workers=workers, startup_s=r["t_first_step"] - t_start, data_prep_s=r["data_prep_s"],
                     wall_s=time.time() - t_start, worker_start_s=r["t_worker_start"] - t_start)


def summarise(r: dict, **extra) -> dict:
    sps = [run["samples_per_s"] for run in r["runs"]]
    return {"samples_per_s": {"median": statistics.median(sps), "min": min(sps), "max": max(sps), "runs": sps},
            "data_wait_fraction": statistics.median(run["data_wait_fraction"] for run in r["runs"]),
            "threads_per_worker": r["threads"], "omp_num_threads": r["omp_num_threads"], **extra}


def machine() -> dict:
    import ray
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def synthetic_data(clips: int, duration_s: float) -> Path:
    """A cached synthetic dataset (flipray.synth), generated on first use."""
    from flipray.synth import generate
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flipray" / \
        f"bench-synth-{clips}x{duration_s:g}s"
    if not (root / "manifest.jsonl").exists():
        print(f"generating {clips} synthetic clips into {root}", file=sys.stderr)
        generate(root, clips=clips, seed=0, duration_s=duration_s)
    return root


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="preset or YAML file (default: demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--data", default=None, help="dataset root (default: synthetic clips cached under ~/.cache)")
    p.add_argument("--clips", type=int, default=48, help="synthetic clips when --data is not given")
    p.add_argument("--samples", type=int, default=640, help="global samples per timed run (rounded up to batches)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the plain loop = CPUs (and threads) of the 1-worker run, split over 2")
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write the JSON here")
    args = p.parse_args(argv)
    # Ray workers' output is forwarded to the driver's stdout: keep fd 1 for the JSON document only.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    os.environ.setdefault("TQDM_DISABLE", "1")  # no per-clip progress bars from the workers
    import ray
    cfg = load_config(args.config, args.set + [f"data.root={args.data or synthetic_data(args.clips, 4.0)}"])
    bs = cfg.train.batch_size
    args.samples = -(-args.samples // bs) * bs
    setup = {"config": cfg.preset, "data": cfg.data.root, "cache": cfg.data.cache, "batch_size": bs,
             "samples_per_run": args.samples, "repeats": args.repeats, "warmup_steps": args.warmup,
             "parameters": count_parameters(SpatialAlignmentNet(cfg))}
    load = {"start": os.getloadavg()}
    modes = {"plain": run_plain(cfg, args)}
    load["after_plain"] = os.getloadavg()
    ray.init(address="local", num_cpus=max(args.threads, 2), include_dashboard=False, logging_level="warning")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as storage:
            for workers in (1, 2):
                modes[f"ray_{workers}"] = run_ray(cfg, args, workers, storage)
                load[f"after_ray_{workers}"] = os.getloadavg()
    finally:
        ray.shutdown()
    plain = modes["plain"]["samples_per_s"]["median"]
    report = {"machine": {**machine(), "load_average_1_5_15": load}, "setup": setup, "modes": modes,
              "ratios": {f"ray{w}/plain": modes[f"ray_{w}"]["samples_per_s"]["median"] / plain for w in (1, 2)}}

    print(f"\n{'mode':8} {'workers':>7} {'threads':>7} {'samples/s (min-max)':>22} {'data wait':>9} "
          f"{'startup s':>9} {'wall s':>7}", file=sys.stderr)
    for name, m in modes.items():
        s = m["samples_per_s"]
        print(f"{name:8} {m['workers']:7d} {m['threads_per_worker']:7d} "
              f"{s['median']:8.1f} ({s['min']:5.1f}-{s['max']:5.1f}) {m['data_wait_fraction']:9.0%} "
              f"{m['startup_s']:9.1f} {m['wall_s']:7.1f}", file=sys.stderr)
    print("  ".join(f"{k}: {v:.3f}" for k, v in report["ratios"].items()), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    stdout.write(text + "\n")
    stdout.flush()
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
