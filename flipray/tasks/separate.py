"""Audio-visual source separation (mix-and-separate on stereo audio), the paper's Sec. 5.3 / Table 5.

    python -m jobs.separate --data data/demo --preset demo --local --no-mlflow \
        --pretext flip=runs/dev-demo/checkpoint.pt --out /tmp/sep      # every method, one after another, here
    python -c "from flipray.tasks.base import apply; from flipray.tasks import separate as t; \
        print(t.run_trial(apply(t.Config(pretext='runs/dev-demo/checkpoint.pt'), t.PRESETS['demo']))['metrics'])"
                                        # one method (flip)

Two clips of different scenes are mixed; a U-Net (flipray/tasks/unet.py) conditioned on the pretext network's fused
audio-visual features of one clip's frames masks the mixture's spectrogram to recover that clip. Scored by BSS Eval
(SDR / SIR / SAR, mir_eval) on fixed pairs and l1_mag (Table 5's number). Design and the "second visual features"
row: docs/tasks.md.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flipray.tasks import metrics
from flipray.config import Config as PretextConfig
from flipray.pretext.data import AudioFeatures, sample_seed
from flipray.tasks.base import (Clip, DownstreamConfig, load_clips, method_spec, param_groups, pretext_network, setup,
                                to_device)
from flipray.pretext.models import SpatialAlignmentNet
from flipray.tasks.spatialize import plot_history, prepare_clips
from flipray.tasks.unet import AudioUNet, Chunks, Spectrogram, overlap_add

log = logging.getLogger(__name__)

EVAL_SEED = 2020  # the eval pairs' seed: fixed, so per-clip values pair up across methods and seeds

ORDER = 5  # where its table comes in the report (the paper's order)
TABLE = {
    "task": "separate", "table": "Table 5",
    "metrics": ["sdr", "sir", "sar", "l1_mag", "sdr_mixture"],
    "primary": "sdr",
    "higher_is_better": {"sdr": True, "sir": True, "sar": True, "l1_mag": False, "sdr_mixture": True},
    "paired_metric": "sdr",
    "notes": "Mix-and-separate of two whole stereo test clips (different scenes); the target is the clip whose "
             "frames condition the U-Net. SDR/SIR/SAR (dB) by BSS Eval (mir_eval), per channel, averaged over L/R; "
             "sdr_mixture = the mixture's own SDR (the floor); l1_mag = the training L1 of magnitude spectrograms "
             "(the paper's Table 5 number, lower is better). flip+second: the paper's 'Ours + supervised' with a "
             "second visual feature set in place of ImageNet's (see flipray/tasks/separate.py).",
}

METHODS = {
    "no-visual": {"label": "No audio-visual features", "pretext": None},
    "scratch": {"label": "No pretraining", "pretext": None},
    "mismatch": {"label": "Mismatch task", "pretext": "mismatch"},
    "shift": {"label": "Shift task", "pretext": "shift"},
    "flip": {"label": "Flip task (ours)", "pretext": "flip"},
    "flip+second": {"label": "Flip + second visual features", "pretext": "flip"},
}

# The paper's numbers (Yang, Russell & Salamon, CVPR 2020) as printed, on real data (YouTube-ASMR, FAIR-Play,
# TAU), for orientation; flipray.tasks.tables puts them beside ours. numbers: {method: {metric: value}}.
PAPER = {
    # Table 5: separation test error, the L1 distance of output and target magnitude spectrograms (mean over bins).
    "separate": {
        "table": "Table 5", "data": "YouTube-ASMR and FAIR-Play test sets",
        "units": {},
        "labels": {
            "no-visual": "No visual features",
            "scratch": "No pretraining",
            "mismatch": "Mismatch task",
            "shift": "Shift task",
            "flip": "Flip task (ours)",
            "supervised": "Supervised",
            "flip+supervised": "Ours + supervised",
        },
        "numbers": {
            "no-visual": {"l1_mag_asmr": 0.0946, "l1_mag_fairplay": 0.423},
            "scratch": {"l1_mag_asmr": 0.0953, "l1_mag_fairplay": 0.422},
            "mismatch": {"l1_mag_asmr": 0.0923, "l1_mag_fairplay": 0.423},
            "shift": {"l1_mag_asmr": 0.0918, "l1_mag_fairplay": 0.422},
            "flip": {"l1_mag_asmr": 0.0898, "l1_mag_fairplay": 0.41},
            "supervised": {"l1_mag_asmr": 0.0885, "l1_mag_fairplay": 0.362},
            "flip+supervised": {"l1_mag_asmr": 0.0863, "l1_mag_fairplay": 0.35},
        },
    },
}


@dataclass
class Config(DownstreamConfig):
    chunk_s: float = 0.63             # audio per training example (as flipray/tasks/spatialize.py)
    ngf: int = 64                     # U-Net base width
    cond_proj: int = 64               # features are projected to this many channels at the bottleneck
    flip_p: float = 0.5               # training: each source mirrored (frames flipped, L/R swapped) with this p
    chunks_per_clip: int = 1          # training mixtures per train clip (as the target) per epoch
    infer_hop_frames: int = 1         # hop of the sliding window of whole-clip inference, in video frames
    eval_clips: int = 0               # eval clips scored as targets (0 = all); BSS Eval costs ~1 s per pair
    examples: int = 2                 # pairs written as FLAC (mixture, estimate, truth) to out_dir/examples/
    source_rms: float = 0.1           # every clip is scaled to this RMS before mixing (0 = keep the peak level)
    second_pretext: str = ""          # flip+second: checkpoint.pt of the second visual stream ("" = random, seed+1)
    features: str = "fused"           # the condition: fused (the paper's audio-visual features of the target's frames
                                      # and the mixture) | visual (the target's frames only, as for upmixing)


PRESETS = {
    # ~2-3 min per method on one core with data/demo (480 train clips; 20 whole-clip test pairs).
    "demo": {"ngf": 16, "cond_proj": 32, "epochs": 8, "batch_size": 16, "lr": 2e-3, "lr_backbone": 0.0,
             "infer_hop_frames": 2, "eval_clips": 20, "threads": 1},
    "small": {"ngf": 32, "epochs": 20, "batch_size": 32, "lr": 1e-3, "lr_backbone": 0.0, "chunks_per_clip": 2,
              "eval_clips": 100},
    "paper": {"ngf": 64, "cond_proj": 64, "epochs": 100, "batch_size": 64, "lr": 1e-3, "lr_backbone": 1e-4,
              "weight_decay": 5e-4, "chunks_per_clip": 10, "infer_hop_frames": 1},
}


# ---------------------------------------------------------------------------------------------------------------------
# The head

class Separator(nn.Module):
    """The pretext network's fused features (+ a second visual stream) and the U-Net; forward gives ratio masks."""

    def __init__(self, net: SpatialAlignmentNet | None, pcfg: PretextConfig, cfg: Config,
                 second: SpatialAlignmentNet | None = None):
        super().__init__()
        if cfg.features not in ("fused", "visual"):
            raise ValueError(f"separate features must be 'fused' or 'visual', got {cfg.features!r}")
        self.net, self.second, self.features = net, second, cfg.features
        self.frozen = cfg.lr_backbone <= 0
        self.audio_features = AudioFeatures(pcfg)
        cond = 0
        if net is not None:
            cond = pcfg.model.fusion_dim if cfg.features == "fused" else net.visual.out_dim
            cond += second.visual.out_dim if second is not None else 0
        self.unet = AudioUNet(2, 2, cfg.ngf, cond, cfg.cond_proj, "sigmoid")

    def backbones(self) -> nn.Module:
        return nn.ModuleList([m for m in (self.net, self.second) if m is not None])

    def condition(self, video: torch.Tensor | None, mix: torch.Tensor) -> torch.Tensor | None:
        """(B, frames, 3, H, W) target frames and (B, 2, L) mixture -> (B, D, steps) fused or visual features
        (+ the second visual stream)."""
        if self.net is None:
            return None
        if self.frozen:
            self.backbones().eval()
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            if self.features == "visual":
                cond = self.net.embed_visual(video)
            else:
                peak = mix.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-3)  # peak_normalise, per example
                cond = self.net.features(video, self.audio_features(mix / peak))["fused"]
            if self.second is not None:
                v = F.interpolate(self.second.embed_visual(video), size=cond.shape[-1], mode="linear",
                                  align_corners=False)
                cond = torch.cat([cond, v], dim=1)
        return cond

    def forward(self, video: torch.Tensor | None, mix: torch.Tensor, mix_spec: torch.Tensor) -> torch.Tensor:
        """complex (B, 2, F, T) mixture STFT -> (B, 2, F, T) ratio masks in (0, 1) for the target, per channel."""
        return self.unet(torch.log1p(mix_spec.abs()), self.condition(video, mix))


