"""Direction-of-arrival (DOA) estimation from first-order ambisonics, the paper's Sec. 6 / Table 6.

    flipray synth360 --out data/doa-demo --doa --per-direction 20 --seed 1 --duration 3 --height 128
    python -m jobs.doa --data data/doa-demo --preset demo --pretext rotate=runs/rotate-demo/checkpoint.pt \
        --local --no-mlflow --out /tmp/doa                             # every row, one after another, here
    python -c "from flipray.tasks.doa import *; print(run_trial(apply(Config(method='intensity'), PRESETS['demo'])))"

A 36-way classifier on the pretext audio stream's FOA embedding (random weights, rotate-task weights, or one-shot
SVMs on frozen embeddings) against the classical active intensity vector; mean azimuth error in degrees (random =
90). Rows and design: docs/tasks.md.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flipray import foa
from flipray.config import Config as PretextConfig
from flipray.config import load_config
from flipray.pretext.data import AudioFeatures, peak_normalise, sample_seed
from flipray.tasks.base import DownstreamConfig, load_clips, method_spec, param_groups, pretext_network, setup
from flipray.pretext.models import SpatialAlignmentNet

log = logging.getLogger(__name__)

ORDER = 6  # where its table comes in the report (the paper's order)
TABLE = {
    "task": "doa", "table": "Table 6",
    "metrics": ["doa_err", "acc"],
    "primary": "doa_err",
    "higher_is_better": {"doa_err": False, "acc": True},
    "paired_metric": "doa_err",
    "notes": "Azimuth of one static source per clip from FOA audio (ACN/SN3D), 360/step_deg directions. doa_err = "
             "mean absolute azimuth error on the circle, degrees (random = 90, max 180); acc = fraction of clips on "
             "the right direction. svm-* rows: a linear SVM on one train example per direction (frozen embeddings). "
             "intensity = active intensity vector, no learning, snapped to the direction grid. The paper's numbers "
             "are on TAU Spatial Sound (real reverberant recordings, overlapping events), for orientation only.",
}

METHODS = {
    "scratch": {"label": "Trained from scratch", "pretext": None},
    "rotate": {"label": "Pretrained weights (rotate task)", "pretext": "rotate"},
    "svm-random": {"label": "One-shot SVM on random embeddings", "pretext": None},
    "svm-rotate": {"label": "One-shot SVM on rotate-task embeddings", "pretext": "rotate"},
    "intensity": {"label": "Active intensity vector (no learning)", "pretext": None},
}
SHAPE_FROM = "rotate"  # jobs.downstream: the random-weight rows take the rotate network's (FOA) shape

# The paper's numbers (Yang, Russell & Salamon, CVPR 2020) as printed, on real data (YouTube-ASMR, FAIR-Play,
# TAU), for orientation; flipray.tasks.tables puts them beside ours. numbers: {method: {metric: value}}.
PAPER = {
    # Table 6: DOA on TAU Spatial Sound (FOA), mean azimuth error in degrees (random = 90). "Ours" here is the 360
    # extension of the flip task, the rotate task (flipray/tasks/doa.py names its rows rotate / svm-rotate).
    "doa": {
        "table": "Table 6", "data": "TAU Spatial Sound (FOA), 4-fold cross-validation",
        "units": {"doa_err": "deg"},
        "labels": {
            "scratch": "Trained from scratch",
            "rotate": "Pretrained weights",
            "svm-random": "One-shot SVM on random embeddings",
            "svm-rotate": "One-shot SVM on our embeddings",
        },
        "numbers": {
            "scratch": {"doa_err": 20.5},
            "rotate": {"doa_err": 17.5},
            "svm-random": {"doa_err": 78.6},
            "svm-rotate": {"doa_err": 29.5},
        },
    },
}


@dataclass
class Config(DownstreamConfig):
    data_root: str = "data/doa-demo"  # a DOA set: `flipray synth360 --doa` (or any 360 clips with one static source)
    method: str = "rotate"
    step_deg: float = 10.0            # direction grid; 36 classes as in the TAU Spatial Sound set
    train_windows: int = 1            # windows per train clip, evenly spread (features computed once)
    train_per_direction: int = 0      # scratch/rotate rows: train clips per direction (0 = all); few labels is where
                                      # pretraining should matter most
    shots: int = 1                    # svm-* rows: train examples per direction (one-shot, as the paper)
    svm_c: float = 1.0                # svm-* rows: LinearSVC's C on standardised embeddings


PRESETS = {
    # ~1-2 min per learned row on one core with data/doa-demo (576 train / 72 test clips of 3 s).
    "demo": {"epochs": 15, "batch_size": 32, "lr": 1e-3, "lr_backbone": 1e-3, "weight_decay": 1e-4, "threads": 1},
    "small": {"epochs": 30, "batch_size": 32, "lr": 1e-3, "lr_backbone": 1e-3, "weight_decay": 1e-4,
              "train_windows": 2},
    # The paper gives no DOA training details; the same optimiser for both learned rows, longer.
    "paper": {"epochs": 50, "batch_size": 64, "lr": 1e-3, "lr_backbone": 1e-3, "weight_decay": 1e-4,
              "train_windows": 4},
}


# ---------------------------------------------------------------------------------------------------------------------
# Clips: FOA audio and the direction label

@dataclass
class DoaClip:
    clip_id: str
    wave: torch.Tensor                # float (4, S), ACN W, Y, Z, X
    azimuth_deg: float                # of the sounding source, counter-clockwise, 90 = left
    label: int                        # nearest grid direction: round(azimuth / step) mod n


def clip_azimuth(meta: dict, name: str) -> float:
    """The source's azimuth (deg) from a sidecar: its `doa` block (flipray synth360 --doa), else the mean azimuth of
    its one sounding object, which must be static."""
    if "doa" in meta:
        return float(meta["doa"]["azimuth_deg"])
    sounding = [o for o in meta.get("objects", []) if o.get("sounding")]
    if len(sounding) != 1:
        raise ValueError(f"{name}: a DOA clip needs a `doa` block or exactly one sounding object, got {len(sounding)}")
    az = np.radians(np.asarray(sounding[0]["azimuth_deg"], dtype=float))
    return float(np.degrees(np.arctan2(np.sin(az).mean(), np.cos(az).mean())))


def load_doa_clips(root: str, split: str, sample_rate: int, step_deg: float, max_clips: int = 0
                   ) -> tuple[list[DoaClip], dict[str, str]]:
    """The FOA audio and direction of every clip of a split (no video: DOA is audio only); corrupt clips, and clips
    without one sounding source in their sidecar, are skipped and counted. `max_clips` keeps the first clips in
    manifest order."""
    loaded, skipped = load_clips(root, split, 0, sample_rate, max_clips, channels=4, video=False)
    n_classes = round(360 / step_deg)
    clips = []
    for c in loaded:
        try:
            az = clip_azimuth(c.meta, f"{root.rstrip('/')}/{c.row['meta']}")
        except ValueError as e:
            skipped[c.clip_id] = str(e)
            log.warning("skipping clip %s: %s", c.clip_id, e)
            continue
        clips.append(DoaClip(c.clip_id, c.wave, az, int(round(az / step_deg)) % n_classes))
    if not clips:
        raise ValueError(f"{root}: every clip of split {split!r} failed to load: {skipped}")
    return clips, skipped


def windows(wave: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """`count` windows of `length` samples spread evenly over the wave (one = centred); short waves are zero-padded."""
    if wave.shape[-1] < length:
        wave = F.pad(wave, (0, length - wave.shape[-1]))
    room = wave.shape[-1] - length
    starts = [room // 2] if count == 1 else [round(i * room / (count - 1)) for i in range(count)]
    return [wave[..., s:s + length] for s in starts]


def clip_features(clips: list[DoaClip], pcfg: PretextConfig, count: int) -> torch.Tensor:
    """(len(clips) * count, C, n_mels, T) network inputs, as the pretext network was trained (peak-normalised)."""
    features = AudioFeatures(pcfg)
    with torch.no_grad():
        return torch.stack([features(peak_normalise(w)) for c in clips
                            for w in windows(c.wave, pcfg.window_samples, count)])


# ---------------------------------------------------------------------------------------------------------------------
# Rows

def grid_azimuth(label, step_deg: float):
    return foa.wrap_deg(np.asarray(label, dtype=float) * step_deg)


def score(pred_labels, clips: list[DoaClip], step_deg: float) -> dict[str, list[float]]:
    """Per clip: absolute azimuth error (deg, on the circle) of the predicted grid direction, and exact hits."""
    err = foa.angular_error(grid_azimuth(pred_labels, step_deg), np.array([c.azimuth_deg for c in clips]))
    hit = np.asarray(pred_labels) == np.array([c.label for c in clips])
    return {"doa_err": [float(e) for e in err], "acc": [float(h) for h in hit]}


def network(cfg: Config) -> tuple[SpatialAlignmentNet, PretextConfig]:
    """The pretext network (weights per cfg.pretrained); without a checkpoint, the `arch` preset's shape for FOA."""
    if not cfg.pretext and not cfg.pretrained:
        torch.manual_seed(cfg.seed)
        pcfg = load_config(cfg.arch, ["train.task=rotate"])
        return SpatialAlignmentNet(pcfg), pcfg
    net, pcfg = pretext_network(cfg)
    if pcfg.data.audio_channels != 4:
        raise ValueError(f"{cfg.pretext}: a {pcfg.train.task}-task network with {pcfg.data.audio_channels}-channel "
                         f"audio; DOA needs an FOA network (train one with train.task=rotate on 360 clips)")
    return net, pcfg


