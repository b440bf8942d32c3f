"""Pretext training in plain PyTorch: the one loop that every launcher (local, Ray Train) runs.

    flipray synth --out data/synth --clips 400 --seed 0
    flipray train-pretext --config demo --set data.root=data/synth
    flipray train-pretext --config demo --run-name my-run --resume      # continue my-run from its checkpoint

A run folder (`train.out_dir/<run name>/`) gets `config.yaml`, `checkpoint.pt` (model, optimizer, samples seen,
position in the epoch, history), `curves.png` and, at the end, `report.json` (flip accuracy per split, samples
seen, wall time). Training is counted in samples, as in the paper, so the learning-rate schedule does not depend
on the batch size or the number of workers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from flipray.atomic import folder_lock, write_bytes
from flipray.config import Config, apply_overrides, config_from_dict, load_config
from flipray.overrides import UsageError, user_errors
from flipray.pretext.data import ClipDataset, EpochSampler, check_data_root, collate, sample_seed, train_sampler
from flipray.pretext.models import SpatialAlignmentNet, count_parameters

log = logging.getLogger(__name__)
RUN_LOCK = ".run.lock"  # in the run folder while a process trains into it (flipray.atomic.folder_lock)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def lr_at(samples_seen: int, cfg: Config) -> float:
    """Learning rate after `samples_seen` samples: linear warmup, then constant or cosine to zero."""
    t = cfg.train
    if t.warmup_samples and samples_seen < t.warmup_samples:
        return t.lr * (samples_seen + 1) / t.warmup_samples
    if t.schedule == "cosine":
        progress = min((samples_seen - t.warmup_samples) / max(t.total_samples - t.warmup_samples, 1), 1.0)
        return t.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard for SGD on ResNets).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.momentum, 0.999))
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)


def make_loader(dataset, cfg: Config, sampler, batch_size: int) -> DataLoader:
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      multiprocessing_context="spawn" if workers and torch.cuda.is_available() else None)


def split_batch(batch_size: int, world_size: int, micro_batch_size: int = 0) -> tuple[int, int]:
    """(per-worker micro-batch, accumulation steps) that keep the global batch at `batch_size` for any world size.

    With micro_batch_size 0 each worker takes batch_size / world_size in one pass; a smaller micro-batch (GPU memory)
    accumulates gradients over several passes.
    """
    if batch_size % world_size:
        raise ValueError(f"train.batch_size {batch_size} is not divisible by {world_size} workers")
    per_worker = batch_size // world_size
    micro = micro_batch_size or per_worker
    if per_worker % micro:
        raise ValueError(f"train.micro_batch_size {micro} does not divide the per-worker batch {per_worker} "
                         f"(batch_size {batch_size} / {world_size} workers)")
    return micro, per_worker // micro


def prepare_model(model: torch.nn.Module, cfg: Config, device, channels_last: bool | None = None) -> torch.nn.Module:
    """The model on `device` as every trainer uses it: NHWC convolutions on CUDA when train.channels_last
    (`channels_last` forces it, for tests). 2-D convolutions take channels_last, 3-D ones (model.variant=motion's
    mc3_18) channels_last_3d: Module.to(memory_format=channels_last) refuses a 5-D weight."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last is None:
        channels_last = cfg.train.channels_last and device.type == "cuda"
    if channels_last:
        for m in model.modules():
            weight = getattr(m, "weight", None)
            if next(m.children(), None) is None and isinstance(weight, torch.Tensor) and weight.dim() in (4, 5):
                m.to(memory_format=torch.channels_last if weight.dim() == 4 else torch.channels_last_3d)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Sample accounting: an order-independent digest of the (epoch, item) pairs trained on, mergeable over ranks

DIGEST_MOD = 2_147_483_647  # 2^31 - 1: per-rank sums stay exact in an int64 all-reduce over any world size


