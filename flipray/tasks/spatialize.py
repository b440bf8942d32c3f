"""Audio spatialization (upmixing mono to stereo), the paper's Sec. 5.2 / Table 4, with Mono2Binaural's U-Net.

    python -m jobs.spatialize --data data/demo --preset demo --local --no-mlflow \
        --pretext flip=runs/dev-demo/checkpoint.pt --out /tmp/sp        # every method, one after another, here
    python -c "from flipray.tasks.base import apply; from flipray.tasks import spatialize as t; \
        print(t.run_trial(apply(t.Config(pretext='runs/dev-demo/checkpoint.pt'), t.PRESETS['demo']))['metrics'])"
                                        # one method (flip)

Chunks of mono (L + R) go through an audio U-Net (flipray/tasks/unet.py) conditioned on the pretext visual stream,
which predicts the L - R difference as a complex mask; scored on whole clips by l1_complex (Table 4's number) and
2.5D Visual Sound's STFT / envelope distances, against copying the mono mix (*_mono). Design and metric details:
docs/tasks.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from flipray.tasks import metrics
from flipray.config import Config as PretextConfig
from flipray.pretext.data import peak_normalise, sample_seed
from flipray.tasks.base import (Clip, DownstreamConfig, load_clips, method_spec, param_groups, pretext_network, setup,
                                to_device)
from flipray.pretext.models import SpatialAlignmentNet
from flipray.tasks.unet import AudioUNet, Chunks, Spectrogram, overlap_add

log = logging.getLogger(__name__)

ORDER = 4  # where its table comes in the report (the paper's order)
TABLE = {
    "task": "spatialize", "table": "Table 4",
    "metrics": ["stft_distance", "envelope_distance", "l1_complex", "stft_distance_mono", "envelope_distance_mono"],
    "primary": "stft_distance",
    "higher_is_better": {"stft_distance": False, "envelope_distance": False, "l1_complex": False,
                         "stft_distance_mono": False, "envelope_distance_mono": False},
    "paired_metric": "stft_distance",
    "notes": "Upmixing mono (L+R) to stereo on whole test clips (sliding 0.63-s windows). stft_distance and "
             "envelope_distance as 2.5D Visual Sound's evaluate.py (peak-normalised, summed over L and R); "
             "l1_complex = the training L1 of predicted and true L-R complex spectrograms (the paper's Table 4 "
             "number); *_mono = the same distances for copying the mono mix to both channels (the floor). "
             "Lower is better everywhere. No ImageNet row (no ImageNet weights here).",
}

METHODS = {
    "no-visual": {"label": "No visual features", "pretext": None},
    "scratch": {"label": "No pretraining", "pretext": None},
    "mismatch": {"label": "Mismatch task", "pretext": "mismatch"},
    "shift": {"label": "Shift task", "pretext": "shift"},
    "flip": {"label": "Flip task (ours)", "pretext": "flip"},
}

# The paper's numbers (Yang, Russell & Salamon, CVPR 2020) as printed, on real data (YouTube-ASMR, FAIR-Play,
# TAU), for orientation; flipray.tasks.tables puts them beside ours. numbers: {method: {metric: value}}.
PAPER = {
    # Table 4: upmixing test error, the L1 distance of output and target complex spectrograms (mean over bins).
    "spatialize": {
        "table": "Table 4", "data": "YouTube-ASMR and FAIR-Play test sets",
        "units": {},
        "labels": {
            "supervised": "Supervised",
            "no-visual": "No visual features",
            "scratch": "No pretraining",
            "mismatch": "Mismatch task",
            "shift": "Shift task",
            "flip": "Flip task (ours)",
        },
        "numbers": {
            "supervised": {"l1_complex_asmr": 0.0858, "l1_complex_fairplay": 0.403},
            "no-visual": {"l1_complex_asmr": 0.0924, "l1_complex_fairplay": 0.418},
            "scratch": {"l1_complex_asmr": 0.0891, "l1_complex_fairplay": 0.413},
            "mismatch": {"l1_complex_asmr": 0.0877, "l1_complex_fairplay": 0.412},
            "shift": {"l1_complex_asmr": 0.0861, "l1_complex_fairplay": 0.409},
            "flip": {"l1_complex_asmr": 0.0853, "l1_complex_fairplay": 0.401},
        },
    },
}


@dataclass
class Config(DownstreamConfig):
    chunk_s: float = 0.63             # audio per example, 2.5D Visual Sound's crop (64 STFT frames at 16 kHz)
    ngf: int = 64                     # U-Net base width (Mono2Binaural: 64)
    cond_proj: int = 64               # visual features are projected to this many channels at the bottleneck
    flip_p: float = 0.5               # training: mirror the frames and swap L/R together (a mirrored scene)
    chunks_per_clip: int = 1          # training examples per train clip per epoch (random chunk positions)
    infer_hop_frames: int = 1         # hop of the sliding window of whole-clip inference, in video frames
    examples: int = 3                 # eval clips written as stereo FLAC to out_dir/examples/ (0 = none)


PRESETS = {
    # ~2-3 min per method on one core with data/demo (480 train / 60 test clips of 10 s).
    "demo": {"ngf": 16, "cond_proj": 32, "epochs": 8, "batch_size": 16, "lr": 2e-3, "lr_backbone": 0.0,
             "infer_hop_frames": 2, "threads": 1},
    "small": {"ngf": 32, "epochs": 20, "batch_size": 32, "lr": 1e-3, "lr_backbone": 0.0, "chunks_per_clip": 2},
    # Mono2Binaural's optimiser settings (Adam, 1e-3 for the U-Net, 1e-4 for the visual network).
    "paper": {"ngf": 64, "cond_proj": 64, "epochs": 100, "batch_size": 64, "lr": 1e-3, "lr_backbone": 1e-4,
              "weight_decay": 5e-4, "chunks_per_clip": 10, "infer_hop_frames": 1},
}


# ---------------------------------------------------------------------------------------------------------------------
# The head and its algebra

class Upmixer(nn.Module):
    """The pretext visual stream (None: no visual features) and the U-Net; forward gives the complex mask."""

    def __init__(self, net: SpatialAlignmentNet | None, cfg: Config):
        super().__init__()
        self.net = net
        self.frozen = cfg.lr_backbone <= 0
        self.unet = AudioUNet(2, 2, cfg.ngf, net.visual.out_dim if net is not None else 0, cfg.cond_proj, "tanh")

    def condition(self, video: torch.Tensor | None) -> torch.Tensor | None:
        """(B, frames, 3, H, W) -> (B, Dv, frames): the flattened spatial map per frame, as fused in pretext."""
        if self.net is None:
            return None
        if self.frozen:  # frozen: batch-norm statistics and weights exactly as pretext training left them
            self.net.eval()
            with torch.no_grad():
                return self.net.embed_visual(video)
        return self.net.embed_visual(video)

    def forward(self, video: torch.Tensor | None, mono_spec: torch.Tensor) -> torch.Tensor:
        """complex (B, F, T) STFT of the mono mix -> complex mask (B, F, T), real and imaginary parts in (-1, 1)."""
        m = self.unet(torch.stack([mono_spec.real, mono_spec.imag], dim=1), self.condition(video))
        return torch.complex(m[:, 0], m[:, 1])


def ideal_mask(mono_spec: torch.Tensor, diff_spec: torch.Tensor) -> torch.Tensor:
    """The mask that turns STFT(L+R) into STFT(L-R) exactly: D / S (what the tanh mask would have to output)."""
    power = mono_spec.abs() ** 2
    return diff_spec * mono_spec.conj() / power.clamp_min(torch.finfo(power.dtype).tiny)  # 0 where S is 0


def upmix(mono: torch.Tensor, diff_spec: torch.Tensor, spec: Spectrogram) -> torch.Tensor:
    """(..., S) mono = L + R and a predicted STFT of L - R -> (..., 2, S) stereo: L = (mono + d)/2, R = (mono - d)/2."""
    d = spec.inverse(diff_spec, mono.shape[-1])
    return torch.stack([(mono + d) / 2, (mono - d) / 2], dim=-2)


def complex_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 of complex spectrograms as 2.5D Visual Sound's loss sees them, real and imaginary channels stacked:
    mean |difference| over (real/imag, frequency, time), per example -> (B,)."""
    return ((pred.real - target.real).abs() + (pred.imag - target.imag).abs()).mean(dim=(-2, -1)) / 2


