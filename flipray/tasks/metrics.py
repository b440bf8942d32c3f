"""Metrics of the paper's downstream tasks (Tables 3-6), the 2.5D Visual Sound audio distances, BSS Eval, and the
paired tests the report uses. torch / numpy / scipy (+ mir_eval for BSS Eval), no Ray or MLflow.

    from flipray.tasks import metrics
    metrics.ap50(pred_boxes, pred_scores, pred_image_ids, gt_boxes, gt_image_ids)      # Table 3, AP50
    metrics.stft_distance(pred_lr, gt_lr), metrics.envelope_distance(pred_lr, gt_lr)   # upmixing (2.5D Visual Sound)
    metrics.bss_eval(reference_sources, estimated_sources)                              # separation: SDR/SIR/SAR
    metrics.wilcoxon(errors_ours, errors_baseline)                                      # paired signed-rank test

Conventions. Boxes are [x0, y0, x1, y1] in continuous coordinates (area = (x1 - x0) * (y1 - y0), no +1 pixel as in
the VOC devkit), in pixels or normalised, as long as predictions and ground truth agree. Audio is (C, S) or
(B, C, S) with channel 0 = left, 16 kHz, float; the STFT is flipray's and the paper's: n_fft 512, hop 160 (10 ms),
Hann window of 400 samples (25 ms) zero-padded to 512, centred frames with reflect padding (librosa's `stft` of the
2.5D Visual Sound evaluation and torch.stft agree on all of these).
"""
from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import numpy as np
import torch

N_FFT, HOP, WIN = 512, 160, 400  # = flipray.config.DataConfig defaults at 16 kHz

# --------------------------------------------------------------------------------------------------- boxes (Table 3)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every box in `a` (N, 4) with every box in `b` (M, 4) -> (N, M).

    Degenerate boxes (zero area) have IOU 0 with everything, including themselves.
    """
    a, b = _boxes(a, "a"), _boxes(b, "b")
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def average_precision(pred_boxes, pred_scores, pred_image_ids, gt_boxes, gt_image_ids,
                      iou_threshold: float = 0.5) -> float:
    """VOC-style average precision: the area under the all-point interpolated precision-recall curve.

    Predictions are taken in descending score order (ties keep their input order). A prediction is a true positive
    when its highest-IOU ground-truth box in the same image has IOU >= `iou_threshold` and was not matched by a
    higher-scoring prediction; otherwise (duplicate, poor overlap, an image without ground truth) it is a false
    positive. Each ground-truth box is matched at most once; ground truth nobody finds caps the recall. Interpolation
    is the VOC 2010+ one: precision at recall r is the highest precision at any recall >= r, and AP sums it over the
    recall steps (no 11-point sampling). Returns a fraction in [0, 1] (the paper prints AP50 x 100).
    """
    pred_boxes, gt_boxes = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
    scores = torch.as_tensor(pred_scores, dtype=torch.float64).reshape(-1)
    pred_ids, gt_ids = _ids(pred_image_ids, "pred_image_ids"), _ids(gt_image_ids, "gt_image_ids")
    if not (len(pred_boxes) == len(scores) == len(pred_ids)):
        raise ValueError(f"pred_boxes ({len(pred_boxes)}), pred_scores ({len(scores)}) and pred_image_ids "
                         f"({len(pred_ids)}) must have one entry per prediction")
    if len(gt_boxes) != len(gt_ids):
        raise ValueError(f"gt_boxes ({len(gt_boxes)}) and gt_image_ids ({len(gt_ids)}) must have the same length")
    if len(gt_boxes) == 0:
        raise ValueError("average_precision needs at least one ground-truth box (recall is undefined without)")
    by_image: dict[Hashable, list[int]] = {}
    for j, image in enumerate(gt_ids):
        by_image.setdefault(image, []).append(j)
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    order = torch.argsort(-scores, stable=True)
    tp = torch.zeros(len(order), dtype=torch.float64)
    for rank, i in enumerate(order.tolist()):
        candidates = by_image.get(pred_ids[i])
        if not candidates:
            continue
        ious = box_iou(pred_boxes[i:i + 1], gt_boxes[candidates])[0]
        best = int(torch.argmax(ious))
        if ious[best] >= iou_threshold and not matched[candidates[best]]:
            matched[candidates[best]] = True
            tp[rank] = 1.0
    ctp = torch.cumsum(tp, 0)
    recall = ctp / len(gt_boxes)
    precision = ctp / torch.arange(1, len(order) + 1, dtype=torch.float64)
    mrec = torch.cat([torch.zeros(1, dtype=torch.float64), recall, torch.ones(1, dtype=torch.float64)])
    mpre = torch.cat([torch.zeros(1, dtype=torch.float64), precision, torch.zeros(1, dtype=torch.float64)])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])  # the monotone envelope from the right
    steps = torch.nonzero(mrec[1:] != mrec[:-1]).reshape(-1)
    return float(torch.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def ap50(pred_boxes, pred_scores, pred_image_ids, gt_boxes, gt_image_ids) -> float:
    """`average_precision` at IOU 0.5, the paper's "AP50" (Table 3)."""
    return average_precision(pred_boxes, pred_scores, pred_image_ids, gt_boxes, gt_image_ids, iou_threshold=0.5)