def sample_digest(epoch: int, items) -> list[int]:
    """[count, h1, h2] of the samples (epoch, item): sums of two 31-bit hashes, so a multiset's digest is the same
    in any order and on any split over ranks, and a repeated or skipped sample changes it."""
    h1 = h2 = 0
    for item in items:
        h = sample_seed(0x5eed, epoch, int(item))
        h1 += h % DIGEST_MOD
        h2 += (h >> 31) % DIGEST_MOD
    return [len(items), h1 % DIGEST_MOD, h2 % DIGEST_MOD]


def add_digest(digests: dict, epoch: int, digest: list[int]) -> None:
    """digests[epoch] += digest (mod DIGEST_MOD)."""
    old = digests.get(epoch, [0, 0, 0])
    digests[epoch] = [old[0] + digest[0], (old[1] + digest[1]) % DIGEST_MOD, (old[2] + digest[2]) % DIGEST_MOD]


def all_reduce_sum(values: list, world_size: int = 1, dtype=torch.int64) -> list:
    """Elementwise sum over the ranks (identity in one process)."""
    if world_size < 2 or not torch.distributed.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=dtype)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def merge_pending(state: dict, world_size: int = 1) -> None:
    """Fold every rank's digests since the last merge into state["sample_digests"] (a collective: all ranks call it
    at the same points, before a checkpoint and at the end)."""
    pending = state.setdefault("pending_digests", {})
    digests = state.setdefault("sample_digests", {})
    epochs = sorted(pending)  # the same on every rank: train_one_epoch opens an entry per epoch on every rank
    flat = all_reduce_sum([v for e in epochs for v in pending[e]], world_size)
    for i, e in enumerate(epochs):
        add_digest(digests, int(e), [flat[3 * i], flat[3 * i + 1] % DIGEST_MOD, flat[3 * i + 2] % DIGEST_MOD])
    state["pending_digests"] = {}


def planned_digests(cfg: Config, epoch_items: int) -> dict:
    """{epoch: digest} of the samples a run of train.total_samples must train on, at any world size and through any
    restarts: each epoch's order (EpochSampler) in steps of train.batch_size until samples_seen reaches the total.
    (Clips skipped as undecodable are logged and missing from a run's record.)"""
    plan, seen, epoch = {}, 0, 0
    while seen < cfg.train.total_samples:
        order = train_sampler(cfg, epoch_items, epoch).order()
        for s in range(0, len(order), cfg.train.batch_size):
            real = [i for i in order[s:s + cfg.train.batch_size] if i >= 0]
            add_digest(plan, epoch, sample_digest(epoch, real))
            seen += len(real)
            if seen >= cfg.train.total_samples:
                break
        epoch += 1
    return plan


def digest_mismatch(actual: dict, plan: dict) -> list[str]:
    """What differs between a run's sample_digests and the plan, one line per epoch (empty: exactly the plan)."""
    actual = {int(e): list(d) for e, d in actual.items() if d[0]}
    return [f"epoch {e}: {actual.get(e, [0])[0]} samples trained, {plan.get(e, [0])[0]} planned"
            + ("" if actual.get(e, [0])[0] != plan.get(e, [0])[0] else " (different samples)")
            for e in sorted(set(actual) | set(plan)) if actual.get(e) != list(plan.get(e, []))]


def _with_last(iterable):
    """(item, is_last) pairs: one item of lookahead, so the epoch's last micro-batch is known when it arrives."""
    it = iter(iterable)
    try:
        prev = next(it)
    except StopIteration:
        return
    for cur in it:
        yield prev, False
        prev = cur
    yield prev, True