def forward_chunks(model: Upmixer, video, wave: torch.Tensor, spec: Spectrogram):
    """One batch of chunks (video (B, frames, 3, H, W) or None, stereo wave (B, 2, L)) ->
    (predicted STFT of L-R, true STFT of L-R, mono (B, L))."""
    mono, diff = wave[:, 0] + wave[:, 1], wave[:, 0] - wave[:, 1]
    mono_spec = spec(mono)
    return model(video, mono_spec) * mono_spec, spec(diff), mono


# ---------------------------------------------------------------------------------------------------------------------
# Data

def prepare_clips(clips: list[Clip], cfg: Config, pcfg: PretextConfig) -> Chunks:
    """Peak-normalise every clip's audio in place (one level for the whole clip, so a chunk keeps its loudness
    relative to the clip) and return the chunk geometry, which needs one frame rate across the dataset."""
    rates = {float(c.row.get("fps", pcfg.data.fps)) for c in clips}
    if len(rates) != 1:
        raise ValueError(f"{cfg.data_root}: clips at several frame rates {sorted(rates)}; the chunks need one")
    for c in clips:
        c.wave = peak_normalise(c.wave)
    chunks = Chunks(cfg.chunk_s, rates.pop(), pcfg.data.sample_rate)
    for c in clips:
        chunks.last_start(c.frames.shape[0], c.wave.shape[-1])  # raises for a clip shorter than one chunk
    return chunks