def magnitude_l1(pred_mag: torch.Tensor, target_mag: torch.Tensor) -> torch.Tensor:
    """Mean |difference| of magnitude spectrograms over channels and bins, per example -> (B,)."""
    return (pred_mag - target_mag).abs().mean(dim=(-3, -2, -1))


def forward_pairs(model: Separator, video, a: torch.Tensor, b: torch.Tensor, spec: Spectrogram):
    """Target a and other source b (B, 2, L) -> (target estimate STFT (B, 2, F, T) with the mixture's phase,
    true target STFT, mixture wave)."""
    mix = a + b
    mix_spec = spec(mix)
    return model(video, mix, mix_spec) * mix_spec, spec(a), mix


def second_network(cfg: Config, pcfg: PretextConfig) -> SpatialAlignmentNet:
    """flip+second's second visual stream: `second_pretext`'s weights, or a random network seeded seed + 1."""
    from flipray.config import config_from_dict
    from flipray.pretext.train import load_checkpoint
    if not cfg.second_pretext:
        torch.manual_seed(cfg.seed + 1)
        return SpatialAlignmentNet(pcfg)
    ckpt = load_checkpoint(cfg.second_pretext)
    scfg = config_from_dict(ckpt["config"])
    if (scfg.data.resize, scfg.data.crop) != (pcfg.data.resize, pcfg.data.crop):
        raise ValueError(f"second_pretext {cfg.second_pretext}: frames of {scfg.data.crop} px (resize "
                         f"{scfg.data.resize}), the main network takes {pcfg.data.crop} px (resize {pcfg.data.resize})")
    net = SpatialAlignmentNet(scfg)
    net.load_state_dict(ckpt["model"])
    return net


