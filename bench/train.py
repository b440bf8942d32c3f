"""Training-step throughput of one model on one dataset: plain PyTorch vs Ray Train with 1 and 2 workers.

    python -m bench.train                                    # demo preset, 48 synthetic 4-s clips (cached)
    python -m bench.train --config paper --set train.batch_size=4 --samples 8 --warmup 1 --repeats 1
    python -m bench.train --samples 320 --repeats 5 --data data/demo --json-out bench.json

All three modes run the library loop (`flipray.pretext.train.train_one_epoch`: forward, backward, optimizer step) on the same
model (the `demo` preset, or --config), the same clips (decoded into RAM with data.cache=true and read in the
training process with data.num_workers=0, so decoding is not measured but augmentation and log-mel are; `--set
data.cache=false` measures decoding too) and the same global batch (`train.batch_size`, split over the workers with
`split_batch`). A measurement starts from scratch in fresh processes (plain: a spawned Python process without Ray;
Ray: `trainer.fit()`), builds the dataset and model, runs --warmup optimizer steps untimed, then times --samples
global samples inside the training process (on Ray: rank 0, after a barrier). The modes take turns, --repeats rounds
of one measurement each in a rotating order, so that a change in the machine's load hits all three alike; samples/s
is reported as median, min and max over the rounds, the ratios as ratios of medians and per round.
data_wait_fraction is the share of the timed run spent waiting for the next batch (here: the per-sample augmentation
and log-mel, done in the training process); startup_s is the time from the start of a measurement to its first
warmup step, of which data_prep_s is building the dataset; wall_s is the whole measurement (medians over the rounds).

Fairness: Ray gives a 1-CPU worker OMP_NUM_THREADS=1, so the 1-worker run asks for --threads CPUs and sets torch's
threads to --threads, as the plain loop does; the 2 workers get --threads / 2 each. Ray also starts its workers at
niceness 15, which on a shared machine hands CPU to everyone else, so this benchmark starts them at the driver's
niceness (RAY_worker_niceness; set it yourself to override). And every mode runs with OMP_WAIT_POLICY=PASSIVE (unless
set): with OpenMP's default spin-waiting, a 2-thread process on a machine whose cores are busy with other work loses
most of its time spinning at barriers while the other thread waits for a core (2 samples/s instead of 35 here), and
by how much differs between processes, which would swamp what Ray costs. Threads, wait policy and niceness of every
mode are in the JSON.

Ray is started in this process (`ray.init(address="local")`, no dashboard; reused when already started) and shut
down at the end. The JSON document goes to stdout (and --json-out), a table to stderr; everything else Ray or the
loop prints goes to stderr.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: no per-clip progress bars
# Inherited by the plain process and the Ray workers (see the docstring: OpenMP's spinning on a busy machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from bench.common import machine, synthetic_data
from flipray.config import config_from_dict, load_config
from flipray.pretext.data import ClipDataset, EpochSampler
from flipray.pretext.models import SpatialAlignmentNet, count_parameters
from flipray.pretext.train import make_loader, make_optimizer, new_state, split_batch, train_one_epoch

MODES = ("plain", "ray_1", "ray_2")


# ---------------------------------------------------------------------------------------------------------------------
# One measurement: identical in the plain process and on every Ray worker

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


def measure(cfg, model, dataset, device, rank: int, world: int, warmup_steps: int, samples: int,
            sync=lambda: None) -> dict:
    """Warm up, then time one run of `samples` global samples; `sync` lines the ranks up first."""
    micro, accum = split_batch(cfg.train.batch_size, world, cfg.train.micro_batch_size)
    optimizer = make_optimizer(model, cfg)
    state = new_state()
    # This rank's shard of epoch after epoch (the sampler jobs/pretext.py uses), so a run can span epochs.
    order = itertools.chain.from_iterable(EpochSampler(len(dataset), cfg.train.seed, epoch, rank=rank, world=world)
                                          for epoch in itertools.count())

    def loader(global_samples: int):
        return Timed(make_loader(dataset, cfg, list(itertools.islice(order, global_samples // world)), micro))

    t_first_step = time.time()
    train_one_epoch(model, loader(warmup_steps * cfg.train.batch_size), optimizer, cfg, device, state, world, accum)
    timed = loader(samples)
    sync()
    t0 = time.perf_counter()
    stats = train_one_epoch(model, timed, optimizer, cfg, device, state, world_size=world, accum_steps=accum)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": stats["n"] * world / seconds, "data_wait_fraction": timed.wait / seconds,
            "t_first_step": t_first_step, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "niceness": os.nice(0)}


def bench_worker(config: dict):
    """A Ray Train worker: jobs.pretext.train_worker's setup (DDP model, sharded data) without MLflow/checkpoints."""
    import ray.train
    import ray.train.torch
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
    result = measure(cfg, model, dataset, device, rank, world, config["warmup"], config["samples"], sync)
    # Ray Train v2 hands the driver only metrics that come with a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report({**result, "data_prep_s": data_prep_s},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


# ---------------------------------------------------------------------------------------------------------------------
# The driver

