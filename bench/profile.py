"""Profile the CPU training step (torch.profiler) and measure the data-path fixes before/after in one sitting.

    python -m bench.profile                      # demo preset, the real loader (cached clips, in-process augment)
    python -m bench.profile --compare --rounds 4 # + the same profile and timings with the pre-fix data path

The profile runs `flipray.pretext.train.train_one_epoch` on the demo preset with the loader `flipray.pretext.train.make_loader`
builds, over `--steps` optimizer steps after a warm-up, and splits the time into regions: the next batch (data: our
augmentation, log-mel, collate), the model's forward, the backward pass (autograd nodes), the optimizer, and the rest
(the loop's Python). It prints those shares and the operators with the most self CPU time.

--compare times, alternating rounds so load changes hit both alike, with the functions as they were before the
profile led to changing them (copies below of augment_frames, the cache's frame gather and collate: the bodies of
commit 81d1781 with today's signatures) and as they are now:
  demo step      plain-loop samples/s of the demo preset (cached clips, augmentation in the training process)
  paper sample   ClipDataset.__getitem__ of the paper preset, uncached: torchcodec decode + augment + log-mel
  paper loader   a DataLoader with 2 worker processes and batch 8 over the same uncached paper-preset clips
The JSON goes to stdout (and --json-out), the tables to stderr.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import flipray.pretext.data
import flipray.pretext.train
from bench.common import machine, synthetic_data
from flipray.config import load_config
from flipray.pretext.data import IMAGENET_MEAN, IMAGENET_STD, ClipDataset, EpochSampler
from flipray.pretext.models import SpatialAlignmentNet
from flipray.pretext.train import make_loader, make_optimizer, new_state, train_one_epoch

# ---------------------------------------------------------------------------------------------------------------------
# The code as it was before the profile (bodies of commit 81d1781), to measure the change in the same sitting

def augment_frames_before(frames, p, crop, crop_w=None):
    """The pre-fix augment_frames: a strided float copy, then a new tensor per step, then a contiguous copy."""
    x = frames[:, p.crop_y:p.crop_y + crop, p.crop_x:p.crop_x + (crop_w or crop)].permute(0, 3, 1, 2).float() / 255.0
    if p.brightness != 1.0:
        x = x * p.brightness
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    if p.contrast != 1.0:
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * p.contrast + gray.mean(dim=(2, 3), keepdim=True)
    if p.saturation != 1.0:
        x = (x - gray) * p.saturation + gray
    x = x.clamp(0.0, 1.0)
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).contiguous()


def collate_before(samples):
    """The pre-fix collate: torch.stack into private memory (a DataLoader worker then copies it to shared memory)."""
    kept = [s for s in samples if s is not None]
    batch = {"skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    for k in ("video", "audio", "label"):
        batch[k] = torch.stack([s[k] for s in kept])
    batch["clip_id"] = [s["clip_id"] for s in kept]
    batch["start_s"] = torch.tensor([s["start_s"] for s in kept])
    return batch


def take_frames_before(frames, indices):
    """The pre-fix gather of a window's frames from the RAM cache: advanced indexing with a Python list."""
    return frames[indices]


CURRENT = {"augment_frames": flipray.pretext.data.augment_frames, "collate": flipray.pretext.data.collate,
           "take_frames": flipray.pretext.data.take_frames}


def use(version: str) -> None:
    """Install the "before" or "after" data-path functions where the library looks them up."""
    before = version == "before"
    flipray.pretext.data.augment_frames = augment_frames_before if before else CURRENT["augment_frames"]
    flipray.pretext.data.take_frames = take_frames_before if before else CURRENT["take_frames"]
    flipray.pretext.data.collate = collate_before if before else CURRENT["collate"]
    flipray.pretext.train.collate = flipray.pretext.data.collate  # make_loader's collate_fn


# ---------------------------------------------------------------------------------------------------------------------
# The profile