# ---------------------------------------------------------------------------------------------------------------------
# Sources and pairs

def prepare_sources(clips: list[Clip], cfg: Config, pcfg: PretextConfig) -> Chunks:
    """flipray.tasks.spatialize.prepare_clips, then every clip at the same RMS (`source_rms`): sources are mixed at equal
    loudness, as Sound of Pixels mixes at comparable levels. Peak-normalised clips differ in loudness by up to
    15 dB (a talker with pauses against a steady buzzer), which would leave the quieter source unrecoverable and
    make the mixture's SDR, not the model, decide a pair's score."""
    chunks = prepare_clips(clips, cfg, pcfg)
    if cfg.source_rms > 0:
        for c in clips:
            c.wave = c.wave * (cfg.source_rms / c.wave.pow(2).mean().sqrt().clamp_min(1e-8))
    return chunks


def _scene(clip: Clip) -> str:
    return clip.row.get("scene_id", clip.clip_id)


def partner(clips: list[Clip], i: int, u: float) -> int:
    """A clip of another scene than clip i, picked by u in [0, 1)."""
    others = [j for j, c in enumerate(clips) if _scene(c) != _scene(clips[i])]
    if not others:
        raise ValueError(f"mix-and-separate needs clips of at least two scenes; all {len(clips)} are "
                         f"{_scene(clips[i])!r}")
    return others[min(int(u * len(others)), len(others) - 1)]


def eval_pairs(clips: list[Clip], n: int = 0) -> list[tuple[int, int]]:
    """(target, partner) for the first n clips (0 = all), partners drawn with EVAL_SEED."""
    rng = np.random.default_rng(EVAL_SEED)
    u = rng.random(len(clips))
    return [(i, partner(clips, i, u[i])) for i in range(min(n, len(clips)) if n else len(clips))]


def train_items(clips: list[Clip], chunks: Chunks, cfg: Config, epoch: int) -> list[tuple]:
    """This epoch's mixtures: (target, start, mirror, other, start, mirror), chunks_per_clip per target clip."""
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, -1))
    items = []
    for i in range(len(clips)):
        for _ in range(cfg.chunks_per_clip):
            u = torch.rand(5, generator=g).tolist()
            j = partner(clips, i, u[0])
            fi = min(int(u[1] * (_last(clips[i], chunks) + 1)), _last(clips[i], chunks))
            fj = min(int(u[2] * (_last(clips[j], chunks) + 1)), _last(clips[j], chunks))
            items.append((i, fi, u[3] < cfg.flip_p, j, fj, u[4] < cfg.flip_p))
    return [items[k] for k in torch.randperm(len(items), generator=g).tolist()]


def _last(clip: Clip, chunks: Chunks) -> int:
    return chunks.last_start(clip.frames.shape[0], clip.wave.shape[-1])