def top_box_per_image(pred_boxes, pred_scores, pred_image_ids) -> dict[Hashable, torch.Tensor]:
    """{image id: its highest-scoring predicted box (4,)}; ties go to the first in input order."""
    pred_boxes = _boxes(pred_boxes, "pred_boxes")
    scores = torch.as_tensor(pred_scores, dtype=torch.float64).reshape(-1)
    ids = _ids(pred_image_ids, "pred_image_ids")
    if not (len(pred_boxes) == len(scores) == len(ids)):
        raise ValueError(f"pred_boxes ({len(pred_boxes)}), pred_scores ({len(scores)}) and pred_image_ids "
                         f"({len(ids)}) must have one entry per prediction")
    best: dict[Hashable, int] = {}
    for i, image in enumerate(ids):
        if image not in best or scores[i] > scores[best[image]]:
            best[image] = i
    return {image: pred_boxes[i] for image, i in best.items()}


def top_box_iou(pred_boxes, pred_scores, pred_image_ids, gt_boxes, gt_image_ids, reduction: str = "mean"):
    """IOU of each image's highest-scoring box with its ground truth, the paper's "IOU" (Table 3).

    One value per image that has ground truth, in order of first appearance in `gt_image_ids`: the best IOU of the
    top box with that image's ground-truth boxes, 0 when the image has no prediction. `reduction="mean"` -> float,
    `"none"` -> (image ids, float64 tensor of IOUs), the per-clip values the report's paired tests need.
    """
    gt_boxes, gt_ids = _boxes(gt_boxes, "gt_boxes"), _ids(gt_image_ids, "gt_image_ids")
    if len(gt_boxes) != len(gt_ids):
        raise ValueError(f"gt_boxes ({len(gt_boxes)}) and gt_image_ids ({len(gt_ids)}) must have the same length")
    if len(gt_boxes) == 0:
        raise ValueError("top_box_iou needs at least one ground-truth box")
    top = top_box_per_image(pred_boxes, pred_scores, pred_image_ids)
    images = list(dict.fromkeys(gt_ids))
    ious = torch.zeros(len(images), dtype=torch.float64)
    for k, image in enumerate(images):
        if image in top:
            gts = gt_boxes[[j for j, g in enumerate(gt_ids) if g == image]]
            ious[k] = box_iou(top[image][None], gts).max()
    if reduction == "none":
        return images, ious
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(ious.mean())


