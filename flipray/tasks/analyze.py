"""Embedding analysis (the paper's Sec. 5.1): how much *where the sound is* the pretext embeddings hold.

    python -m jobs.analyze --data data/demo --preset demo --pretext flip=runs/dev-demo/checkpoint.pt \
        --local --no-mlflow --out /tmp/an

For windows of every eval clip: PC1 of the audio embedding and a linear probe (ridge, fitted on the train split)
against the left/right energy difference and the true azimuth, and Grad-CAM / saliency of the flip evidence on the
visual map against the same (the paper: R = 0.790 audio, 0.286 visual). The `scratch` row (random weights) is the
baseline: how much *more* position a pretext task puts into the embedding. Metric definitions and figures:
docs/tasks.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flipray.tasks import metrics
from flipray.pretext.data import AudioFeatures, window_frame_indices, window_samples_range
from flipray.tasks.base import (Clip, DownstreamConfig, audio_input, load_clips, method_spec, pretext_network, setup,
                                sounding_objects, visual_input)

log = logging.getLogger(__name__)

ORDER = 1  # where its table comes in the report (the paper's order)
TABLE = {
    "task": "analyze",
    "table": "Section 5.1",
    "metrics": ["r_probe_azimuth", "probe_mae_deg", "r_pca_azimuth", "r_pca_energy", "r_gradcam_energy",
                "r_gradcam_azimuth", "r_saliency_energy", "r_saliency_azimuth", "r_energy_azimuth"],
    "primary": "r_probe_azimuth",
    "paired_metric": "probe_mae_deg",   # R has no per-clip value; the probe's per-clip error does
    "higher_is_better": {"r_probe_azimuth": True, "probe_mae_deg": False, "r_pca_azimuth": True,
                         "r_pca_energy": True, "r_gradcam_energy": True, "r_gradcam_azimuth": True,
                         "r_saliency_energy": True, "r_saliency_azimuth": True, "r_energy_azimuth": True},
    "notes": "Pearson R on eval-split windows. PCA and the ridge probe are fitted on train-split windows; energy = "
             "10 log10(E_R/E_L) of the window (the paper's audio-derived position); azimuth = the synthetic "
             "sidecar's, single-source clips only. Grad-CAM and saliency (|gradient|) of the flip margin on the "
             "visual map, horizontal centre of mass. Paper (YouTube-ASMR): R = 0.790 (audio features vs energy), "
             "R = 0.286 (visual attention vs energy). per_clip = mean |probe error| in degrees per clip.",
}

METHODS = {
    "flip": {"label": "Flip (ours)", "pretext": "flip"},
    "mismatch": {"label": "Mismatch task", "pretext": "mismatch"},
    "shift": {"label": "Shift task", "pretext": "shift"},
    "scratch": {"label": "No pretraining (random weights)", "pretext": None},
}

# The paper's numbers (Yang, Russell & Salamon, CVPR 2020) as printed, on real data (YouTube-ASMR, FAIR-Play,
# TAU), for orientation; flipray.tasks.tables puts them beside ours. numbers: {method: {metric: value}}.
PAPER = {
    # Sec. 5.1 (text, no table): Pearson R of the audio embedding, and of the visual attention, with the source's
    # approximate position from the left/right log-energy difference; named as flipray.tasks.analyze's closest metrics
    # (first principal component of the audio features; horizontal centre of the Grad-CAM map).
    "analyze": {
        "table": "Sec. 5.1", "data": "YouTube-ASMR held-out clips (numbers from the text)",
        "units": {},
        "labels": {
            "flip": "Ours (flip task)",
        },
        "numbers": {
            "flip": {"r_pca_energy": 0.79, "r_gradcam_energy": 0.286},
        },
    },
}


@dataclass
class Config(DownstreamConfig):
    # epochs / lr / lr_backbone / weight_decay of DownstreamConfig are unused: nothing is trained but a closed-form
    # ridge probe. batch_size is the windows per forward pass.
    hop_s: float = 0.5                # a window starts every hop_s seconds (dense enough for the tracking strip)
    max_train_clips: int = 0          # cap on train clips for PCA + probe (0 = all; only their audio is decoded)
    probe_folds: int = 5              # k of the grouped k-fold cross-validation that picks the ridge strength
    tracking_bins: int = 8            # horizontal bins PC1 is mapped to in the tracking strip (paper Fig. 4a)
    cam: bool = True                  # compute Grad-CAM (needs the visual stream; False = audio-only analysis)
    cam_examples: int = 4             # frames shown in gradcam.png


PRESETS = {
    # ~1-2 min per method on one core with data/demo: 240 train clips (audio only) + 60 test clips, a window a second
    "demo": {"hop_s": 1.0, "max_train_clips": 240, "batch_size": 64, "threads": 1},
    "small": {"hop_s": 0.5, "batch_size": 64},
    # the paper: all held-out windows; a denser hop for the tracking figures
    "paper": {"hop_s": 0.5, "batch_size": 32},
}

RIDGE_ALPHAS = np.logspace(-2, 4, 13)  # on standardised embeddings; CV picks one


# ---------------------------------------------------------------------------------------------------------------------
# Windows and their audio-derived / true positions

@dataclass
class Window:
    clip: int                  # index into the clip list
    start: int                 # first stored frame
    energy_db: float           # 10 log10(E_R / E_L)
    azimuth: float             # mean azimuth of the single sounding object (nan: not a single-source clip)


def energy_difference_db(wave: torch.Tensor, eps: float = 1e-10) -> float:
    """The paper's audio-derived source position: 10 log10(E_right / E_left) of a (2, S) window in dB (channel 0 =
    left), positive when the right channel is louder."""
    if wave.ndim != 2 or wave.shape[0] != 2:
        raise ValueError(f"energy_difference_db needs stereo audio (2, S), got {tuple(wave.shape)}")
    e = wave.double().pow(2).sum(dim=1)
    return float(10 * torch.log10((e[1] + eps) / (e[0] + eps)))


def window_starts(num_frames: int, pcfg, hop_s: float) -> list[int]:
    """First frames of the windows every hop_s seconds that fit in a clip of num_frames stored frames."""
    hop = max(1, round(hop_s * pcfg.data.fps))
    last = num_frames - pcfg.window_frames
    return list(range(0, last + 1, hop)) if last >= 0 else []


def make_windows(clips: list[Clip], pcfg, hop_s: float) -> list[Window]:
    out = []
    for ci, clip in enumerate(clips):
        sounding = sounding_objects(clip)
        n = int(clip.row.get("num_frames") or clip.meta.get("num_frames") or len(clip.frames))
        for start in window_starts(n, pcfg, hop_s):
            s0, s1 = window_samples_range(pcfg, start)
            wave = clip.wave[:, s0:s1]
            az = float("nan")
            if len(sounding) == 1:
                frames = range(start, min(start + pcfg.window_frames, n))
                az = float(np.mean([sounding[0]["azimuth_deg"][f] for f in frames]))
            out.append(Window(ci, start, energy_difference_db(wave), az))
    return out


def load_audio_clips(root: str, split: str, sample_rate: int, max_clips: int = 0) -> list[Clip]:
    """The train split for PCA and the probe needs only audio and sidecars: 20x faster than decoding the video."""
    return load_clips(root, split, 0, sample_rate, max_clips, video=False)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings, PCA, probe

@torch.no_grad()
def audio_embeddings(net, clips: list[Clip], windows: list[Window], pcfg, batch_size: int,
                     device: torch.device) -> np.ndarray:
    """(N, audio_dim): each window's audio embedding averaged over time, as the pretext network was trained."""
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    features = AudioFeatures(pcfg)
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="audio embeddings", unit="batch", leave=False):
        batch = []
        for w in windows[i:i + batch_size]:
            batch.append(audio_input(_window_wave(clips[w.clip], w, pcfg), features))
        out.append(net.embed_audio(torch.stack(batch).to(device)).mean(dim=-1).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def fit_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, first principal axis) of the rows of x."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[0]