def make_batch(clips: list[Clip], items: list[tuple], chunks: Chunks, pcfg: PretextConfig,
               video: bool = True) -> dict:
    """items (target, start, mirror, other, start, mirror) -> {"video": target frames (B, frames, 3, crop, crop) or
    None, "a": target (B, 2, L), "b": other source (B, 2, L)}."""
    frames, a, b = [], [], []
    for i, fi, mi, j, fj, mj in items:
        wa, wb = chunks.wave(clips[i].wave, fi), chunks.wave(clips[j].wave, fj)
        a.append(wa.flip(0) if mi else wa)
        b.append(wb.flip(0) if mj else wb)
        if video:
            frames.append(chunks.video(clips[i].frames, fi, pcfg, mi))
    return {"video": torch.stack(frames) if video else None, "a": torch.stack(a), "b": torch.stack(b)}


# ---------------------------------------------------------------------------------------------------------------------
# Train and evaluate

def train_one_epoch(model: Separator, clips, chunks, spec, pcfg, optimizer, cfg: Config, device, epoch: int) -> float:
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    model.train()
    items = train_items(clips, chunks, cfg, epoch)
    total, n = 0.0, 0
    bar = tqdm(range(0, len(items), cfg.batch_size), desc=f"epoch {epoch}", unit="batch", leave=False)
    for k in bar:
        batch = make_batch(clips, items[k:k + cfg.batch_size], chunks, pcfg, video=model.net is not None)
        est, target, _ = forward_pairs(model, to_device(batch["video"], device), batch["a"].to(device),
                                       batch["b"].to(device), spec)
        loss = magnitude_l1(est.abs(), target.abs()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * len(est), n + len(est)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / n


@torch.no_grad()
def evaluate(model: Separator, clips, pairs, chunks, spec, pcfg, device, batch_size: int = 32) -> float:
    """Mean training L1 on the middle chunk of each eval pair: the quick per-epoch validation."""
    model.eval()
    items = [(i, _last(clips[i], chunks) // 2, False, j, _last(clips[j], chunks) // 2, False) for i, j in pairs]
    losses = []
    for k in range(0, len(items), batch_size):
        batch = make_batch(clips, items[k:k + batch_size], chunks, pcfg, video=model.net is not None)
        est, target, _ = forward_pairs(model, to_device(batch["video"], device), batch["a"].to(device),
                                       batch["b"].to(device), spec)
        losses.append(magnitude_l1(est.abs(), target.abs()).cpu())
    return float(torch.cat(losses).mean())


@torch.no_grad()
def separate_pair(model: Separator, a: Clip, b: Clip, chunks: Chunks, spec, pcfg, cfg: Config, device) -> dict:
    """Whole-clip mix-and-separate of clips a (target) and b, sliding the chunk over both ->
    {"true", "est": (2 sources, 2, S') over the covered samples, "mix": (2, S'), "l1_mag": the target's mean L1}."""
    model.eval()
    n_frames = min(a.frames.shape[0], b.frames.shape[0])
    starts = chunks.sliding(n_frames, min(a.wave.shape[-1], b.wave.shape[-1]), cfg.infer_hop_frames)
    use_video = model.net is not None
    pieces, l1 = ([], []), []
    for k in range(0, len(starts), cfg.batch_size):
        group = starts[k:k + cfg.batch_size]
        for s, (x, y) in enumerate(((0, 1), (1, 0)) if use_video else ((0, 1),)):
            clips = [a, b]
            items = [(x, f0, False, y, f0, False) for f0 in group]
            batch = make_batch(clips, items, chunks, pcfg, video=use_video)
            est, target, _ = forward_pairs(model, to_device(batch["video"], device), batch["a"].to(device),
                                           batch["b"].to(device), spec)
            if s == 0:
                l1.append(magnitude_l1(est.abs(), target.abs()).cpu())
            w = spec.inverse(est, chunks.samples).cpu()
            pieces[s].extend((chunks.start_sample(f0), w[i]) for i, f0 in enumerate(group))
    end = chunks.start_sample(starts[-1]) + chunks.samples
    true = torch.stack([a.wave[:, :end], b.wave[:, :end]])
    est_a = overlap_add(pieces[0], end)
    # Without features the model cannot tell the sources apart: its one estimate stands for both.
    est_b = overlap_add(pieces[1], end) if use_video else est_a
    return {"true": true, "est": torch.stack([est_a, est_b]), "mix": true.sum(0), "l1_mag": float(torch.cat(l1).mean())}


def score_pairs(model, clips, pairs, chunks, spec, pcfg, cfg: Config, device, out_dir: Path | None) -> tuple:
    """Per target clip: BSS Eval of the target, the mixture's SDR, the training L1 -> (per_clip, clip ids)."""
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    per_clip = {k: [] for k in TABLE["metrics"]}
    ids = []
    for n, (i, j) in enumerate(tqdm(pairs, desc="separating eval pairs", unit="pair", leave=False)):
        r = separate_pair(model, clips[i], clips[j], chunks, spec, pcfg, cfg, device)
        try:
            bss = metrics.bss_eval(r["true"].numpy(), r["est"].numpy())
            floor = metrics.mixture_floor(r["true"].numpy(), r["mix"].numpy())
        except ValueError as e:  # a silent source: BSS Eval is undefined
            log.warning("pair %s + %s left out: %s", clips[i].clip_id, clips[j].clip_id, e)
            continue
        ids.append(clips[i].clip_id)
        for k in ("sdr", "sir", "sar"):
            per_clip[k].append(float(bss[k][0]))
        per_clip["sdr_mixture"].append(float(floor["sdr"][0]))
        per_clip["l1_mag"].append(r["l1_mag"])
        if out_dir is not None and n < cfg.examples:
            write_example(out_dir / "examples", f"{clips[i].clip_id}+{clips[j].clip_id}", r, chunks.sample_rate)
    return per_clip, ids


def write_example(folder: Path, name: str, r: dict, sample_rate: int) -> list[Path]:
    """<name>_mix.flac, _est.flac (the target's estimate), _true.flac (the target), stereo, one scale factor."""
    import soundfile as sf
    folder.mkdir(parents=True, exist_ok=True)
    waves = {"mix": r["mix"], "est": r["est"][0], "true": r["true"][0]}
    scale = 0.9 / max(max(float(w.abs().max()) for w in waves.values()), 1e-6)
    paths = []
    for key, w in waves.items():
        path = folder / f"{name}_{key}.flac"
        sf.write(path, (w * scale).clamp(-1, 1).T.numpy(), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def run_trial(cfg: Config, report=None) -> dict:
    """Train one method (cfg.method) on mixtures of cfg.train_split clips, score whole-clip pairs of cfg.eval_split."""
    method_spec(cfg, METHODS)
    device = setup(cfg)
    net, pcfg = pretext_network(cfg)
    second = second_network(cfg, pcfg) if cfg.method == "flip+second" else None
    train_clips, _ = load_clips(cfg.data_root, cfg.train_split, pcfg.data.resize, pcfg.data.sample_rate,
                                cfg.max_clips)
    eval_clips, skipped = load_clips(cfg.data_root, cfg.eval_split, pcfg.data.resize, pcfg.data.sample_rate,
                                     cfg.max_clips)
    chunks = prepare_sources(train_clips + eval_clips, cfg, pcfg)
    pairs = eval_pairs(eval_clips, cfg.eval_clips)
    spec = Spectrogram(pcfg)
    model = Separator(None if cfg.method == "no-visual" else net, pcfg, cfg, second).to(device)
    optimizer = torch.optim.AdamW(param_groups(model.backbones(), model.unet, cfg), weight_decay=cfg.weight_decay)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    history = []
    for epoch in range(cfg.epochs):
        loss = train_one_epoch(model, train_clips, chunks, spec, pcfg, optimizer, cfg, device, epoch)
        val = evaluate(model, eval_clips, pairs, chunks, spec, pcfg, device, cfg.batch_size)
        history.append({"epoch": epoch, "loss": loss, "val_l1_mag": val})
        log.info("separate %s epoch %d: loss %.4f, %s l1_mag %.4f", cfg.method, epoch, loss, cfg.eval_split, val)
        if report is not None:
            report(epoch, {"loss": loss, "val_l1_mag": val})
    per_clip, ids = score_pairs(model, eval_clips, pairs, chunks, spec, pcfg, cfg, device, out_dir)
    if not ids:
        raise ValueError(f"{cfg.data_root}: no eval pair of split {cfg.eval_split!r} could be scored")
    result = {"metrics": {k: float(np.mean(v)) for k, v in per_clip.items()}, "per_clip": per_clip, "clip_ids": ids,
              "history": history, "figures": {}, "skipped": skipped,
              "pairs": [[eval_clips[i].clip_id, eval_clips[j].clip_id] for i, j in pairs]}
    if out_dir is not None and history:
        result["figures"]["curves"] = str(plot_history(history, out_dir / "curves.png", f"separate {cfg.method}"))
    return result