def plain_process(cfg, threads: int, warmup: int, samples: int) -> dict:
    """The plain loop, in a fresh interpreter without Ray (a spawned process), as `flipray train-pretext` runs."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    model = SpatialAlignmentNet(cfg)
    t0 = time.time()
    dataset = ClipDataset(cfg, "train", train=True)
    data_prep_s = time.time() - t0
    r = measure(cfg, model, dataset, torch.device("cpu"), 0, 1, warmup, samples)
    return {**r, "data_prep_s": data_prep_s}


def run_plain(cfg, threads: int, warmup: int, samples: int) -> dict:
    t_start = time.time()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        r = pool.submit(plain_process, cfg, threads, warmup, samples).result()
    return {**r, "workers": 1, "startup_s": r["t_first_step"] - t_start, "wall_s": time.time() - t_start}


def run_ray(cfg, threads: int, warmup: int, samples: int, workers: int, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    per_worker = max(threads // workers, 1)
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={"cfg": cfg.to_dict(), "threads": per_worker, "warmup": warmup, "samples": samples},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(name=f"bench-{workers}w-{time.time_ns()}", storage_path=storage))
    t_start = time.time()
    r = trainer.fit().metrics  # rank 0's report
    return {**r, "workers": workers, "startup_s": r["t_first_step"] - t_start, "wall_s": time.time() - t_start}


def summarise(rounds: list[dict]) -> dict:
    sps = [r["samples_per_s"] for r in rounds]
    last = rounds[-1]
    return {"samples_per_s": {"median": statistics.median(sps), "min": min(sps), "max": max(sps), "runs": sps},
            "workers": last["workers"], "threads_per_worker": last["threads"],
            "omp_num_threads": last["omp_num_threads"], "omp_wait_policy": last["omp_wait_policy"],
            "niceness": last["niceness"],
            **{k: statistics.median(r[k] for r in rounds)
               for k in ("data_wait_fraction", "startup_s", "data_prep_s", "wall_s")}}


def run(config: str = "demo", overrides: list[str] | None = None, data: str | None = None, clips: int = 48,
        samples: int = 320, repeats: int = 5, warmup: int = 3, threads: int | None = None,
        modes: tuple[str, ...] = MODES) -> dict:
    """The training benchmark as a dict: setup, per-mode summaries, ratios to plain (see the module docstring)."""
    import ray
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    threads = threads or torch.get_num_threads()
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    root = data or synthetic_data(clips, 4.0)
    cfg = load_config(config, ["data.cache=true", "data.num_workers=0", *(overrides or []), f"data.root={root}"])
    bs = cfg.train.batch_size
    samples = -(-samples // bs) * bs
    setup = {"config": cfg.preset, "data": str(cfg.data.root), "cache": cfg.data.cache, "batch_size": bs,
             "samples_per_run": samples, "rounds": repeats, "warmup_steps": warmup, "threads": threads,
             "parameters": count_parameters(SpatialAlignmentNet(cfg)), "overrides": list(overrides or [])}
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    rounds = {mode: [] for mode in modes}
    started_ray = False
    if any(m.startswith("ray") for m in modes) and not ray.is_initialized():
        from flipray import raylocal
        raylocal.start_local(max(threads, 2), logging_level="warning", log_to_driver=False)  # a failing worker still raises, with its traceback, from trainer.fit()
        started_ray = True
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as storage:
            for i in range(repeats):
                for mode in modes[i % len(modes):] + modes[:i % len(modes)]:  # rotate: none always first or last
                    r = run_plain(cfg, threads, warmup, samples) if mode == "plain" else \
                        run_ray(cfg, threads, warmup, samples, int(mode[-1]), storage)
                    rounds[mode].append(r)
                    print(f"{cfg.preset} round {i + 1}/{repeats} {mode}: {r['samples_per_s']:.2f} samples/s, "
                          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        if started_ray:
            ray.shutdown()
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    summary = {mode: summarise(rounds[mode]) for mode in modes}
    ratios = {}
    if "plain" in summary:
        plain = summary["plain"]["samples_per_s"]["median"]
        for mode in (m for m in modes if m != "plain"):
            ratios[f"{mode}/plain"] = summary[mode]["samples_per_s"]["median"] / plain
            ratios[f"{mode}/plain per round"] = [r["samples_per_s"] / p["samples_per_s"]
                                                 for r, p in zip(rounds[mode], rounds["plain"])]
    return {"load_average_1_5_15": load, "setup": setup, "modes": summary, "ratios": ratios}


def table(report: dict) -> str:
    header = (f"{'mode':6} {'workers':>7} {'threads':>7} {'samples/s median (min-max)':>27} {'data wait':>9} "
              f"{'startup s':>9} {'wall s':>6}")
    lines = [header]
    for name, m in report["modes"].items():
        s = m["samples_per_s"]
        lines.append(f"{name:6} {m['workers']:7d} {m['threads_per_worker']:7d} {s['median']:13.2f} ({s['min']:5.2f}-"
                     f"{s['max']:5.2f}) {m['data_wait_fraction']:9.0%} {m['startup_s']:9.1f} {m['wall_s']:6.1f}")
    lines += [f"{k}: {v:.2f}" for k, v in report["ratios"].items() if not k.endswith("per round")]
    return "\n".join(lines)


def json_stdout():
    """The real stdout as a file, with fd 1 pointed at stderr: Ray workers' output is forwarded to the driver's
    stdout, and stdout is for the JSON document only."""
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="preset or YAML file (default: demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--data", default=None, help="dataset root (default: synthetic clips kept under data/bench)")
    p.add_argument("--clips", type=int, default=48, help="synthetic clips when --data is not given")
    p.add_argument("--samples", type=int, default=320, help="global samples per timed run (rounded up to batches)")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each measures every mode once")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the plain loop = CPUs (and threads) of the 1-worker run, split over 2")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write the JSON here")
    args = p.parse_args(argv)
    stdout = json_stdout()
    report = {"machine": machine(), **run(args.config, args.set, args.data, args.clips, args.samples, args.repeats,
                                          args.warmup, args.threads, tuple(args.modes.split(",")))}
    print(table(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    stdout.write(text + "\n")
    stdout.flush()
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