def train_one_epoch(model, loader, optimizer, cfg: Config, device, state: dict, world_size: int = 1,
                    accum_steps: int = 1, on_step=None, stop_at: int | None = None,
                    epoch_items: int | None = None) -> dict:
    """One pass over `loader`; `state` (samples_seen, step, epoch_pos, pending_digests) is updated in place.

    An optimizer step takes `accum_steps` micro-batches; DDP all-reduces on the last one only, and the epoch's last
    micro-batch always ends a step (synced), even when the epoch does not divide into whole steps. The loss is the
    sum over a step's samples (weight 0 for pads) divided by the global batch train.batch_size, so a step's gradient
    is the same whatever the world size. With `epoch_items` (the epoch's length; EpochSampler's steps of
    train.batch_size positions) a step advances `epoch_pos` and `samples_seen` by the positions it covered, the same
    on every rank at any world size; without it, by the samples drawn. `on_step(state, metrics)` runs after every
    optimizer step (logging, evaluation, checkpoints, fault hooks). Stops once samples_seen reaches `stop_at`.
    On CUDA, `train.amp` runs the forward pass in bfloat16 autocast.
    """
    model.train()
    device = torch.device(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda")
    per_rank = cfg.train.batch_size / world_size  # loss normaliser: the gradient is sum / global batch after DDP
    totals = {"loss": 0.0, "correct": 0, "n": 0, "skipped": 0}
    wait = compute = 0.0
    micro = drawn_in_step = 0
    step_loss = step_correct = step_n = 0.0
    last_inputs = None
    t_prev = t_step = time.perf_counter()
    for batch, last in _with_last(loader):
        t_data = time.perf_counter()
        # opened on every rank for every batch: merge_pending's all-reduce needs the same epochs everywhere
        pending = state.setdefault("pending_digests", {}).setdefault(state.get("epoch", 0), [0, 0, 0])
        totals["skipped"] += batch["skipped"]
        drawn_in_step += batch["skipped"] + (batch["label"].shape[0] if "label" in batch else 0)
        if "video" in batch:
            weight = batch.get("weight", torch.ones(batch["label"].shape[0]))
            inputs = (batch["video"].to(device, non_blocking=True), batch["audio"].to(device, non_blocking=True),
                      batch["label"].to(device, non_blocking=True), weight.to(device))
            last_inputs = inputs
            if "item" in batch:
                real = batch["item"][weight.cpu() > 0].tolist()
                d = sample_digest(state.get("epoch", 0), real)
                pending[:] = [pending[0] + d[0], (pending[1] + d[1]) % DIGEST_MOD, (pending[2] + d[2]) % DIGEST_MOD]
        elif world_size > 1 and last_inputs is not None:
            # Every clip of this micro-batch failed to decode: DDP still needs this rank in the all-reduce, so it
            # contributes a zero-weighted pass over its previous batch.
            inputs = (*last_inputs[:3], torch.zeros_like(last_inputs[3]))
        else:
            inputs = None
        if micro == 0:
            lr = lr_at(state["samples_seen"], cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
        micro += 1
        final = micro == accum_steps or last
        if inputs is not None:
            video, audio, label, weight = inputs
            sync = final or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), amp:
                logits = model(video, audio).float()
                losses = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
            ((losses * weight).sum() / per_rank).backward()
            kept = weight > 0
            n = int(kept.sum())
            if n:
                step_loss += losses.detach()[kept].sum().item()
                step_correct += ((logits.detach()[kept] > 0).float() == label[kept]).sum().item()
                step_n += n
        wait += t_data - t_prev
        if final:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t_end = time.perf_counter()
            state["step"] += 1
            if epoch_items is not None:
                advance = min(cfg.train.batch_size, max(epoch_items - state["epoch_pos"], 0))
                state["epoch_pos"] += advance
            else:
                advance = drawn_in_step * world_size
                state["epoch_pos"] += advance
            state["samples_seen"] += advance
            micro = drawn_in_step = 0
            totals["loss"] += step_loss
            totals["correct"] += step_correct
            totals["n"] += step_n
            metrics = {"loss": step_loss / max(step_n, 1), "acc": step_correct / max(step_n, 1), "lr": lr,
                       "samples_per_s": step_n * world_size / max(t_end - t_step, 1e-9)}
            step_loss = step_correct = step_n = 0.0
            t_step = t_end
            if on_step is not None:
                on_step(state, metrics)
        # the optimizer step counts as compute; evaluation and checkpoints in on_step count as neither
        compute += (t_end if final else time.perf_counter()) - t_data
        t_prev = time.perf_counter()
        if final and stop_at is not None and state["samples_seen"] >= stop_at:
            break
    n = max(totals["n"], 1)
    return {"loss": totals["loss"] / n, "acc": totals["correct"] / n, "n": int(totals["n"]),
            "skipped": totals["skipped"], "data_wait_fraction": wait / max(wait + compute, 1e-9),
            "samples_per_s": totals["n"] * world_size / max(wait + compute, 1e-9)}


@torch.no_grad()
def evaluate(model, loader, device, groups: dict[str, str] | None = None, world_size: int = 1,
             keep_logits: bool = False) -> dict:
    """Flip accuracy and BCE loss; with ClipDataset(train=False) every clip is scored unswapped and swapped.
    `groups` (clip_id -> capture group, ClipDataset.capture_groups) adds acc_by_capture: {group: {acc, n}};
    `keep_logits` adds the split's "logits" and "labels" (CPU tensors, every rank's, gathered).

    Each rank scores its shard (EpochSampler with rank/world; pads have weight 0) and the sums are all-reduced, so
    every rank returns the whole split's figures."""
    model.eval()
    total_loss, total_correct, total_n, skipped = 0.0, 0, 0, 0
    by_group: dict[str, list[int]] = {}
    kept_logits, kept_labels = [], []
    for batch in loader:
        skipped += batch["skipped"]
        if "video" not in batch:
            continue
        logits = model(batch["video"].to(device), batch["audio"].to(device)).float()
        label = batch["label"].to(device)
        kept = batch.get("weight", torch.ones(label.shape[0])).to(device) > 0
        logits, label = logits[kept], label[kept]
        if keep_logits:
            kept_logits.append(logits.detach().cpu())
            kept_labels.append(label.detach().cpu())
        total_loss += F.binary_cross_entropy_with_logits(logits, label, reduction="sum").item()
        right = ((logits > 0).float() == label).cpu()
        total_correct += int(right.sum().item())
        total_n += int(label.shape[0])
        if groups is not None:
            clip_ids = [c for c, k in zip(batch["clip_id"], kept.cpu().tolist()) if k]
            for clip_id, ok in zip(clip_ids, right.tolist()):
                tally = by_group.setdefault(groups.get(clip_id, "unknown"), [0, 0])
                tally[0] += int(ok)
                tally[1] += 1
    if world_size > 1:
        total_loss, total_correct, total_n, skipped = all_reduce_sum(  # float64: counts exact below 2^53
            [total_loss, total_correct, total_n, skipped], world_size, torch.float64)
        total_correct, total_n, skipped = int(total_correct), int(total_n), int(skipped)
        if groups is not None and torch.distributed.is_initialized():
            names = sorted(set(groups.values()) | {"unknown"})  # every rank knows every group: same order
            sums = all_reduce_sum([v for g in names for v in by_group.get(g, [0, 0])], world_size)
            by_group = {g: sums[2 * k:2 * k + 2] for k, g in enumerate(names) if sums[2 * k + 1]}
    out = {"loss": total_loss / max(total_n, 1), "acc": total_correct / max(total_n, 1), "n": total_n,
           "skipped": skipped}
    if groups is not None:
        out["acc_by_capture"] = {g: {"acc": c / n, "n": n} for g, (c, n) in sorted(by_group.items())}
    if keep_logits:
        pair = (torch.cat(kept_logits) if kept_logits else torch.zeros(0),
                torch.cat(kept_labels) if kept_labels else torch.zeros(0))
        if world_size > 1 and torch.distributed.is_initialized():
            pairs = [None] * world_size
            torch.distributed.all_gather_object(pairs, pair)
            pair = (torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs]))
        out["logits"], out["labels"] = pair
    return out


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the mean BCE of sigmoid(logits / T) (temperature scaling, Guo et al. 2017): a
    search over 401 log-spaced T in [0.05, 20], which cannot diverge on a small validation split."""
    logits, labels = logits.detach().double().flatten(), labels.detach().double().flatten()
    if logits.numel() == 0:
        return 1.0
    temps = torch.logspace(math.log10(0.05), math.log10(20.0), 401, dtype=torch.float64)
    nll = torch.stack([F.binary_cross_entropy_with_logits(logits / t, labels) for t in temps])
    return float(temps[int(nll.argmin())])


def calibrate(model, loader, device, world_size: int = 1) -> dict:
    """Fit the model's temperature on a held-out loader (the validation split) and store it in the model (every rank
    gets the same value: the logits are gathered). Returns {temperature, samples, nll_before, nll_after}."""
    res = evaluate(model, loader, device, world_size=world_size, keep_logits=True)
    t = fit_temperature(res["logits"], res["labels"])
    getattr(model, "module", model).temperature.fill_(t)

    def nll(temp: float) -> float:
        if not res["n"]:
            return float("nan")
        return float(F.binary_cross_entropy_with_logits(res["logits"].double() / temp, res["labels"].double()))
    return {"temperature": round(t, 4), "samples": res["n"], "nll_before": round(nll(1.0), 4),
            "nll_after": round(nll(t), 4)}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and figures

def save_checkpoint(path: Path, model, optimizer, state: dict, cfg: Config):
    """Everything needed to resume: weights, optimizer, progress, history, config (atomic write)."""
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
               "config": cfg.to_dict(), "rng": torch.get_rng_state()}
    serialized = io.BytesIO()
    torch.save(payload, serialized)
    write_bytes(path, serialized.getvalue())  # a full disk: an OSError naming the checkpoint, the old one kept


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by save_checkpoint (tensors and plain types only: weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint there") from None
    except pickle.UnpicklingError:  # torch's own text is many lines and suggests weights_only=False: not here
        raise ValueError(f"{path}: not a flipray checkpoint (torch.load with weights_only=True refuses it: not a "
                         f"torch.save file, or one holding more than tensors and plain values)") from None
    except Exception as e:
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise ValueError(f"{path}: not a flipray checkpoint ({type(e).__name__}: {first_line})") from None


# Settings that make the network or what its first layer reads: a resumed run keeps them (its weights fit no other).
FIXED_ON_RESUME = ("model.", "train.task", "data.audio_channels", "data.sample_rate", "data.window_s", "data.n_fft",
                   "data.win_length", "data.hop_length", "data.n_mels")


def resume_conflict(saved: dict, cfg: Config, how: str) -> None:
    """A UsageError when `cfg` changes a FIXED_ON_RESUME setting of the run it continues (`saved`: that run's flat
    config, values as they are or as the strings MLflow params hold; a key it lacks, from an older version, is not
    compared). `how` says how the run is being continued, for the message."""
    changed = [f"{k} {saved[k]} -> {v}" for k, v in cfg.flat().items()
               if k.startswith(FIXED_ON_RESUME) and k in saved and str(saved[k]) != str(v)]
    if changed:
        raise UsageError(f"{how}: the run's network cannot change ({'; '.join(changed)}): drop those --set, or "
                         f"start a new run (another --run-name)")


def load_model(path: str | Path) -> tuple[SpatialAlignmentNet, Config]:
    """A trained SpatialAlignmentNet (eval mode) and its config from a checkpoint file."""
    ckpt = load_checkpoint(path)
    # a file torch can load is not yet a checkpoint: a list, a tensor, a string config all load with weights_only
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model"), dict)):
        got = f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a flipray checkpoint (expected a dict with a 'config' dict and a 'model' state "
                         f"dict, got {got})")
    try:
        cfg = config_from_dict(ckpt["config"])
        model = SpatialAlignmentNet(cfg)
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a usable flipray checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return model.eval(), cfg


def plot_curves(history: list[dict], path: Path, title: str = "flip pretext task"):
    """Loss and accuracy against samples seen: train (per step, smoothed) and validation (per evaluation)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [h for h in history if h["kind"] == "train"]
    val = [h for h in history if h["kind"] == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        xs = [h["samples_seen"] for h in train]
        k = max(len(train) // 50, 1)
        smooth = lambda v: [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]
        ax1.plot(xs, smooth([h["loss"] for h in train]), label="train", color="tab:blue")
        ax2.plot(xs, smooth([h["acc"] for h in train]), label="train", color="tab:blue")
    if val:
        xs = [h["samples_seen"] for h in val]
        ax1.plot(xs, [h["loss"] for h in val], "o-", label="val", color="tab:orange")
        ax2.plot(xs, [h["acc"] for h in val], "o-", label="val", color="tab:orange")
    ax2.axhline(0.5, color="gray", ls=":", lw=1)
    for ax, name in ((ax1, "BCE loss"), (ax2, "flip accuracy")):
        ax.set_xlabel("samples seen")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    ax2.set_ylim(0.3, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# main

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="flipray train-pretext", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="preset (demo, small, paper) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.02")
    p.add_argument("--run-name", default=None, help="run folder name (default: <preset>-<variant>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run folder's checkpoint.pt (its config, "
                   "plus any --set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config, args.set)
    if not args.resume:
        check_data_root(cfg)
    run_name = args.run_name or f"{cfg.preset}-{cfg.model.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.out_dir) / run_name
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and not ckpt_path.exists():
        raise UsageError(f"--resume: {run_dir} holds no checkpoint.pt to continue (--run-name names the run)")
    if not args.resume and ckpt_path.exists():
        raise UsageError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or another "
                         f"--run-name")

    def refuse(holder: str) -> None:  # two runs in one folder would overwrite each other's checkpoints
        raise UsageError(f"{run_dir}: another training run is writing into this folder (pid {holder}); give another "
                         f"--run-name, or pass --resume once it has stopped")
    with folder_lock(run_dir, RUN_LOCK, busy=refuse):
        ckpt = None
        if args.resume:
            ckpt = load_checkpoint(ckpt_path)
            # The run's own config wins over the preset; --set still applies (e.g. a larger train.total_samples).
            saved = config_from_dict(ckpt["config"])
            cfg = apply_overrides(config_from_dict(ckpt["config"]), args.set)
            resume_conflict(saved.flat(), cfg, "--resume")
            check_data_root(cfg)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return run(cfg, run_dir, ckpt)


def new_state() -> dict:
    """Training progress, checkpointed: epoch_pos is the global position in the epoch's order (a step boundary);
    sample_digests[epoch] = [count, h1, h2] of the samples trained on, all ranks together (sample_digest)."""
    return {"samples_seen": 0, "step": 0, "epoch": 0, "epoch_pos": 0, "history": [], "train_seconds": 0.0,
            "sample_digests": {}, "pending_digests": {}}


def upgrade_state(state: dict, world_size: int) -> dict:
    """A checkpoint from before global positions (epoch_pos per rank, no digests) in today's form."""
    if "sample_digests" not in state:
        state["epoch_pos"] *= world_size
        state["sample_digests"] = {}
    state["pending_digests"] = {}
    return state


def fit(cfg: Config, model, optimizer, device, state: dict, epoch_items: int, train_loader, validate, save,
        world_size: int = 1, accum_steps: int = 1, on_metrics=None) -> None:
    """The epoch loop every launcher runs: locally (`run` below) and on Ray Train workers (jobs/pretext.py).

    train_loader(epoch, start) -> this worker's batches of `epoch` from global position `start` (EpochSampler with
        step_size=train.batch_size: a step is the same samples at any world size, so a checkpoint resumes on another)
    validate() -> val metrics dict (every rank scores its shard; None where nothing is evaluated)
    save(state) -> persist a checkpoint; called on every worker at the same steps (Ray needs that), after the
        ranks' sample digests are merged into state["sample_digests"]
    on_metrics(kind, state, metrics) -> an extra sink ("train" per step, "val", "epoch"), e.g. MLflow on rank 0
    Evaluation and checkpoints fall every train.eval_every_samples / checkpoint_every_samples (default: an epoch).
    """
    total = cfg.train.total_samples
    every_eval = cfg.train.eval_every_samples or epoch_items
    every_ckpt = cfg.train.checkpoint_every_samples or epoch_items
    marks = {"eval": state["samples_seen"] // every_eval, "ckpt": state["samples_seen"] // every_ckpt}
    t_start, seconds_before = time.time(), state["train_seconds"]
    emit = on_metrics or (lambda kind, state, metrics: None)

    def run_validation():
        res = validate()
        if res is not None:
            state["history"].append({"kind": "val", "samples_seen": state["samples_seen"], **res})
            log.info("samples %d: val loss %.4f, flip accuracy %.3f (%d samples)", state["samples_seen"],
                     res["loss"], res["acc"], res["n"])
            emit("val", state, res)
        model.train()

    def on_step(state, metrics):
        state["history"].append({"kind": "train", "samples_seen": state["samples_seen"], "loss": metrics["loss"],
                                 "acc": metrics["acc"]})
        emit("train", state, metrics)
        if state["step"] % cfg.train.log_every == 0:
            log.info("step %d, samples %d/%d: loss %.4f, acc %.3f, lr %.5f, %.0f samples/s", state["step"],
                     state["samples_seen"], total, metrics["loss"], metrics["acc"], metrics["lr"],
                     metrics["samples_per_s"])
        state["train_seconds"] = seconds_before + time.time() - t_start
        if state["samples_seen"] // every_eval > marks["eval"]:
            marks["eval"] = state["samples_seen"] // every_eval
            run_validation()
        if state["samples_seen"] // every_ckpt > marks["ckpt"]:
            marks["ckpt"] = state["samples_seen"] // every_ckpt
            merge_pending(state, world_size)
            save(state)

    while state["samples_seen"] < total:
        stats = train_one_epoch(model, train_loader(state["epoch"], state["epoch_pos"]), optimizer, cfg, device,
                                state, world_size=world_size, accum_steps=accum_steps, on_step=on_step,
                                stop_at=total, epoch_items=epoch_items)
        log.info("epoch %d: train loss %.4f, acc %.3f, %.1f samples/s, data wait %.0f%%, %d clips skipped",
                 state["epoch"], stats["loss"], stats["acc"], stats["samples_per_s"],
                 100 * stats["data_wait_fraction"], stats["skipped"])
        emit("epoch", state, stats)
        if state["epoch_pos"] >= epoch_items:  # else training stopped mid-epoch at total_samples
            state["epoch"] += 1
            state["epoch_pos"] = 0
    merge_pending(state, world_size)
    state["train_seconds"] = seconds_before + time.time() - t_start
    if not state["history"] or state["history"][-1]["kind"] != "val":
        run_validation()


def evaluate_splits(model, cfg: Config, device, splits=("val", "test"), rank: int = 0, world_size: int = 1,
                    batch_size: int | None = None) -> dict:
    """Flip accuracy per split, every clip scored as recorded and swapped; sharded over `world_size` ranks (each
    scores its share, the counts are all-reduced), the same figures as one process."""
    out = {}
    for split in splits:
        ds = ClipDataset(cfg, split, train=False)
        sampler = EpochSampler(len(ds), cfg.train.seed, shuffle=False, rank=rank, world=world_size)
        loader = make_loader(ds, cfg, sampler, batch_size or max(cfg.train.batch_size // world_size, 1))
        res = evaluate(model, loader, device, ds.capture_groups(), world_size)
        out[split] = {"acc": res["acc"], "loss": res["loss"], "samples": res["n"], "clips_skipped": len(ds.skipped),
                      "acc_by_capture": res["acc_by_capture"]}
    return out


def run(cfg: Config, run_dir: Path, ckpt: dict | None = None) -> dict:
    """Train (or continue) one pretext run in `run_dir`; returns the report dict, also written to report.json."""
    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if cfg.data.loader != "torchcodec":
        raise ValueError("the local trainer reads with the torchcodec loader; data.loader=dali runs under "
                         "jobs/pretext.py on Ray workers")

    train_set = ClipDataset(cfg, "train", train=True)
    val_set = ClipDataset(cfg, "val", train=False)
    model = prepare_model(SpatialAlignmentNet(cfg), cfg, device)
    optimizer = make_optimizer(model, cfg)
    state = new_state()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = upgrade_state(ckpt["state"], 1)
        torch.set_rng_state(ckpt["rng"])
        log.info("resumed %s at %d samples (epoch %d, position %d)", run_dir, state["samples_seen"],
                 state["epoch"], state["epoch_pos"])
    log.info("model %s: %.2fM parameters; %d train / %d val clips; device %s", cfg.model.variant,
             count_parameters(model) / 1e6, len(train_set.clips), len(val_set.clips), device)

    bs = cfg.train.batch_size
    val_loader = make_loader(val_set, cfg, EpochSampler(len(val_set), cfg.train.seed, shuffle=False), bs)
    fit(cfg, model, optimizer, device, state, epoch_items=len(train_set),
        train_loader=lambda epoch, start: make_loader(
            train_set, cfg, train_sampler(cfg, len(train_set), epoch, start), bs),
        validate=lambda: evaluate(model, val_loader, device),
        save=lambda state: save_checkpoint(run_dir / "checkpoint.pt", model, optimizer, state, cfg))
    state["calibration"] = calibrate(model, val_loader, device)
    log.info("calibrated on %d validation samples: temperature %.3f (BCE %.4f -> %.4f)",
             state["calibration"]["samples"], state["calibration"]["temperature"], state["calibration"]["nll_before"],
             state["calibration"]["nll_after"])
    save_checkpoint(run_dir / "checkpoint.pt", model, optimizer, state, cfg)
    plot_curves(state["history"], run_dir / "curves.png",
                f"flip pretext, {cfg.preset} preset, {cfg.model.variant} model")
    accuracy = evaluate_splits(model, cfg, device)
    report = make_report(cfg, run_dir, state, model, accuracy, t0, device, train_set.skipped)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print_summary(report)
    return report


def make_report(cfg: Config, run_dir, state: dict, model, accuracy: dict, t0: float, device, skipped: dict) -> dict:
    return {"run_dir": str(run_dir), "config": cfg.to_dict(), "flip_accuracy": accuracy,
            "samples_seen": state["samples_seen"], "steps": state["step"], "epochs": state["epoch"],
            "parameters": count_parameters(model), "calibration": state.get("calibration"),
            "train_seconds": round(state["train_seconds"], 1),
            "wall_seconds": round(time.time() - t0, 1), "train_clips_skipped": skipped, "device": str(device),
            "torch_threads": torch.get_num_threads()}


def print_summary(report: dict):
    acc, run_dir = report["flip_accuracy"], Path(report["run_dir"])
    print(f"\nflip accuracy: test {acc['test']['acc']:.3f} ({acc['test']['samples']} samples), "
          f"val {acc['val']['acc']:.3f}; {report['samples_seen']} samples seen in {report['train_seconds']:.0f} s "
          f"of training ({report['wall_seconds']:.0f} s wall)")
    by = acc["test"].get("acc_by_capture") or {}
    if by:
        print("test flip accuracy by capture: " + ", ".join(f"{g} {v['acc']:.3f} ({v['n']})" for g, v in by.items()))
    print(f"report: {run_dir / 'report.json'}\ncurves: {run_dir / 'curves.png'}")


if __name__ == "__main__":
    with user_errors("flipray train-pretext"):
        sys.exit(0 if main() else 1)