def first_component(x_fit: np.ndarray, orient_by: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PC1 (mean, axis) of x_fit, its sign chosen so that PC1 correlates positively with orient_by."""
    mean, axis = fit_pca(x_fit)
    pc = (x_fit - mean) @ axis
    if np.ptp(pc) > 0 and np.ptp(orient_by) > 0 and np.corrcoef(pc, orient_by)[0, 1] < 0:
        axis = -axis
    return mean, axis


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression with an unpenalised intercept -> (weights, intercept)."""
    xm, ym = x.mean(axis=0), y.mean()
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def grouped_folds(groups: list, k: int) -> list[np.ndarray]:
    """k folds of row indices with every group (scene) inside one fold; groups dealt round-robin in sorted order."""
    names = sorted(set(groups))
    k = max(2, min(k, len(names)))
    fold_of = {g: i % k for i, g in enumerate(names)}
    gid = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(gid == f) for f in range(k)]


class RidgeProbe:
    """Standardise, then ridge regression; the strength picked by grouped k-fold cross-validation (mean squared
    error of the held-out folds)."""

    def __init__(self, folds: int = 5, alphas=RIDGE_ALPHAS):
        self.folds, self.alphas = folds, list(alphas)

    def fit(self, x: np.ndarray, y: np.ndarray, groups: list) -> "RidgeProbe":
        if len(x) < 3:
            raise ValueError(f"the probe needs at least 3 training windows, got {len(x)}")
        self.mu, self.sd = x.mean(axis=0), x.std(axis=0) + 1e-8
        z = (x - self.mu) / self.sd
        folds = grouped_folds(groups, self.folds)
        self.cv_mse = {}
        for a in self.alphas:
            err = []
            for test in folds:
                train = np.setdiff1d(np.arange(len(z)), test)
                w, b = ridge_fit(z[train], y[train], a)
                err.append(np.mean((z[test] @ w + b - y[test]) ** 2))
            self.cv_mse[float(a)] = float(np.mean(err))
        self.alpha = min(self.cv_mse, key=self.cv_mse.get)
        self.w, self.b = ridge_fit(z, y, self.alpha)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mu) / self.sd @ self.w + self.b