def center_error(pred: torch.Tensor, gt: torch.Tensor, width: float, height: float, reduction: str = "mean"):
    """Distance between box centres along x and along y, in percent of the frame width / height: the paper's
    "X-error" and "Y-error" (Table 3), for row-aligned pairs pred[i] <-> gt[i] (N, 4) (e.g. each frame's top box and
    its ground truth). `reduction="mean"` -> (x %, y %) floats; `"none"` -> two (N,) float64 tensors.
    """
    pred, gt = _boxes(pred, "pred"), _boxes(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"center_error pairs pred[i] with gt[i]: shapes {tuple(pred.shape)} and {tuple(gt.shape)} "
                         "differ")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    x = ((pred[:, 0] + pred[:, 2]) - (gt[:, 0] + gt[:, 2])).abs() / 2 / width * 100
    y = ((pred[:, 1] + pred[:, 3]) - (gt[:, 1] + gt[:, 3])).abs() / 2 / height * 100
    if reduction == "none":
        return x, y
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if len(pred) == 0:
        raise ValueError("center_error of no boxes")
    return float(x.mean()), float(y.mean())


def _boxes(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim == 1 and t.shape[0] == 4:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (N, 4) as [x0, y0, x1, y1], got {tuple(t.shape)}")
    return t


def _ids(x, name: str) -> list:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.reshape(-1).tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name}: expected a sequence of image ids, got {type(x).__name__}")
    return list(x)


# ----------------------------------------------------------------------------------- spatialization (Table 4)


def stft(wave, n_fft: int = N_FFT, hop: int = HOP, win: int = WIN) -> torch.Tensor:
    """Complex STFT (..., C, n_fft // 2 + 1, frames) in float64 with the conventions in the module docstring."""
    w = _wave(wave, "wave")
    flat = w.reshape(-1, w.shape[-1])
    spec = torch.stft(flat, n_fft, hop, win, window=torch.hann_window(win, dtype=torch.float64), center=True,
                      pad_mode="reflect", return_complex=True)
    return spec.reshape(*w.shape[:-1], *spec.shape[-2:])


def stft_distance(pred_lr, gt_lr, normalize: bool = False, reduction: str = "mean") -> torch.Tensor:
    """STFT distance of 2.5D Visual Sound (Gao & Grauman, CVPR 2019, Sec. 5), exactly as its released evaluate.py
    computes it: per channel, the mean over (real/imag, frequency, frame) of the squared difference between the
    complex STFTs of prediction and ground truth; summed over the channels (left + right). The paper text calls it
    "the Euclidean distance between the complex STFTs"; the code divides by the number of entries and does not take
    the square root, so its values (and these) are a mean squared error, not an L2 norm.

    `pred_lr`, `gt_lr`: (C, S) or (B, C, S). Returns a float64 tensor of the batch shape (0-d for one clip).
    `normalize=True` first divides each clip by its own peak (over both channels), as evaluate.py's
    `--normalization` does. `reduction="norm"` gives the literal Euclidean distance instead: per channel
    ||STFT_pred - STFT_gt||_2 over the flattened time-frequency bins, summed over channels.
    """
    p, g = _pair(pred_lr, gt_lr, normalize)
    diff = stft(p) - stft(g)
    squared = diff.real ** 2 + diff.imag ** 2
    if reduction == "mean":
        per_channel = squared.mean(dim=(-2, -1)) / 2  # mean over the 2 x F x T real entries
    elif reduction == "norm":
        per_channel = squared.sum(dim=(-2, -1)).sqrt()
    else:
        raise ValueError(f"reduction must be 'mean' (evaluate.py) or 'norm' (Euclidean), got {reduction!r}")
    return per_channel.sum(dim=-1)


def envelope_distance(pred_lr, gt_lr, normalize: bool = False) -> torch.Tensor:
    """Envelope distance of 2.5D Visual Sound, as its evaluate.py: per channel, the root mean square over samples of
    the difference between the Hilbert envelopes |hilbert(x)| (scipy.signal.hilbert) of ground truth and prediction;
    summed over channels. Shapes and `normalize` as `stft_distance`.
    """
    from scipy.signal import hilbert
    p, g = _pair(pred_lr, gt_lr, normalize)
    env_p, env_g = np.abs(hilbert(p.numpy(), axis=-1)), np.abs(hilbert(g.numpy(), axis=-1))
    per_channel = np.sqrt(np.mean((env_g - env_p) ** 2, axis=-1))
    return torch.as_tensor(per_channel.sum(axis=-1), dtype=torch.float64)