def make_batch(clips: list[Clip], items: list[tuple[int, int, bool]], chunks: Chunks, pcfg: PretextConfig,
               video: bool = True) -> dict:
    """items (clip index, start frame, mirror) -> {"video": (B, frames, 3, crop, crop) or None, "wave": (B, 2, L)};
    mirror = frames flipped left-right and channels swapped together."""
    waves, frames = [], []
    for ci, f0, mirror in items:
        w = chunks.wave(clips[ci].wave, f0)
        waves.append(w.flip(0) if mirror else w)
        if video:
            frames.append(chunks.video(clips[ci].frames, f0, pcfg, mirror))
    return {"video": torch.stack(frames) if video else None, "wave": torch.stack(waves)}


def train_items(clips: list[Clip], chunks: Chunks, cfg: Config, epoch: int) -> list[tuple[int, int, bool]]:
    """This epoch's examples in order: chunks_per_clip random chunks per clip, each mirrored with p = flip_p."""
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, -1))
    items = []
    for ci, c in enumerate(clips):
        last = chunks.last_start(c.frames.shape[0], c.wave.shape[-1])
        for _ in range(cfg.chunks_per_clip):
            f0 = int(torch.randint(0, last + 1, (1,), generator=g))
            items.append((ci, f0, bool(torch.rand(1, generator=g) < cfg.flip_p)))
    return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# Train and evaluate