class Labelled:
    """A loader whose every next batch is one profiler region."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        it = iter(self.loader)
        while True:
            with record_function("## data: next batch ##"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


class LabelledModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, video, audio):
        with record_function("## model forward ##"):
            return self.model(video, audio)


def profile_step(cfg, dataset, steps: int, rows: int = 15) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = LabelledModel(SpatialAlignmentNet(cfg))
    optimizer = make_optimizer(model, cfg)
    state = new_state()
    bs = cfg.train.batch_size
    order = itertools.chain.from_iterable(EpochSampler(len(dataset), cfg.train.seed, e) for e in itertools.count())

    def loader(n_steps):
        return Labelled(make_loader(dataset, cfg, list(itertools.islice(order, n_steps * bs)), bs))

    train_one_epoch(model, loader(2), optimizer, cfg, "cpu", state)  # warm-up: allocator, oneDNN primitives
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        train_one_epoch(model, loader(steps), optimizer, cfg, "cpu", state)
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}

    def total(pred) -> float:
        return sum(e.cpu_time_total for e in averages if pred(e.key)) / 1e6

    regions = {"data (augment, log-mel, collate)": total(lambda k: k == "## data: next batch ##"),
               "model forward": total(lambda k: k == "## model forward ##"),
               "backward": total(lambda k: k.startswith("autograd::engine::evaluate_function")),
               "optimizer step + zero_grad": total(lambda k: k.startswith("Optimizer."))}
    regions["loop and other Python"] = max(wall - sum(regions.values()), 0.0)
    self_total = sum(e.self_cpu_time_total for e in averages) / 1e6
    top = sorted((e for e in averages if not e.key.startswith("## ")), key=lambda e: -e.self_cpu_time_total)[:rows]
    return {"steps": steps, "batch_size": bs, "wall_s": wall, "samples_per_s": steps * bs / wall,
            "regions_s": regions, "regions_share": {k: v / wall for k, v in regions.items()},
            "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                         "share_of_self_cpu": e.self_cpu_time_total / 1e6 / self_total, "calls": e.count}
                        for e in top],
            "data_ops": _data_ops(prof, by_name)}


def _data_ops(prof, by_name) -> list[dict]:
    """Self CPU time of the operators run inside the data region (ours), largest first."""
    acc: dict[str, list[float]] = {}
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "## data: next batch ##"]
    for e in prof.events():
        if e.name.startswith("## ") or not any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans):
            continue
        a = acc.setdefault(e.name, [0.0, 0])
        a[0] += e.self_cpu_time_total / 1e3
        a[1] += 1
    return [{"op": k, "self_cpu_ms": v[0], "calls": v[1]} for k, v in sorted(acc.items(), key=lambda kv: -kv[1][0])]


# ---------------------------------------------------------------------------------------------------------------------
# Before / after

def demo_step_rate(cfg, dataset, samples: int) -> float:
    torch.manual_seed(cfg.train.seed)
    model = SpatialAlignmentNet(cfg)
    optimizer = make_optimizer(model, cfg)
    state = new_state()
    bs = cfg.train.batch_size
    order = list(itertools.islice(itertools.chain.from_iterable(
        EpochSampler(len(dataset), cfg.train.seed, e) for e in itertools.count()), samples + bs))
    train_one_epoch(model, make_loader(dataset, cfg, order[:bs], bs), optimizer, cfg, "cpu", state)
    t0 = time.perf_counter()
    stats = train_one_epoch(model, make_loader(dataset, cfg, order[bs:], bs), optimizer, cfg, "cpu", state)
    return stats["n"] / (time.perf_counter() - t0)


def paper_sample_rate(dataset, n: int) -> float:
    dataset[(1, 0)]
    t0 = time.perf_counter()
    for i in range(n):
        dataset[(1, i % len(dataset))]
    return n / (time.perf_counter() - t0)


def paper_loader_rate(dataset, batches: int, batch_size: int = 8, workers: int = 2) -> float:
    from torch.utils.data import DataLoader
    order = [(1, i % len(dataset)) for i in range((batches + 1) * batch_size)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                        collate_fn=flipray.pretext.train.collate, multiprocessing_context="fork")
    it = iter(loader)
    next(it)  # worker start-up
    t0 = time.perf_counter()
    n = sum(b["label"].shape[0] for b in it)
    return n / (time.perf_counter() - t0)


def compare(root: str, rounds: int, demo_samples: int, paper_samples: int) -> dict:
    demo_cfg = load_config("demo", [f"data.root={root}"])
    paper_cfg = load_config("paper", [f"data.root={root}", "data.cache=false"])
    demo_set = ClipDataset(demo_cfg, "train", train=True)
    paper_set = ClipDataset(paper_cfg, "train", train=True)
    results = {v: {"demo_step": [], "paper_sample": [], "paper_loader": []} for v in ("before", "after")}
    for i in range(rounds):
        for version in ("before", "after") if i % 2 == 0 else ("after", "before"):
            use(version)
            r = results[version]
            r["demo_step"].append(demo_step_rate(demo_cfg, demo_set, demo_samples))
            r["paper_sample"].append(paper_sample_rate(paper_set, paper_samples))
            r["paper_loader"].append(paper_loader_rate(paper_set, max(paper_samples // 8, 2)))
            print(f"round {i + 1}/{rounds} {version}: " + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in r.items()) +
                  f"; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    use("after")
    out = {}
    for key in ("demo_step", "paper_sample", "paper_loader"):
        b, a = results["before"][key], results["after"][key]
        out[key] = {"before_per_s": statistics.median(b), "after_per_s": statistics.median(a),
                    "speedup": statistics.median(a) / statistics.median(b),
                    "speedup_per_round": [x / y for x, y in zip(a, b)], "before_runs": b, "after_runs": a}
    return out


def markdown(report: dict) -> str:
    p, b = report["profile"], report.get("profile_before")
    head = (f"Demo preset, batch {p['batch_size']}, {p['steps']} steps profiled: {p['samples_per_s']:.1f} samples/s "
            f"under the profiler" + (f" ({b['samples_per_s']:.1f} with the pre-fix data path)." if b else "."))
    if b:
        lines = [head, "", "| region | seconds | share | before the fixes: seconds | share |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {p['regions_share'][k]:.0%} | {b['regions_s'][k]:.2f} | "
                  f"{b['regions_share'][k]:.0%} |" for k, v in p["regions_s"].items()]
    else:
        lines = [head, "", "| region | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {p['regions_share'][k]:.0%} |" for k, v in p["regions_s"].items()]
    lines += ["", "| operator (top by self CPU) | self CPU ms | share | calls |", "|---|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['self_cpu_ms']:.0f} | {o['share_of_self_cpu']:.1%} | {o['calls']} |"
              for o in p["top_ops"]]
    for name, prof in (("", p), ("before the fixes: ", b)):
        if prof:
            lines += ["", f"| {name}operator inside the data region | self CPU ms | calls |", "|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_cpu_ms']:.1f} | {o['calls']} |" for o in prof["data_ops"][:10]]
    if "compare" in report:
        lines += ["", "| measurement | before (per s) | after (per s) | speedup (median; per round) |",
                  "|---|---|---|---|"]
        for key, c in report["compare"].items():
            lines.append(f"| {key} | {c['before_per_s']:.2f} | {c['after_per_s']:.2f} | {c['speedup']:.2f} "
                         f"({', '.join(f'{x:.2f}' for x in c['speedup_per_round'])}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset root (default: 48 synthetic 4-s clips, cached)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps profiled")
    p.add_argument("--compare", action="store_true", help="also time the pre-fix data path against today's")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--demo-samples", type=int, default=160)
    p.add_argument("--paper-samples", type=int, default=16)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    root = str(args.data or synthetic_data(48, 4.0))
    report = {"machine": machine(), "data": root}
    cfg = load_config("demo", [f"data.root={root}"])
    dataset = ClipDataset(cfg, "train", train=True)
    report["profile"] = profile_step(cfg, dataset, args.steps)
    if args.compare:
        use("before")
        report["profile_before"] = profile_step(cfg, dataset, args.steps)
        use("after")
        report["compare"] = compare(root, args.rounds, args.demo_samples, args.paper_samples)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(markdown(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