class DoaClassifier(nn.Module):
    """The pretext audio stream, averaged over time, then one linear layer to the directions."""

    def __init__(self, audio: nn.Module, n_classes: int):
        super().__init__()
        self.audio = audio
        self.head = nn.Linear(audio.out_dim, n_classes)

    def forward(self, x):
        return self.head(self.audio(x).mean(dim=-1))


@torch.no_grad()
def embed(audio: nn.Module, x: torch.Tensor, device, batch_size: int) -> np.ndarray:
    audio.eval()
    return torch.cat([audio(x[i:i + batch_size].to(device)).mean(dim=-1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device, batch_size: int) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).argmax(-1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


def train_one_epoch(model, x, y, optimizer, cfg: Config, device, epoch: int) -> float:
    model.train()
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, -1))
    order = torch.randperm(len(x), generator=g)
    total = 0.0
    for i in range(0, len(x), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        if len(idx) < 2:  # BatchNorm needs two examples
            continue
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(x)


def one_shot_indices(clips: list[DoaClip], shots: int, seed: int) -> list[int]:
    """`shots` train clips per direction, drawn with the seed (directions without clips are left out)."""
    rng = np.random.default_rng([seed, 6])
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(clips):
        by_class.setdefault(c.label, []).append(i)
    return sorted(i for idx in by_class.values() for i in rng.permutation(idx)[:shots])


def plot_predictions(true_az, pred_az, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(true_az, pred_az, s=12, alpha=0.6)
    ax.plot([-180, 180], [-180, 180], color="gray", lw=1, ls=":")
    ax.set_xlabel("true azimuth (deg, 90 = left)")
    ax.set_ylabel("predicted azimuth (deg)")
    ax.set_xlim(-185, 185)
    ax.set_ylim(-185, 185)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_trial(cfg: Config, report=None) -> dict:
    """One row (cfg.method): train on cfg.train_split (nothing for `intensity`), score cfg.eval_split clips."""
    method_spec(cfg, METHODS)
    n_classes = round(360 / cfg.step_deg)
    if abs(n_classes * cfg.step_deg - 360) > 1e-6:
        raise ValueError(f"step_deg must divide 360, got {cfg.step_deg}")
    device = setup(cfg)
    history: list[dict] = []

    if cfg.method == "intensity":
        pcfg = load_config(cfg.arch)  # the same window as the learned rows see
        sr = pcfg.data.sample_rate
        eval_clips, skipped = load_doa_clips(cfg.data_root, cfg.eval_split, sr, cfg.step_deg, cfg.max_clips)
        est = [foa.intensity_doa(windows(c.wave, pcfg.window_samples, 1)[0], sr)[0] for c in eval_clips]
        pred = np.round(np.asarray(est) / cfg.step_deg).astype(int) % n_classes
    else:
        net, pcfg = network(cfg)
        sr = pcfg.data.sample_rate
        train_clips, _ = load_doa_clips(cfg.data_root, cfg.train_split, sr, cfg.step_deg, cfg.max_clips)
        eval_clips, skipped = load_doa_clips(cfg.data_root, cfg.eval_split, sr, cfg.step_deg, cfg.max_clips)
        x_eval = clip_features(eval_clips, pcfg, 1)
        audio = net.audio.to(device)
        if cfg.method.startswith("svm-"):
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
            from sklearn.svm import LinearSVC
            shots = [train_clips[i] for i in one_shot_indices(train_clips, cfg.shots, cfg.seed)]
            x_shots = embed(audio, clip_features(shots, pcfg, 1), device, cfg.batch_size)
            svm = make_pipeline(StandardScaler(), LinearSVC(C=cfg.svm_c, max_iter=20000))
            with warnings.catch_warnings():  # one example per class is the point here, not a regression problem
                warnings.filterwarnings("ignore", message="The number of unique classes")
                svm.fit(x_shots, [c.label for c in shots])
            pred = svm.predict(embed(audio, x_eval, device, cfg.batch_size))
            log.info("doa %s: linear SVM on %d examples (%d directions)", cfg.method, len(shots),
                     len({c.label for c in shots}))
        else:
            if cfg.train_per_direction:
                train_clips = [train_clips[i] for i in one_shot_indices(train_clips, cfg.train_per_direction,
                                                                        cfg.seed)]
            x_train = clip_features(train_clips, pcfg, cfg.train_windows)
            y_train = torch.tensor([c.label for c in train_clips for _ in range(cfg.train_windows)])
            model = DoaClassifier(audio, n_classes).to(device)
            optimizer = torch.optim.AdamW(param_groups(model.audio, model.head, cfg), weight_decay=cfg.weight_decay)
            for epoch in range(cfg.epochs):
                loss = train_one_epoch(model, x_train, y_train, optimizer, cfg, device, epoch)
                err = float(np.mean(score(predict(model, x_eval, device, cfg.batch_size), eval_clips,
                                          cfg.step_deg)["doa_err"]))
                history.append({"epoch": epoch, "loss": loss, f"{cfg.eval_split}_doa_err": err})
                log.info("doa %s epoch %d: loss %.4f, %s doa_err %.1f deg", cfg.method, epoch, loss, cfg.eval_split,
                         err)
                if report is not None:
                    report(epoch, {"loss": loss, f"{cfg.eval_split}_doa_err": err})
            pred = predict(model, x_eval, device, cfg.batch_size)

    per_clip = score(pred, eval_clips, cfg.step_deg)
    metrics = {k: float(np.mean(v)) for k, v in per_clip.items()}
    if cfg.method in ("intensity",) or cfg.method.startswith("svm-"):
        history.append({"epoch": 0, f"{cfg.eval_split}_doa_err": metrics["doa_err"]})
        if report is not None:
            report(0, {f"{cfg.eval_split}_doa_err": metrics["doa_err"]})
    log.info("doa %s: %s doa_err %.1f deg, acc %.3f (%d clips)", cfg.method, cfg.eval_split, metrics["doa_err"],
             metrics["acc"], len(eval_clips))
    figures = {}
    if cfg.out_dir:
        figures["predictions"] = str(plot_predictions(
            [c.azimuth_deg for c in eval_clips], grid_azimuth(pred, cfg.step_deg), Path(cfg.out_dir) / "doa.png",
            f"doa {cfg.method}: {metrics['doa_err']:.1f} deg mean error"))
    return {"metrics": metrics, "per_clip": per_clip, "clip_ids": [c.clip_id for c in eval_clips],
            "history": history, "figures": figures, "skipped": skipped}
