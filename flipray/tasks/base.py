"""What every downstream task shares: its clips in RAM, the pretext network it starts from, and the trial contract.

A downstream task is a module of flipray/tasks/ (flipray.tasks.registry() finds it) with

    ORDER = 3                                                             # its place in the report (paper order)
    TABLE = {"task": ..., "table": "Table 3", "metrics": [...], "primary": ..., "higher_is_better": {...}}
    METHODS = {"flip": {"label": "Flip (ours)", "pretext": "flip"},      # the table's rows, in order; "pretext"
               "scratch": {"label": "No pretraining", "pretext": None}}   # names the pretext task's weights (None:
                                                                          # same network, random weights)
    PAPER = {"<table>": {"table", "data", "units", "labels", "numbers": {method: {metric: value}}}}  # the paper's
    @dataclass class Config(DownstreamConfig): ...                        # its own knobs, commented defaults
    PRESETS = {"demo": {...}, "small": {...}, "paper": {...}}             # overrides of that dataclass
    def run_trial(cfg, report=None) -> dict                               # one method, trained and evaluated
    SHAPE_FROM = "rotate"                                                 # optional: pretext task of its networks

`run_trial` trains on cfg.train_split and scores cfg.eval_split, calls `report(epoch, metrics)` after every epoch
(Ray Tune's ASHA stops a trial by raising there), and returns

    {"metrics": {name: float}, "per_clip": {name: [float, ...]}, "clip_ids": [...], "history": [{epoch, ...}],
     "figures": {name: png path}}

Plain PyTorch, no Ray or MLflow: jobs/downstream.py runs a table's methods as Ray tasks, tuning/sweep.py runs trials
under Ray Tune. Pretext weights arrive as checkpoint paths (flipray.tracking resolves models:/ URIs job-side).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flipray.config import Config, load_config
from flipray.overrides import UsageError, apply  # noqa: F401  (tasks' configs take overrides like every config)
from flipray.pretext.data import (AudioFeatures, ClipDecodeError, SampleParams, augment_frames, decode_audio,
                                  decode_video, peak_normalise, take_frames, window_frame_indices)
from flipray.pretext.models import SpatialAlignmentNet
from flipray.dataset.store import Store

log = logging.getLogger(__name__)


@dataclass
class DownstreamConfig:
    data_root: str = "data/demo"      # dataset root (folder or s3://): the clip store, as for pretext training
    train_split: str = "train"
    eval_split: str = "test"          # "val" while sweeping, "test" for the table
    method: str = "flip"              # the table row this trial is (the task's METHODS)
    pretext: str = ""                 # checkpoint.pt of the pretext network: its shape, and its weights if pretrained
    pretrained: bool = True           # False: the checkpoint's shape with random weights (the "no pretraining" rows)
    arch: str = "demo"                # pretext preset giving the network's shape when `pretext` is empty
    max_clips: int = 0                # cap on clips per split (0 = all): quick runs and tests
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3                  # task head
    lr_backbone: float = 1e-4         # pretext sub-networks; 0 = frozen
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    out_dir: str = ""                 # where figures and examples go ("" = none written)


def method_spec(cfg: DownstreamConfig, methods: dict) -> dict:
    """The task's METHODS entry of cfg.method (the table row this trial is); an unknown one raises, naming them all."""
    if cfg.method not in methods:
        raise UsageError(f"unknown method {cfg.method!r} for {type(cfg).__module__.rsplit('.', 1)[-1]}; methods are "
                         f"{list(methods)}")
    return methods[cfg.method]