# ---------------------------------------------------------------------------------------------------------------------
# Grad-CAM on the visual stream

def _cam_layer(net) -> torch.nn.Module:
    visual = net.visual
    if getattr(visual, "pooled", True) or not hasattr(visual, "reduce"):
        raise ValueError(f"Grad-CAM needs the per-frame spatial map of the base visual stream; variant "
                         f"{net.variant!r} has none (set cam=false)")
    return visual.reduce


def attention_maps(net, video: torch.Tensor, audio: torch.Tensor,
                   audio_swapped: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Where the visual stream looks: {"gradcam", "saliency"} maps (B, T, h, w) over the map `net.visual.reduce`
    for a video batch (B, T, 3, H, W).

    Target Y: logit(audio_swapped) - logit(audio) (the flip evidence margin; see the module docstring), or -logit(audio)
    (evidence that the audio is as recorded) when audio_swapped is None. "gradcam" is Grad-CAM, ReLU(sum_c
    mean_xy(dY/dA_c) A_c); "saliency" is sum_c |dY/dA_c| at each position, which keeps the per-position gradients
    Grad-CAM averages away (the flattened visual map gives every position its own fusion weights). The network's
    weights are not changed and need no gradient."""
    layer, captured = _cam_layer(net), {}

    def hook(_module, _inputs, output):
        # A leaf that requires grad, so the backward pass stops here whether or not the weights require grad.
        captured["map"] = output.detach().requires_grad_(True)
        return captured["map"]

    b, t = video.shape[:2]
    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            if audio_swapped is None:
                target = -net(video, audio).sum()
            else:  # both audios in one pass: the map is computed twice, its two gradients add up
                logits = net(torch.cat([video, video]), torch.cat([audio, audio_swapped]))
                target = logits[b:].sum() - logits[:b].sum()
            grad, = torch.autograd.grad(target, captured["map"])
    finally:
        handle.remove()
    fmap = captured["map"].detach()
    if audio_swapped is not None:
        grad, fmap = grad[:b * t] + grad[b * t:], fmap[:b * t]
    weights = grad.mean(dim=(2, 3), keepdim=True)                 # (B*T, C, 1, 1)
    return {"gradcam": F.relu((weights * fmap).sum(dim=1)).unflatten(0, (b, t)),
            "saliency": grad.abs().sum(dim=1).unflatten(0, (b, t))}


def horizontal_center(cam: torch.Tensor) -> torch.Tensor:
    """Horizontal centre of mass in [0, 1] of the last two axes (h, w) of a map; 0.5 for an all-zero map."""
    w = cam.shape[-1]
    cols = cam.sum(dim=-2)                                        # (..., w)
    xs = (torch.arange(w, dtype=cam.dtype) + 0.5) / w
    total = cols.sum(dim=-1)
    return torch.where(total > 0, (cols * xs).sum(dim=-1) / total.clamp_min(1e-12), torch.full_like(total, 0.5))


def attention_centers(net, clips: list[Clip], windows: list[Window], pcfg, batch_size: int,
                      device: torch.device) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """{"gradcam" | "saliency": ((N,) horizontal centre of mass of each window's map, averaged over its frames, in
    stored-frame pixels; the maps (N, h, w))}."""
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    from flipray.pretext.data import flip_channels
    features = AudioFeatures(pcfg)
    margin, crop = (pcfg.data.resize - pcfg.data.crop) / 2, pcfg.data.crop
    out = {"gradcam": ([], []), "saliency": ([], [])}
    for i in tqdm(range(0, len(windows), batch_size), desc="grad-cam", unit="batch", leave=False):
        chunk = windows[i:i + batch_size]
        video, audio, swapped, scale = [], [], [], []
        for w in chunk:
            clip = clips[w.clip]
            wave = _window_wave(clip, w, pcfg)
            video.append(visual_input(clip, w.start, pcfg))
            audio.append(audio_input(wave, features))
            swapped.append(audio_input(flip_channels(wave), features))
            scale.append(clip.meta.get("width", 256) / pcfg.data.resize)
        maps = attention_maps(net, torch.stack(video).to(device), torch.stack(audio).to(device),
                              torch.stack(swapped).to(device))
        for name, m in maps.items():
            m = m.mean(dim=1).cpu()                                     # (B, h, w), over the window's frames
            cx = horizontal_center(m)                                   # of the crop, in [0, 1]
            out[name][0].append(((margin + cx * crop) * torch.tensor(scale)).numpy())
            out[name][1].append(m)
    return {k: (np.concatenate(c).astype(np.float64), torch.cat(m)) for k, (c, m) in out.items()}


def _window_wave(clip: Clip, w: Window, pcfg) -> torch.Tensor:
    s0, s1 = window_samples_range(pcfg, w.start)
    wave = clip.wave[:, s0:s1]
    if wave.shape[1] < s1 - s0:  # the clip's audio ends a few samples early
        wave = F.pad(wave, (0, s1 - s0 - wave.shape[1]))
    return wave


# ---------------------------------------------------------------------------------------------------------------------
# The trial

def run_trial(cfg: Config, report=None) -> dict:
    method_spec(cfg, METHODS)
    device = setup(cfg)
    net, pcfg = pretext_network(cfg)
    net.eval().to(device).requires_grad_(False)

    train_clips = load_audio_clips(cfg.data_root, cfg.train_split, pcfg.data.sample_rate,
                                   cfg.max_train_clips or cfg.max_clips)
    eval_clips, skipped = load_clips(cfg.data_root, cfg.eval_split, pcfg.data.resize, pcfg.data.sample_rate,
                                     cfg.max_clips)
    train_win = make_windows(train_clips, pcfg, cfg.hop_s)
    eval_win = make_windows(eval_clips, pcfg, cfg.hop_s)
    if not train_win or not eval_win:
        raise ValueError(f"{cfg.data_root}: clips are shorter than the pretext window ({pcfg.data.window_s} s)")
    log.info("%s: %d train windows (%d clips), %d %s windows (%d clips)", cfg.method, len(train_win),
             len(train_clips), len(eval_win), cfg.eval_split, len(eval_clips))

    x_train = audio_embeddings(net, train_clips, train_win, pcfg, cfg.batch_size, device)
    x_eval = audio_embeddings(net, eval_clips, eval_win, pcfg, cfg.batch_size, device)
    e_train = np.array([w.energy_db for w in train_win])
    e_eval = np.array([w.energy_db for w in eval_win])
    az_train = np.array([w.azimuth for w in train_win])
    az_eval = np.array([w.azimuth for w in eval_win])
    single_tr, single_ev = np.isfinite(az_train), np.isfinite(az_eval)

    # PC1, fitted on train windows and oriented there by the (label-free) energy difference
    mean, axis = first_component(x_train, e_train)
    pc_train, pc_eval = (x_train - mean) @ axis, (x_eval - mean) @ axis
    m = {"r_pca_energy": _r(pc_eval, e_eval), "r_pca_azimuth": _r(pc_eval[single_ev], az_eval[single_ev]),
         "r_energy_azimuth": _r(e_eval[single_ev], az_eval[single_ev])}

    # the linear probe: fit on train, scored on eval
    pred = np.full(len(eval_win), np.nan)
    cv_mse = float("nan")
    if single_tr.sum() >= 3 and single_ev.any():
        groups = [train_clips[w.clip].row.get("scene_id", train_clips[w.clip].clip_id)
                  for w, s in zip(train_win, single_tr) if s]
        probe = RidgeProbe(cfg.probe_folds).fit(x_train[single_tr], az_train[single_tr], groups)
        pred[single_ev] = probe.predict(x_eval[single_ev])
        cv_mse = probe.cv_mse[probe.alpha]
        log.info("%s: probe ridge alpha %.3g (grouped %d-fold CV MSE %.1f deg^2)", cfg.method, probe.alpha,
                 cfg.probe_folds, cv_mse)
    else:
        log.warning("no single-source windows with a true azimuth in %s/%s: the azimuth metrics are NaN",
                    cfg.data_root, cfg.train_split if single_tr.sum() < 3 else cfg.eval_split)
    m["r_probe_azimuth"] = _r(pred[single_ev], az_eval[single_ev])
    m["probe_mae_deg"] = float(np.mean(np.abs(pred[single_ev] - az_eval[single_ev]))) if single_ev.any() \
        else float("nan")

    # Grad-CAM and saliency of the flip margin on the visual stream
    attention = {}
    if cfg.cam:
        attention = attention_centers(net, eval_clips, eval_win, pcfg, cfg.batch_size, device)
    for name in ("gradcam", "saliency"):
        cx = attention[name][0] if name in attention else np.full(len(eval_win), np.nan)
        m[f"r_{name}_energy"] = _r(cx, e_eval)
        m[f"r_{name}_azimuth"] = _r(cx[single_ev], az_eval[single_ev])

    # per clip: the probe's mean absolute error (degrees) over the clip's windows
    clip_ids, per_clip = [], []
    for ci, clip in enumerate(eval_clips):
        errs = [abs(pred[k] - w.azimuth) for k, w in enumerate(eval_win) if w.clip == ci and single_ev[k]]
        if errs:
            clip_ids.append(clip.clip_id)
            per_clip.append(float(np.mean(errs)))

    m = {k: m[k] for k in TABLE["metrics"]}
    if report is not None:
        report(0, m)
    figures = {}
    if cfg.out_dir:
        figures = write_figures(cfg, pcfg, eval_clips, eval_win, pc_train, pc_eval, pred, e_eval, attention)
    return {"metrics": m, "per_clip": {"probe_mae_deg": per_clip}, "clip_ids": clip_ids,
            "history": [{"epoch": 0, **m, "loss": cv_mse}], "figures": figures,
            "windows": {"train": len(train_win), "eval": len(eval_win), "eval_single_source": int(single_ev.sum())},
            "skipped": skipped}


def _r(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    return metrics.pearson_r(x[ok], y[ok])["r"]


# ---------------------------------------------------------------------------------------------------------------------
# Figures

def write_figures(cfg, pcfg, clips, windows, pc_train, pc_eval, pred, energy, attention) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    az = np.array([w.azimuth for w in windows])
    single = np.isfinite(az)
    figures = {}

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [(pc_eval, "audio embedding PC1", "r_pca"), (pred, "probe prediction (deg)", "r_probe"),
              (energy, "energy difference 10 log10(E_R/E_L) (dB)", "r_energy")]
    for ax, (y, label, name) in zip(axes, panels):
        ok = single & np.isfinite(y)
        ax.scatter(az[ok], y[ok], s=6, alpha=0.5)
        ax.set_xlabel("true azimuth (deg, + = right)")
        ax.set_ylabel(label)
        ax.set_title(f"{name}_azimuth R = {_r(az[ok], y[ok]):.3f}  (n = {int(ok.sum())})")
    fig.suptitle(f"{cfg.method}: {cfg.eval_split} windows")
    fig.tight_layout()
    figures["scatter"] = str(out / "scatter.png")
    fig.savefig(figures["scatter"], dpi=90)
    plt.close(fig)

    # the tracking strip: one single-source clip whose source moves the most, PC1 binned into horizontal positions
    lo, hi = np.percentile(pc_train, [2, 98])
    bins = cfg.tracking_bins
    spread = {}
    for k, w in enumerate(windows):
        if single[k]:
            spread.setdefault(w.clip, []).append(w.azimuth)
    if windows:
        ci = max(spread, key=lambda c: np.ptp(spread[c])) if spread else windows[0].clip  # no truth: any clip
        ks = [k for k, w in enumerate(windows) if w.clip == ci]
        ks = [ks[j] for j in np.linspace(0, len(ks) - 1, min(8, len(ks))).round().astype(int)]
        clip = clips[ci]
        fig, axes = plt.subplots(1, len(ks), figsize=(2.1 * len(ks), 2.6), squeeze=False)
        for ax, k in zip(axes[0], ks):
            w = windows[k]
            f = w.start + pcfg.window_frames // 2
            frame = clip.frames[f].numpy()
            size = frame.shape[1]
            s = size / clip.meta.get("width", 256)
            b = int(np.clip((pc_eval[k] - lo) / max(hi - lo, 1e-12) * bins, 0, bins - 1))
            ax.imshow(frame)
            ax.add_patch(Rectangle((b * size / bins, 0), size / bins, size, color="yellow", alpha=0.45, lw=0))
            title = f"t={f / pcfg.data.fps:.1f}s"
            if spread:
                obj = sounding_objects(clip)[0]
                x0, y0, x1, y1 = (v * s for v in obj["boxes"][f])
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
                title += f" az={obj['azimuth_deg'][f]:+.0f}"
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{cfg.method}: {clip.clip_id}, yellow = PC1 bin ({bins} bins), green = true box", fontsize=9)
        fig.tight_layout()
        figures["tracking"] = str(out / "tracking.png")
        fig.savefig(figures["tracking"], dpi=90)
        plt.close(fig)

    if attention:
        order = [k for k in np.argsort(-np.abs(energy)) if single[k]] or list(np.argsort(-np.abs(energy)))
        picks, seen = [], set()
        for k in order:  # the clearest (most one-sided) windows, one per clip
            if windows[k].clip not in seen:
                picks.append(k)
                seen.add(windows[k].clip)
            if len(picks) == cfg.cam_examples:
                break
        fig, axes = plt.subplots(len(attention), len(picks), figsize=(2.4 * len(picks), 2.6 * len(attention)),
                                 squeeze=False)
        margin = (pcfg.data.resize - pcfg.data.crop) // 2
        for row, (name, (centers, maps)) in zip(axes, attention.items()):
            for ax, k in zip(row, picks):
                w, clip = windows[k], clips[windows[k].clip]
                f = window_frame_indices(pcfg, w.start)[pcfg.data.num_frames // 2]
                frame = clip.frames[f, margin:margin + pcfg.data.crop, margin:margin + pcfg.data.crop].numpy()
                cam = F.interpolate(maps[k][None, None], size=frame.shape[:2], mode="bilinear",
                                    align_corners=False)[0, 0]
                ax.imshow(frame)
                ax.imshow(cam.numpy(), cmap="jet", alpha=0.45)
                s = pcfg.data.resize / clip.meta.get("width", 256)
                if single[k]:
                    x0, y0, x1, y1 = (v * s - margin for v in sounding_objects(clip)[0]["boxes"][f])
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
                ax.axvline(centers[k] * s - margin, color="white", ls="--", lw=1)
                ax.set_title(f"{name}: {energy[k]:+.1f} dB" + (f", az {w.azimuth:+.0f}" if single[k] else ""),
                             fontsize=8)
                ax.axis("off")
        fig.suptitle(f"{cfg.method}: visual attention to the flip margin (box = sounding object, dashed = centre "
                     "of mass)", fontsize=9)
        fig.tight_layout()
        figures["gradcam"] = str(out / "gradcam.png")
        fig.savefig(figures["gradcam"], dpi=90)
        plt.close(fig)
    return figures