def train_one_epoch(model: Upmixer, clips, chunks, spec, pcfg, optimizer, cfg: Config, device, epoch: int) -> float:
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    model.train()
    items = train_items(clips, chunks, cfg, epoch)
    total, n = 0.0, 0
    bar = tqdm(range(0, len(items), cfg.batch_size), desc=f"epoch {epoch}", unit="batch", leave=False)
    for i in bar:
        batch = make_batch(clips, items[i:i + cfg.batch_size], chunks, pcfg, video=model.net is not None)
        pred, target, _ = forward_chunks(model, to_device(batch["video"], device), batch["wave"].to(device), spec)
        loss = complex_l1(pred, target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * len(pred), n + len(pred)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / n


@torch.no_grad()
def evaluate(model: Upmixer, clips, chunks, spec, pcfg, device, batch_size: int = 32) -> float:
    """Mean training L1 on one fixed chunk per clip (the middle one): the quick per-epoch validation."""
    model.eval()
    items = [(ci, chunks.last_start(c.frames.shape[0], c.wave.shape[-1]) // 2, False) for ci, c in enumerate(clips)]
    losses = []
    for i in range(0, len(items), batch_size):
        batch = make_batch(clips, items[i:i + batch_size], chunks, pcfg, video=model.net is not None)
        pred, target, _ = forward_chunks(model, to_device(batch["video"], device), batch["wave"].to(device), spec)
        losses.append(complex_l1(pred, target).cpu())
    return float(torch.cat(losses).mean())


@torch.no_grad()
def upmix_clip(model: Upmixer, clip: Clip, chunks: Chunks, spec, pcfg, cfg: Config, device) -> dict:
    """Sliding-window inference over a whole clip -> {"pred", "true": (2, S') stereo over the covered S' samples,
    "mono": (S',), "l1_complex": mean training L1 of its windows}."""
    model.eval()
    starts = chunks.sliding(clip.frames.shape[0], clip.wave.shape[-1], cfg.infer_hop_frames)
    pieces, l1 = [], []
    for i in range(0, len(starts), cfg.batch_size):
        group = starts[i:i + cfg.batch_size]
        batch = make_batch([clip], [(0, f0, False) for f0 in group], chunks, pcfg, video=model.net is not None)
        pred, target, _ = forward_chunks(model, to_device(batch["video"], device), batch["wave"].to(device), spec)
        l1.append(complex_l1(pred, target).cpu())
        d = spec.inverse(pred, chunks.samples).cpu()
        pieces += [(chunks.start_sample(f0), d[k]) for k, f0 in enumerate(group)]
    end = chunks.start_sample(starts[-1]) + chunks.samples
    true = clip.wave[:, :end]
    mono = true[0] + true[1]
    d = overlap_add(pieces, end)
    return {"pred": torch.stack([(mono + d) / 2, (mono - d) / 2]), "true": true, "mono": mono,
            "l1_complex": float(torch.cat(l1).mean())}


def score_clips(model, clips, chunks, spec, pcfg, cfg: Config, device, out_dir: Path | None) -> dict:
    """Whole-clip metrics per clip (and the mono-copy floor); the first cfg.examples clips written as FLAC."""
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    per_clip = {k: [] for k in TABLE["metrics"]}
    for k, clip in enumerate(tqdm(clips, desc="upmixing eval clips", unit="clip", leave=False)):
        r = upmix_clip(model, clip, chunks, spec, pcfg, cfg, device)
        copy = torch.stack([r["mono"] / 2, r["mono"] / 2])
        per_clip["l1_complex"].append(r["l1_complex"])
        per_clip["stft_distance"].append(float(metrics.stft_distance(r["pred"], r["true"], normalize=True)))
        per_clip["envelope_distance"].append(float(metrics.envelope_distance(r["pred"], r["true"], normalize=True)))
        per_clip["stft_distance_mono"].append(float(metrics.stft_distance(copy, r["true"], normalize=True)))
        per_clip["envelope_distance_mono"].append(float(metrics.envelope_distance(copy, r["true"], normalize=True)))
        if out_dir is not None and k < cfg.examples:
            write_example(out_dir / "examples", clip.clip_id, r, chunks.sample_rate)
            if k == 0:
                plot_example(r, spec, out_dir / "example.png", clip.clip_id)
    return per_clip


def write_example(folder: Path, clip_id: str, r: dict, sample_rate: int) -> list[Path]:
    """<clip_id>_pred.flac, _true.flac (stereo) and _mono.flac, scaled by one factor so their levels compare."""
    import soundfile as sf
    folder.mkdir(parents=True, exist_ok=True)
    scale = 0.9 / max(float(r["pred"].abs().max()), float(r["true"].abs().max()), float(r["mono"].abs().max()) / 2,
                      1e-6)
    paths = []
    for name, w in (("pred", r["pred"]), ("true", r["true"]), ("mono", r["mono"][None] / 2)):
        path = folder / f"{clip_id}_{name}.flac"
        sf.write(path, (w * scale).clamp(-1, 1).T.numpy(), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def plot_example(r: dict, spec: Spectrogram, path: Path, clip_id: str) -> Path:
    """log |STFT(L - R)|: true against predicted, for one clip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, (name, w) in zip(axes, (("true", r["true"]), ("predicted", r["pred"]))):
        mag = spec(w[0] - w[1]).abs().clamp_min(1e-4).log10()
        ax.imshow(mag.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(mag.max()) - 4)
        ax.set_title(f"{name} L-R, {clip_id}")
        ax.set_xlabel("STFT frame")
    axes[0].set_ylabel("frequency bin")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    for key in [k for k in history[0] if k != "epoch"]:
        ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_trial(cfg: Config, report=None) -> dict:
    """Train one method (cfg.method) on cfg.train_split, score whole clips of cfg.eval_split."""
    method_spec(cfg, METHODS)
    device = setup(cfg)
    net, pcfg = pretext_network(cfg)
    train_clips, _ = load_clips(cfg.data_root, cfg.train_split, pcfg.data.resize, pcfg.data.sample_rate,
                                cfg.max_clips)
    eval_clips, skipped = load_clips(cfg.data_root, cfg.eval_split, pcfg.data.resize, pcfg.data.sample_rate,
                                     cfg.max_clips)
    chunks = prepare_clips(train_clips + eval_clips, cfg, pcfg)
    spec = Spectrogram(pcfg)
    model = Upmixer(None if cfg.method == "no-visual" else net, cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model.net if model.net is not None else nn.Module(), model.unet, cfg),
                                  weight_decay=cfg.weight_decay)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    history = []
    for epoch in range(cfg.epochs):
        loss = train_one_epoch(model, train_clips, chunks, spec, pcfg, optimizer, cfg, device, epoch)
        val = evaluate(model, eval_clips, chunks, spec, pcfg, device, cfg.batch_size)
        history.append({"epoch": epoch, "loss": loss, "val_l1_complex": val})
        log.info("spatialize %s epoch %d: loss %.4f, %s l1_complex %.4f", cfg.method, epoch, loss, cfg.eval_split, val)
        if report is not None:
            report(epoch, {"loss": loss, "val_l1_complex": val})
    per_clip = score_clips(model, eval_clips, chunks, spec, pcfg, cfg, device, out_dir)
    result = {"metrics": {k: float(sum(v) / len(v)) for k, v in per_clip.items()},
              "per_clip": per_clip, "clip_ids": [c.clip_id for c in eval_clips], "history": history,
              "figures": {}, "skipped": skipped}
    if out_dir is not None:
        if (out_dir / "example.png").exists():
            result["figures"]["example"] = str(out_dir / "example.png")
        if history:
            result["figures"]["curves"] = str(plot_history(history, out_dir / "curves.png", f"spatialize {cfg.method}"))
    return result