def setup(cfg: DownstreamConfig) -> torch.device:
    """Seed everything from cfg.seed, set torch threads, pick the device."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# ---------------------------------------------------------------------------------------------------------------------
# The pretext network

def pretext_network(cfg: DownstreamConfig) -> tuple[SpatialAlignmentNet, Config]:
    """(network, its pretext Config): the weights of cfg.pretext, or (pretrained=False) a fresh network of the same
    shape, so "no pretraining" rows differ from the others in their weights only. Without a checkpoint the shape
    comes from the `cfg.arch` preset. Seeded by cfg.seed."""
    from flipray.config import config_from_dict
    from flipray.pretext.train import load_checkpoint
    torch.manual_seed(cfg.seed)
    if not cfg.pretext:
        if cfg.pretrained:
            raise UsageError(f"method {cfg.method!r} needs pretext weights: set `pretext` to a checkpoint.pt")
        pcfg = load_config(cfg.arch)
        return SpatialAlignmentNet(pcfg), pcfg
    ckpt = load_checkpoint(cfg.pretext)
    pcfg = config_from_dict(ckpt["config"])
    net = SpatialAlignmentNet(pcfg)
    if cfg.pretrained:
        net.load_state_dict(ckpt["model"])
    return net, pcfg


def param_groups(backbone: torch.nn.Module, head: torch.nn.Module, cfg: DownstreamConfig) -> list[dict]:
    """Optimizer groups: the head at cfg.lr, the pretext sub-networks at cfg.lr_backbone (frozen when 0)."""
    groups = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.lr_backbone > 0:
        groups.append({"params": list(backbone.parameters()), "lr": cfg.lr_backbone})
    else:
        backbone.requires_grad_(False)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Clips in RAM

@dataclass
class Clip:
    row: dict                          # the manifest row
    meta: dict                         # the sidecar (ground truth for synthetic clips)
    frames: torch.Tensor               # uint8 (N, R, R, 3): every stored frame, centre-square, resized
    wave: torch.Tensor                 # float (C, S) at the pretext sample rate; channel 0 = left

    @property
    def clip_id(self) -> str:
        return self.row["clip_id"]


def load_clips(root: str, split: str, resize: int, sample_rate: int, max_clips: int = 0,
               channels: int | None = 2, video: bool = True) -> tuple[list[Clip], dict[str, str]]:
    """Decode a split once into RAM: (clips, skipped {clip_id: reason}). Corrupt clips are skipped and counted.

    Downstream sets are small (the paper's FAIR-Play: 2k clips); a task that outgrows RAM should move to the
    pretext loaders. `max_clips` keeps the first clips in manifest order (deterministic). `video=False` reads audio
    and sidecars only (Clip.frames empty): ~20x faster for the audio-only uses (embedding analysis, DOA)."""
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    store = Store(root)
    rows = store.read_manifest(split)
    if not rows:
        raise ValueError(f"{root}: no clips in split {split!r}")
    if max_clips:
        rows = rows[:max_clips]
    clips, skipped = [], {}
    for row in tqdm(rows, desc=f"decoding {split} {'clips' if video else 'audio'}", unit="clip", leave=False):
        try:
            audio = store.get(row["audio"], row.get("audio_sha256"))
            meta = json.loads(store.get(row["meta"])) if row.get("meta") else {}
            frames = torch.empty(0, dtype=torch.uint8)
            if video:
                frames = decode_video(store.get(row["video"], row.get("video_sha256")), size=resize,
                                      expect_frames=row.get("num_frames"), name=store.url(row["video"]))
            wave = decode_audio(audio, sample_rate, channels=channels, expect_seconds=row.get("duration_s"),
                                name=store.url(row["audio"]))
        except (ClipDecodeError, FileNotFoundError, ValueError) as e:
            skipped[row["clip_id"]] = str(e)
            log.warning("skipping clip %s: %s", row["clip_id"], e)
            continue
        clips.append(Clip(row, meta, frames, wave))
    if not clips:
        raise ValueError(f"{root}: every clip of split {split!r} failed to decode: {skipped}")
    return clips, skipped


def visual_input(clip: Clip, start_frame: int, pcfg: Config, mirror: bool = False) -> torch.Tensor:
    """The pretext network's view of the window starting at `start_frame`: float (T, 3, crop, crop), centre crop,
    no jitter (flipray.pretext.data's evaluation transform); `mirror` flips it left-right."""
    frames = take_frames(clip.frames, window_frame_indices(pcfg, start_frame))
    if mirror:
        frames = frames.flip(2)
    margin = (pcfg.data.resize - pcfg.data.crop) // 2
    return augment_frames(frames, SampleParams(start_frame, margin, margin, 1.0, 1.0, 1.0, False, False),
                          pcfg.data.crop)


def audio_input(wave: torch.Tensor, features: AudioFeatures) -> torch.Tensor:
    """Peak-normalised log-mel features (C', n_mels, T) of a waveform window, as the pretext network was trained."""
    return features(peak_normalise(wave))


def to_device(x: torch.Tensor | None, device) -> torch.Tensor | None:
    """x on `device`; None (a method without that input) stays None."""
    return None if x is None else x.to(device)


def sounding_objects(clip: Clip) -> list[dict]:
    return [o for o in clip.meta.get("objects", []) if o.get("sounding")]


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path