def spectrogram_l1(pred, gt, kind: str = "complex") -> torch.Tensor:
    """Mean absolute difference of spectrograms, the criterion the paper reports for upmixing (Table 4:
    `kind="complex"`, the real and imaginary parts, averaged over time-frequency bins) and separation (Table 5:
    `kind="magnitude"`). Which signal goes in is the caller's choice (the paper's upmixing target is the L-R
    difference; its separation target the separated source). Averaged over channels as well; shapes as
    `stft_distance`. The paper's values depend on its own amplitude scaling and are not comparable across datasets.
    """
    p, g = _pair(pred, gt, False)
    sp, sg = stft(p), stft(g)
    if kind == "complex":
        return ((sp.real - sg.real).abs() + (sp.imag - sg.imag).abs()).mean(dim=(-3, -2, -1)) / 2
    if kind == "magnitude":
        return (sp.abs() - sg.abs()).abs().mean(dim=(-3, -2, -1))
    raise ValueError(f"kind must be 'complex' or 'magnitude', got {kind!r}")


def _wave(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if t.ndim not in (2, 3):
        raise ValueError(f"{name}: expected audio of shape (C, S) or (B, C, S), got {tuple(t.shape)}")
    return t


def _pair(pred, gt, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = _wave(pred, "pred"), _wave(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and ground truth {tuple(g.shape)} must have the same shape")
    if normalize:
        p, g = _peak_normalize(p), _peak_normalize(g)
    return p, g


def _peak_normalize(w: torch.Tensor) -> torch.Tensor:
    peak = w.abs().amax(dim=(-2, -1), keepdim=True)
    return w / peak.clamp_min(1e-20)


# ------------------------------------------------------------------------------------------- separation (Table 5)


def bss_eval(reference_sources, estimated_sources, compute_permutation: bool = False) -> dict[str, np.ndarray]:
    """BSS Eval v3 (Vincent et al. 2006) SDR, SIR and SAR in dB per source, by mir_eval.separation.bss_eval_sources:
    each estimate is projected onto the span of all references delayed by 0..511 samples (a 512-tap distortion
    filter); the part in the span of its own reference is the target, the rest of that span interference, what lies
    outside artifacts. This is the evaluation of Sound of Pixels, on which the paper's separation builds.

    `reference_sources`, `estimated_sources`: (n_src, S), or (n_src, C, S) for multichannel sources, which are
    evaluated per channel and averaged over channels. estimate k belongs to reference k (the visual stream chose it);
    `compute_permutation=True` lets mir_eval pick the best assignment instead and adds "perm". Returns
    {"sdr", "sir", "sar"} as float64 arrays (n_src,). A perfect estimate gives very high values (> 100 dB; +inf
    when the residual is exactly zero). A silent (all-zero) reference or estimate has no defined BSS Eval and raises
    ValueError, as mir_eval does; use `sdr` for those.
    """
    from mir_eval.separation import bss_eval_sources
    ref, est = np.asarray(reference_sources, dtype=np.float64), np.asarray(estimated_sources, dtype=np.float64)
    if ref.shape != est.shape or ref.ndim not in (2, 3):
        raise ValueError(f"reference_sources {ref.shape} and estimated_sources {est.shape} must both be (n_src, S) "
                         "or (n_src, C, S)")
    for name, x in (("reference", ref), ("estimated", est)):
        silent = [k for k in range(len(x)) if not np.any(x[k])]
        if silent:
            raise ValueError(f"{name} source(s) {silent} are all zeros: BSS Eval is undefined for silent sources")
    if ref.ndim == 2:
        with warnings.catch_warnings():  # mir_eval 0.8 deprecates it for 0.9; pinned at 0.8.2, it is the reference
            warnings.simplefilter("ignore", FutureWarning)
            sdr_, sir_, sar_, perm = bss_eval_sources(ref, est, compute_permutation=compute_permutation)
        out = {"sdr": sdr_, "sir": sir_, "sar": sar_}
        if compute_permutation:
            out["perm"] = perm
        return out
    per_channel = [bss_eval(ref[:, c], est[:, c], compute_permutation) for c in range(ref.shape[1])]
    return {k: np.mean([r[k] for r in per_channel], axis=0) for k in per_channel[0]}


def mixture_floor(reference_sources, mixture) -> dict[str, np.ndarray]:
    """BSS Eval of the mixture itself as every source's estimate: the score a separator must beat (Sound of Pixels
    reports it as the baseline). `mixture` is (S,) or (C, S), the shape of one reference source."""
    ref, mix = np.asarray(reference_sources, dtype=np.float64), np.asarray(mixture, dtype=np.float64)
    if mix.shape != ref.shape[1:]:
        raise ValueError(f"mixture {mix.shape} must have the shape of one reference source {ref.shape[1:]}")
    return bss_eval(ref, np.broadcast_to(mix, ref.shape).copy())


def sdr(reference, estimate) -> np.ndarray:
    """Plain, scale-dependent SDR = 10 log10(||s||^2 / ||s - s_hat||^2) in dB over the last axis (no projection: a
    rescaled estimate is penalised). A perfect estimate gives +inf; an all-zero estimate gives exactly 0 dB (the error
    is the reference itself); a silent reference raises ValueError. Returns float64 of the leading shape."""
    s, e = np.asarray(reference, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    if s.shape != e.shape:
        raise ValueError(f"reference {s.shape} and estimate {e.shape} must have the same shape")
    num, den = np.sum(s ** 2, axis=-1), np.sum((s - e) ** 2, axis=-1)
    if np.any(num == 0):
        raise ValueError("sdr: a reference is all zeros, its SDR is undefined")
    with np.errstate(divide="ignore"):
        return 10 * np.log10(num / den)


# ----------------------------------------------------------------------------------------------------------- stats


def wilcoxon(a, b) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of paired samples a[i] <-> b[i] (scipy.stats.wilcoxon: exact null
    distribution for up to 50 pairs without ties, normal approximation otherwise; zero differences are dropped, as
    Wilcoxon did). The paper uses it for Tables 4 and 5. Returns {"statistic", "p_value", "n" (pairs),
    "median_diff" (median of a - b)}; when every difference is zero there is no evidence of a difference: p = 1.
    """
    from scipy.stats import wilcoxon as _wilcoxon
    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"wilcoxon pairs a[i] with b[i]: lengths {len(x)} and {len(y)} differ")
    if len(x) < 2:
        raise ValueError(f"wilcoxon needs at least 2 pairs, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("wilcoxon: the samples contain NaN or inf; drop those pairs first")
    d = x - y
    out = {"n": len(d), "median_diff": float(np.median(d))}
    if not np.any(d):
        return {"statistic": 0.0, "p_value": 1.0, **out}
    res = _wilcoxon(x, y, alternative="two-sided")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), **out}


def pearson_r(x, y) -> dict[str, float]:
    """Pearson correlation with its two-sided p-value (scipy.stats.pearsonr) -> {"r", "p_value", "n"}; the paper's
    Sec. 5.1 correlations (R = 0.790, 0.286). A constant input has no correlation: r and p are NaN."""
    from scipy.stats import pearsonr
    u, v = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if len(u) != len(v):
        raise ValueError(f"pearson_r pairs x[i] with y[i]: lengths {len(u)} and {len(v)} differ")
    if len(u) < 3:
        raise ValueError(f"pearson_r needs at least 3 pairs, got {len(u)}")
    if np.ptp(u) == 0 or np.ptp(v) == 0:
        return {"r": float("nan"), "p_value": float("nan"), "n": len(u)}
    res = pearsonr(u, v)
    return {"r": float(res.statistic), "p_value": float(res.pvalue), "n": len(u)}
