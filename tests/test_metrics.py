"""flipray.tasks.metrics against hand-computed values and independent implementations.

    .venv/bin/python -m pytest tests/test_metrics.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flipray.tasks import metrics

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------------ boxes

def test_box_iou_known_boxes():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3],    # offset by 1 diagonally: intersection 1, union 4 + 4 - 1 = 7
                      [1.0, 0, 3, 2],    # offset by 1 along x: intersection 2, union 6
                      [0.0, 0, 2, 2],    # itself
                      [5.0, 5, 6, 6],    # disjoint
                      [0.0, 0, 1, 1]])   # inside: 1 / 4
    iou = metrics.box_iou(a, b)
    assert iou.shape == (1, 5)
    assert iou[0].tolist() == pytest.approx([1 / 7, 1 / 3, 1.0, 0.0, 0.25])
    assert torch.equal(metrics.box_iou(b, a).T, iou)
    assert metrics.box_iou(torch.zeros(0, 4), b).shape == (0, 5)


# Three images, one ground-truth box each; image C is never detected, so recall tops out at 2/3.
GT = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30], [0.0, 0, 4, 4]])
GT_IDS = ["A", "B", "C"]
PRED = torch.tensor([[0.0, 0, 10, 10],     # 0.9 A: IOU 1 -> TP
                     [0.0, 0, 10, 10],     # 0.8 A: duplicate of a matched GT -> FP
                     [20.0, 20, 25, 25],   # 0.7 B: IOU 25/100 = 0.25 -> FP at 0.5
                     [20.0, 20, 30, 29]])  # 0.6 B: IOU 90/100 = 0.9 -> TP
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6])
PRED_IDS = ["A", "A", "B", "B"]


def test_ap50_hand_computed():
    # In score order: (P, R) = (1, 1/3), (1/2, 1/3), (1/3, 1/3), (2/4, 2/3). Interpolated precision (max precision
    # at any recall >= r) is 1 up to recall 1/3 and 1/2 up to 2/3, nothing beyond: AP = 1/3 * 1 + 1/3 * 1/2 = 1/2.
    assert metrics.ap50(PRED, SCORES, PRED_IDS, GT, GT_IDS) == pytest.approx(0.5)
    # Shuffling the input order changes nothing: the scores order it.
    perm = [2, 0, 3, 1]
    assert metrics.ap50(PRED[perm], SCORES[perm], [PRED_IDS[i] for i in perm], GT, GT_IDS) == pytest.approx(0.5)


def test_average_precision_threshold_changes_matching():
    # At IOU 0.2 the 0.7 box (IOU 0.25) matches B first, and the 0.6 box becomes the duplicate:
    # (P, R) = (1, 1/3), (1/2, 1/3), (2/3, 2/3), (2/4, 2/3) -> AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
    ap = metrics.average_precision(PRED, SCORES, PRED_IDS, GT, GT_IDS, iou_threshold=0.2)
    assert ap == pytest.approx(5 / 9)
    # Every ground truth found once with nothing else: AP 1; no predictions at all: AP 0.
    assert metrics.ap50(GT, torch.tensor([0.3, 0.2, 0.1]), GT_IDS, GT, GT_IDS) == pytest.approx(1.0)
    assert metrics.ap50(torch.zeros(0, 4), torch.zeros(0), [], GT, GT_IDS) == 0.0
    # A false positive ranked above the three true positives: (P, R) = (0, 0), (1/2, 1/3), (2/3, 2/3), (3/4, 1).
    # The interpolated precision takes the best precision at any higher recall, 3/4 everywhere: AP 3/4 (the
    # uninterpolated mean (1/2 + 2/3 + 3/4) / 3 = 0.639 would be wrong).
    boxes = torch.cat([torch.tensor([[50.0, 50, 60, 60]]), GT])
    assert metrics.ap50(boxes, torch.tensor([0.99, 0.3, 0.2, 0.1]), ["A"] + GT_IDS, GT, GT_IDS) == pytest.approx(
        3 / 4)
    with pytest.raises(ValueError, match="ground-truth"):
        metrics.ap50(PRED, SCORES, PRED_IDS, torch.zeros(0, 4), [])
    with pytest.raises(ValueError, match="pred_image_ids"):
        metrics.ap50(PRED, SCORES, PRED_IDS[:2], GT, GT_IDS)


def test_top_box_iou_and_center_error():
    # Top box per image: A -> the 0.9 box (IOU 1), B -> the 0.7 box (IOU 0.25), C -> none (0). Mean 1.25 / 3.
    assert metrics.top_box_iou(PRED, SCORES, PRED_IDS, GT, GT_IDS) == pytest.approx(1.25 / 3)
    ids, ious = metrics.top_box_iou(PRED, SCORES, PRED_IDS, GT, GT_IDS, reduction="none")
    assert ids == GT_IDS and ious.tolist() == pytest.approx([1.0, 0.25, 0.0])
    top = metrics.top_box_per_image(PRED, SCORES, torch.tensor([7, 7, 9, 9]))
    assert set(top) == {7, 9} and top[9].tolist() == [20.0, 20, 25, 25]

    # Centres (5, 5) vs (10, 10) in a 100 x 50 frame: 5 % of the width, 10 % of the height.
    pred = torch.tensor([[0.0, 0, 10, 10], [40.0, 20, 60, 30]])
    gt = torch.tensor([[5.0, 0, 15, 20], [40.0, 20, 60, 30]])
    x, y = metrics.center_error(pred, gt, width=100, height=50)
    assert (x, y) == pytest.approx((2.5, 5.0))   # the mean of (5, 0) and (10, 0)
    xs, ys = metrics.center_error(pred, gt, 100, 50, reduction="none")
    assert xs.tolist() == pytest.approx([5.0, 0.0]) and ys.tolist() == pytest.approx([10.0, 0.0])
    with pytest.raises(ValueError, match="differ"):
        metrics.center_error(pred, gt[:1], 100, 50)


# ------------------------------------------------------------------------------------------------------------ audio

def _numpy_stft_power(x: np.ndarray, n_fft=512, hop=160, win=400) -> float:
    """sum |STFT|^2 of one channel, written from the definition: reflect-pad n_fft/2, periodic Hann of `win`
    centred in n_fft, frames every `hop`."""
    xp = np.pad(x, n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left:left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = [xp[i:i + n_fft] * window for i in range(0, len(xp) - n_fft + 1, hop)]
    spec = np.fft.rfft(np.stack(frames), axis=-1)
    return float(np.sum(np.abs(spec) ** 2)), spec.size


def test_stft_distance_identical_zero_and_against_independent_stft():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8000)).astype(np.float32)
    assert float(metrics.stft_distance(x, x)) == 0.0
    # Against silence the distance is each channel's own STFT energy over its 2 x F x T real entries, summed.
    expected = 0.0
    for c in range(2):
        power, n_bins = _numpy_stft_power(x[c].astype(np.float64))
        expected += power / (2 * n_bins)
    d = metrics.stft_distance(x, np.zeros_like(x))
    assert d.ndim == 0 and float(d) == pytest.approx(expected, rel=1e-6)
    norm = sum(math.sqrt(_numpy_stft_power(x[c].astype(np.float64))[0]) for c in range(2))
    assert float(metrics.stft_distance(x, np.zeros_like(x), reduction="norm")) == pytest.approx(norm, rel=1e-6)
    # 8000 samples, hop 160, centred: 51 frames of 257 bins.
    assert metrics.stft(torch.from_numpy(x)).shape == (2, 257, 51)
    # Batched: one value per clip, the same as one at a time.
    batch = np.stack([x, 0.5 * x])
    db = metrics.stft_distance(batch, np.zeros_like(batch))
    assert db.shape == (2,) and db.tolist() == pytest.approx([expected, expected / 4], rel=1e-6)
    # Peak normalisation makes a rescaled prediction perfect.
    assert float(metrics.stft_distance(3 * x, x, normalize=True)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        metrics.stft_distance(x, x[:, :100])


def test_envelope_distance_sinusoids():
    # 500 Hz at 16 kHz over 1 s is a whole number of cycles, so the Hilbert envelope of A sin is exactly A:
    # against silence the distance is A_left + A_right.
    t = np.arange(16000) / 16000
    sin, cos = np.sin(2 * np.pi * 500 * t), np.cos(2 * np.pi * 500 * t)
    gt = np.stack([0.5 * sin, 0.25 * sin])
    assert float(metrics.envelope_distance(gt, gt)) == 0.0
    assert float(metrics.envelope_distance(np.zeros_like(gt), gt)) == pytest.approx(0.75, rel=1e-9)
    # A 90-degree phase shift keeps the envelope (distance ~0) but not the STFT (distance ~ that of silence).
    shifted = np.stack([0.5 * cos, 0.25 * cos])
    assert float(metrics.envelope_distance(shifted, gt)) < 1e-9
    assert float(metrics.stft_distance(shifted, gt)) > float(metrics.stft_distance(np.zeros_like(gt), gt))
    # Swapped channels: envelopes 0.25 vs 0.5 on each side, 0.25 + 0.25.
    assert float(metrics.envelope_distance(gt[::-1].copy(), gt)) == pytest.approx(0.5, rel=1e-9)


def test_spectrogram_l1():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4000))
    assert float(metrics.spectrogram_l1(x, x)) == 0.0
    spec = metrics.stft(torch.from_numpy(x))
    assert float(metrics.spectrogram_l1(x, np.zeros_like(x), kind="magnitude")) == pytest.approx(
        float(spec.abs().mean()))
    assert float(metrics.spectrogram_l1(x, np.zeros_like(x))) == pytest.approx(
        float((spec.real.abs() + spec.imag.abs()).mean() / 2))
    # Magnitudes ignore the sign, complex spectrograms do not.
    assert float(metrics.spectrogram_l1(-x, x, kind="magnitude")) < 1e-9
    assert float(metrics.spectrogram_l1(-x, x)) == pytest.approx(2 * float(metrics.spectrogram_l1(x, 0 * x)))


# ------------------------------------------------------------------------------------------------------- separation

def test_sdr_plain():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((2, 4000))
    assert np.all(np.isposinf(metrics.sdr(s, s)))           # perfect estimate: +inf
    assert metrics.sdr(s, np.zeros_like(s)).tolist() == [0.0, 0.0]   # zero estimate: the error is s itself, 0 dB
    assert metrics.sdr(s, 0.5 * s).tolist() == pytest.approx([10 * math.log10(4)] * 2)
    with pytest.raises(ValueError, match="all zeros"):
        metrics.sdr(np.zeros(10), np.ones(10))


def test_bss_eval_and_mixture_floor():
    rng = np.random.default_rng(3)
    refs = rng.standard_normal((2, 8000))
    perfect = metrics.bss_eval(refs, refs)
    assert perfect["sdr"].shape == (2,) and np.all(perfect["sdr"] > 100) and np.all(perfect["sir"] > 100)
    # The projection forgives a gain (plain SDR would give 6 dB).
    assert np.all(metrics.bss_eval(refs, 0.5 * refs)["sdr"] > 100)
    # White noise 20 dB below each source. The noise's share in the span of one source's 512 delays (512 of 8000
    # dimensions) counts as target, an equal share in the other source's span as interference, the rest as
    # artifacts: SDR = 20 - 10 log10(1 - 512/8000) = 20.3 dB, SIR = 20 + 10 log10(8000/512) = 31.9 dB.
    noise = rng.standard_normal((2, 8000)) * 10 ** (-20 / 20)
    noisy = metrics.bss_eval(refs, refs + noise)
    assert noisy["sdr"] == pytest.approx([20 - 10 * math.log10(1 - 512 / 8000)] * 2, abs=0.5)
    assert noisy["sir"] == pytest.approx([20 + 10 * math.log10(8000 / 512)] * 2, abs=1.0)
    # Two equal-power independent sources, the mixture as the estimate: ~0 dB, all of it interference, no artifacts.
    # Exactly: the other source's share r = 512/8000 in this source's filter span counts as target, so
    # SDR = SIR = 10 log10((1 + r) / (1 - r)) = 0.56 dB, up to the sampling noise of the two powers.
    floor = metrics.mixture_floor(refs, refs.sum(0))
    r = 512 / 8000
    assert floor["sdr"] == pytest.approx([10 * math.log10((1 + r) / (1 - r))] * 2, abs=0.25)
    assert floor["sir"] == pytest.approx(floor["sdr"]) and np.all(floor["sar"] > 100)
    # Stereo sources: per-channel BSS Eval averaged over channels.
    stereo = np.stack([refs, refs[::-1]], axis=1)           # (2 sources, 2 channels, S)
    st = metrics.mixture_floor(stereo, stereo.sum(0))
    assert st["sdr"].shape == (2,) and st["sdr"] == pytest.approx([floor["sdr"].mean()] * 2)
    with pytest.raises(ValueError, match=r"estimated source\(s\) \[1\] are all zeros"):
        metrics.bss_eval(refs, np.stack([refs[0], np.zeros(8000)]))
    with pytest.raises(ValueError, match="shape of one reference"):
        metrics.mixture_floor(refs, refs)


# ------------------------------------------------------------------------------------------------------------ stats

def test_wilcoxon_exact_values():
    # Six positive differences (1, 2, 3, 4, 5, 6.5; median 3.5): W- = 0, and only the all-positive and all-negative sign patterns of 2^6 are as
    # extreme: two-sided p = 2/64.
    a, b = [3.0, 5, 4, 6, 8, 7], [2.0, 3, 1, 2, 3, 0.5]
    r = metrics.wilcoxon(a, b)
    assert r == {"statistic": 0.0, "p_value": pytest.approx(2 / 64), "n": 6, "median_diff": pytest.approx(3.5)}
    # Differences 1, -2, 3, 4, 5, 6.5: W- = rank 2; sign patterns with W- <= 2 are {}, {1}, {2}: p = 2 * 3/64.
    r = metrics.wilcoxon([1.0, -2, 3, 4, 5, 6.5], [0.0] * 6)
    assert r["statistic"] == 2.0 and r["p_value"] == pytest.approx(6 / 64)
    assert metrics.wilcoxon([1.0, 2, 3], [1.0, 2, 3])["p_value"] == 1.0
    with pytest.raises(ValueError, match="lengths 3 and 2 differ"):
        metrics.wilcoxon([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        metrics.wilcoxon([1.0], [2.0])


def test_pearson_r():
    # x - mean = (-1, 0, 1), y - mean = (-1, 1, 0): r = 1 / 2. With n = 3, t = r sqrt(1) / sqrt(1 - r^2) = 1/sqrt(3)
    # on 1 degree of freedom (Cauchy): p = 1 - (2/pi) atan(1/sqrt(3)) = 1 - (2/pi)(pi/6) = 2/3.
    r = metrics.pearson_r([1, 2, 3], [1, 3, 2])
    assert r["r"] == pytest.approx(0.5) and r["p_value"] == pytest.approx(2 / 3) and r["n"] == 3
    assert metrics.pearson_r([1, 2, 3, 4], [-2, -4, -6, -8])["r"] == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson_r([1, 1, 1], [1, 2, 3])["r"])
    with pytest.raises(ValueError, match="differ"):
        metrics.pearson_r([1, 2, 3], [1, 2])


def test_importable_without_ray_or_mlflow():
    import subprocess
    import sys
    code = ("import sys; import flipray.tasks.metrics; "
            "bad = [m for m in ('ray', 'mlflow', 'nvidia.dali') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]  # the child asserts no Ray / MLflow / DALI module was imported
