"""Sounding-object tracking from stereo sound and a reference frame (the paper's Sec. 5.1 "Tracking Sounding Faces
using Stereo Sound", Table 3).

    python -m jobs.localize --data data/demo --preset demo --pretext flip=runs/dev-demo/checkpoint.pt \
        --local --no-mlflow --out /tmp/loc --methods flip,scratch,visual-context,stereo-audio

Predict the box of the sounding object at time t from the 1-s stereo window centred on t and a *reference* frame
from elsewhere in the clip: the frame says where the objects are, the audio which way the sound comes from now. The
detector (flipray/tasks/detector.py) is a YOLOv2 head on the pretext sub-networks; ground truth is the synthetic
sidecars' boxes, or face pseudo-labels (OpenCV's Haar cascade) on real clips. Metrics, in % like Table 3: ap50, iou,
x_err, y_err, and the same on the clips whose source moves (*_moving, the paper's filtered rows). Methods are the
paper's rows (input ablations, other pretext weights, frozen sub-networks). Design, sampling and metric definitions:
docs/tasks.md.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flipray.tasks import metrics
from flipray.tasks.detector import LocalizationNet, decode, kmeans_anchors, yolo_loss
from flipray.tasks.metrics import box_iou
from flipray.pretext.data import AudioFeatures, SampleParams, augment_frames, decode_video, flip_channels
from flipray.tasks.base import (Clip, DownstreamConfig, audio_input, load_clips, method_spec, param_groups,
                                pretext_network, setup)
from flipray.dataset.store import Store

log = logging.getLogger(__name__)

ORDER = 3  # where its table comes in the report (the paper's order)
TABLE = {
    "task": "localize",
    "table": "Table 3",
    "metrics": ["ap50", "iou", "x_err", "y_err", "ap50_moving", "iou_moving", "x_err_moving", "y_err_moving"],
    "primary": "ap50",
    "paired_metric": "iou",
    "higher_is_better": {"ap50": True, "iou": True, "x_err": False, "y_err": False,
                         "ap50_moving": True, "iou_moving": True, "x_err_moving": False, "y_err_moving": False},
    "notes": "Box of the sounding object at the centre of a 1-s stereo window, given a reference frame from another "
             "part of the clip. All numbers in %: AP50 and IOU of the top box, X/Y error of the top box's centre "
             "(% of frame width/height). *_moving: eval clips whose sounding object's azimuth spans >= 20 deg (the "
             "paper's filtered rows 5-8). Paired tests on per-clip mean IOU of the top box; per_clip ap50 is a clip's "
             "hit rate (% of its frames whose top box has IOU >= 0.5).",
}

METHODS = {
    "mono-audio": {"label": "Mono audio", "pretext": "flip", "audio": "mono", "visual": False},
    "stereo-audio": {"label": "Stereo audio", "pretext": "flip", "audio": "stereo", "visual": False},
    "visual-context": {"label": "Visual context", "pretext": "flip", "audio": None, "visual": True},
    "flip": {"label": "Flip (ours)", "pretext": "flip", "audio": "stereo", "visual": True},
    "scratch": {"label": "No pretraining", "pretext": None, "audio": "stereo", "visual": True},
    "mismatch": {"label": "Mismatch task", "pretext": "mismatch", "audio": "stereo", "visual": True},
    "shift": {"label": "Shift task", "pretext": "shift", "audio": "stereo", "visual": True},
    "frozen-scratch": {"label": "- Pretext (frozen)", "pretext": None, "audio": "stereo", "visual": True,
                       "frozen": True},
    "frozen-flip": {"label": "+ Pretext (frozen)", "pretext": "flip", "audio": "stereo", "visual": True,
                    "frozen": True},
}

# The paper's numbers (Yang, Russell & Salamon, CVPR 2020) as printed, on real data (YouTube-ASMR, FAIR-Play,
# TAU), for orientation; flipray.tasks.tables puts them beside ours. numbers: {method: {metric: value}}.
PAPER = {
    # Table 3, rows 1-4 (full test set, fine-tuned) and 9-10 (sub-networks frozen): AP50 and IOU in %, X/Y error in
    # % of the frame width / height.
    "localize": {
        "table": "Table 3", "data": "YouTube-ASMR test set, sounding-face boxes from RetinaFace",
        "units": {"ap50": "%", "iou": "%", "x_err": "% width", "y_err": "% height"},
        "labels": {
            "mono-audio": "Mono audio",
            "stereo-audio": "Stereo audio",
            "visual-context": "Visual context",
            "flip": "Ours",
            "frozen-scratch": "- Pretext (frozen)",
            "frozen-flip": "+ Pretext (frozen)",
        },
        "numbers": {
            "mono-audio": {"ap50": 10.2, "iou": 30.6, "x_err": 11.9, "y_err": 10.4},
            "stereo-audio": {"ap50": 15.1, "iou": 34.8, "x_err": 10.0, "y_err": 10.7},
            "visual-context": {"ap50": 27.9, "iou": 41.0, "x_err": 12.9, "y_err": 5.5},
            "flip": {"ap50": 43.4, "iou": 47.1, "x_err": 9.1, "y_err": 5.5},
            "frozen-scratch": {"ap50": 23.9, "iou": 35.1, "x_err": 12.4, "y_err": 8.9},
            "frozen-flip": {"ap50": 34.9, "iou": 39.5, "x_err": 12.3, "y_err": 6.5},
        },
    },
    # Table 3, rows 5-8: the test clips filtered for faces moving left-right with the audio's log-energy difference.
    "localize-filtered": {
        "table": "Table 3 (rows 5-8)", "data": "YouTube-ASMR test clips with moving faces",
        "units": {"ap50": "%", "iou": "%", "x_err": "% width", "y_err": "% height"},
        "labels": {
            "mono-audio": "Mono audio",
            "stereo-audio": "Stereo audio",
            "visual-context": "Visual context",
            "flip": "Ours",
        },
        "numbers": {
            "mono-audio": {"ap50": 13.9, "iou": 23.8, "x_err": 17.3, "y_err": 10.0},
            "stereo-audio": {"ap50": 26.0, "iou": 39.0, "x_err": 9.7, "y_err": 9.6},
            "visual-context": {"ap50": 21.6, "iou": 27.0, "x_err": 20.7, "y_err": 6.5},
            "flip": {"ap50": 44.1, "iou": 45.0, "x_err": 10.8, "y_err": 5.9},
        },
    },
}


@dataclass
class Config(DownstreamConfig):
    window_s: float = 1.0             # audio window centred on the target frame (the paper: one second)
    ref_min_gap_s: float = 2.0        # training: reference frame at least this far from the target (<= half a clip)
    eval_hop_s: float = 0.5           # evaluation: a target frame every hop; reference half a clip away
    samples_per_clip: int = 4         # training (target, reference) pairs drawn per clip per epoch
    joint_flip_p: float = 0.5         # training: mirror frame + boxes and swap the channels together
    head_channels: int = 64           # width of the fusion convs and deconvolution blocks
    deconvs: int = 1                  # stride-2 deconvolution blocks: grid side = visual map side * 2**deconvs
    skip: bool = True                 # after the first deconvolution, add the visual trunk's 2x finer layer3 map
    anchors: int = 3                  # anchor boxes per cell, k-means on the training boxes (YOLOv2 uses 5)
    coord_weight: float = 5.0         # box regression against objectness (YOLO's lambda_coord)
    noobj_weight: float = 0.5         # background anchors (YOLO's lambda_noobj)
    ignore_iou: float = 0.6           # YOLOv2: a prediction overlapping a true box this much is not background
    nms_iou: float = 0.45             # evaluation: non-maximum suppression per frame
    max_boxes: int = 5                # evaluation: boxes kept per frame after NMS (AP50)
    schedule: str = "cosine"          # cosine | constant learning rate over the training steps
    eval_every: int = 1               # evaluate every N epochs (and after the last); the Tune reports need 1
    moving_min_deg: float = 20.0      # "moving" eval subset: azimuth range of a sounding object over the clip
    moving_min_x: float = 0.2         # the same for clips without azimuth (pseudo-labels): box-centre x range / width
    pseudo_labels: str = "faces"      # clips without sounding objects in the sidecar: faces (OpenCV Haar) | none
    figure_clips: int = 3             # eval clips drawn in tracking.png (moving ones first)


PRESETS = {
    # data/demo (480 train clips, 60 test clips x 19 windows): ~2.2 min of CPU per method on one core, plus ~1 min
    # decoding the clips once per process (jobs.localize --local runs every method in one process)
    "demo": {"epochs": 6, "batch_size": 32, "samples_per_clip": 4, "lr": 2e-3, "lr_backbone": 2e-4, "threads": 1},
    "small": {"epochs": 15, "batch_size": 32, "samples_per_clip": 8, "lr": 1e-3, "lr_backbone": 1e-4,
              "head_channels": 128},
    # with the paper's pretext network: 256-px reference frames (8x8 map -> 16x16 grid), YOLOv2's 5 anchors
    "paper": {"epochs": 30, "batch_size": 64, "samples_per_clip": 8, "lr": 1e-3, "lr_backbone": 1e-4,
              "head_channels": 256, "anchors": 5},
}


# ---------------------------------------------------------------------------------------------------------------------
# Ground truth

def face_pseudo_labels(frames: torch.Tensor | np.ndarray, upscale_to: int = 256, scale_factor: float = 1.1,
                       min_neighbors: int = 5, min_size_frac: float = 0.08,
                       cascade: str = "haarcascade_frontalface_default.xml",
                       aspect: float | None = None) -> list[list[float] | None]:
    """Pseudo ground truth for real videos: per frame, the largest face OpenCV's bundled Haar cascade finds.

    `frames`: uint8 RGB (N, H, W, 3). Frames smaller than `upscale_to` are enlarged first (the cascade's smallest
    window is 24 px); faces narrower than `min_size_frac` of the frame are ignored. `aspect`: the width over height
    the frames show (the sidecar's picture_aspect: 1.778 for a 16:9 video squashed square at ingest; None: their own
    W / H); they are stretched back to it first, as the cascade looks for faces in their true proportions.
    `clip_targets` hands it the stored 256-px frames, not the pretext-size copy in RAM. Returns one [x0, y0, x1, y1]
    (floats) in the input frames' pixels per frame, or None where no face is found. Needs opencv-python-headless
    (pinned in pyproject.toml); the cascade file ships inside it (`cv2.data.haarcascades`), nothing is downloaded.
    """
    try:
        import cv2
    except ImportError as e:
        raise ImportError("face pseudo-labels need OpenCV: pip install opencv-python-headless (pinned in "
                          "pyproject.toml), or set pseudo_labels=none to skip clips without ground truth") from e
    path = str(Path(cv2.data.haarcascades) / cascade)
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise FileNotFoundError(f"{path}: OpenCV could not load the cascade")
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"face_pseudo_labels needs uint8 RGB frames (N, H, W, 3), got {frames.dtype} "
                         f"{frames.shape}")
    h, w = frames.shape[1:3]
    aspect = w / h if aspect is None else aspect
    if not aspect > 0:
        raise ValueError(f"face_pseudo_labels: aspect must be a positive width over height, got {aspect}")
    scale = max(1.0, upscale_to / min(h, w))
    min_px = max(24, int(min_size_frac * min(h, w) * scale))

    def largest(gray, sx: float, sy: float) -> list[float] | None:
        """The largest face in `gray` resized by (sx, sy), as [x0, y0, x1, y1] in the input frame's pixels."""
        if (round(w * sx), round(h * sy)) != (w, h):
            gray = cv2.resize(gray, (round(w * sx), round(h * sy)), interpolation=cv2.INTER_LINEAR)
        found = detector.detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                          minSize=(min_px, min_px))
        if len(found) == 0:
            return None
        x, y, bw, bh = max(found, key=lambda f: f[2] * f[3])
        return [float(x / sx), float(y / sy), float((x + bw) / sx), float((y + bh) / sy)]

    narrow = (w / h) / aspect  # a face's width in these frames over its width in true proportions
    boxes = []
    for frame in frames:
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        box = largest(gray, scale / narrow, scale)  # stretched back to `aspect`
        if box is None and abs(narrow - 1) > 0.01:
            # the cascade's finds are marginal either way; a face missed stretched is often found as stored, where
            # its square box is too wide by 1 / narrow (docs/tasks.md, "Faces in squashed frames")
            box = largest(gray, scale, scale)
            if box is not None:
                centre, half = (box[0] + box[2]) / 2, (box[2] - box[0]) * narrow / 2
                box = [centre - half, box[1], centre + half, box[3]]
        boxes.append(box)
    return boxes


def clip_targets(clip: Clip, cfg: Config) -> list[torch.Tensor]:
    """Per stored frame, the true boxes (n, 4) in [0, 1] frame coordinates (n = 0: no target in that frame)."""
    n = clip.frames.shape[0]
    sounding = [o for o in clip.meta.get("objects", []) if o.get("sounding")]
    if sounding:
        width, height = float(clip.meta.get("width", 256)), float(clip.meta.get("height", 256))
        for o in sounding:
            if len(o.get("boxes", [])) < n:
                raise ValueError(f"{clip.clip_id}: sidecar object {o.get('id')} has {len(o.get('boxes', []))} "
                                 f"boxes for {n} frames (one [x0, y0, x1, y1] per frame expected)")
        scale = torch.tensor([width, height, width, height])
        return [(torch.tensor([o["boxes"][f] for o in sounding], dtype=torch.float32) / scale).clamp(0, 1)
                for f in range(n)]
    if cfg.pseudo_labels == "none":
        return [torch.zeros(0, 4) for _ in range(n)]
    if cfg.pseudo_labels != "faces":
        raise ValueError(f"pseudo_labels must be 'faces' or 'none', got {cfg.pseudo_labels!r}")
    frames = _stored_frames(clip, cfg.data_root)
    side = frames.shape[2], frames.shape[1]
    scale = torch.tensor([side[0], side[1], side[0], side[1]], dtype=torch.float32)
    return [torch.zeros(0, 4) if b is None else (torch.tensor([b], dtype=torch.float32) / scale).clamp(0, 1)
            for b in face_pseudo_labels(frames, aspect=clip.meta.get("picture_aspect"))]


def _stored_frames(clip: Clip, root: str) -> torch.Tensor:
    """The clip's frames at their stored size (256 px) for the face detector: at the demo's 88 px a face is ~15 px,
    below what the cascade finds even upscaled. Falls back to the frames in RAM for a clip not in a store."""
    if not (root and clip.row.get("video")):
        return clip.frames
    store = Store(root)
    return decode_video(store.get(clip.row["video"], clip.row.get("video_sha256")), name=store.url(clip.row["video"]))


def is_moving(clip: Clip, targets: list[torch.Tensor], cfg: Config) -> bool:
    """The paper's filtered subset: the sounding object moves left-right a lot over the clip."""
    sounding = [o for o in clip.meta.get("objects", []) if o.get("sounding") and o.get("azimuth_deg")]
    if sounding:
        return any(float(np.ptp(o["azimuth_deg"])) >= cfg.moving_min_deg for o in sounding)
    xs = [float(b[0, [0, 2]].mean()) for b in targets if len(b)]
    return len(xs) > 1 and float(np.ptp(xs)) >= cfg.moving_min_x


# ---------------------------------------------------------------------------------------------------------------------
# Samples

@dataclass
class TrackClip:
    clip: Clip
    targets: list[torch.Tensor]        # per stored frame, (n, 4) in [0, 1]
    frames: list[int]                  # target frames: a target and a 1-s window inside the clip
    moving: bool


def target_frames(clip: Clip, targets: list[torch.Tensor], fps: float, sample_rate: int, window_s: float) -> list[int]:
    half = window_s / 2
    duration = clip.wave.shape[1] / sample_rate
    return [t for t in range(clip.frames.shape[0])
            if len(targets[t]) and t / fps - half >= -1e-9 and t / fps + half <= duration + 1e-9]


def prepare(clips: list[Clip], cfg: Config, pcfg) -> tuple[list[TrackClip], dict[str, str]]:
    """Targets of every clip; clips with no usable target frame are left out (returned with the reason)."""
    kept, skipped = [], {}
    for c in clips:
        targets = clip_targets(c, cfg)
        frames = target_frames(c, targets, pcfg.data.fps, pcfg.data.sample_rate, cfg.window_s)
        if not frames:
            skipped[c.clip_id] = (f"no target frame with a {cfg.window_s}-s window inside the clip "
                                  f"({'no sounding object or face' if not any(len(b) for b in targets) else 'short'})")
            continue
        kept.append(TrackClip(c, targets, frames, is_moving(c, targets, cfg)))
    return kept, skipped


def eval_windows(tc: TrackClip, cfg: Config, fps: float) -> list[tuple[int, int]]:
    """(target, reference) frame pairs of one clip: a target every eval_hop_s, the reference half a clip away."""
    hop = max(1, round(cfg.eval_hop_s * fps))
    n = tc.clip.frames.shape[0]
    first = tc.frames[0]
    return [(t, (t + n // 2) % n) for t in tc.frames if (t - first) % hop == 0]


def draw_pair(tc: TrackClip, cfg: Config, fps: float, g: torch.Generator) -> tuple[int, int, bool]:
    """A training (target, reference, mirror) draw."""
    n = tc.clip.frames.shape[0]
    t = tc.frames[int(torch.randint(len(tc.frames), (1,), generator=g))]
    gap = min(round(cfg.ref_min_gap_s * fps), n // 2)
    refs = [r for r in range(n) if abs(r - t) >= gap]
    ref = refs[int(torch.randint(len(refs), (1,), generator=g))]
    return t, ref, bool(torch.rand(1, generator=g) < cfg.joint_flip_p)


def sample_inputs(tc: TrackClip, t: int, ref: int, mirror: bool, audio_mode: str | None, pcfg,
                  features: AudioFeatures, window_s: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(reference frame (3, R, R), audio features or None, true boxes (n, 4)) of one sample."""
    frame = tc.clip.frames[ref:ref + 1]
    boxes = tc.targets[t].clone()
    if mirror:
        frame = frame.flip(2)
        boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
    size = frame.shape[1]
    video = augment_frames(frame, SampleParams(0, 0, 0, 1.0, 1.0, 1.0, False, False), size)[0]
    audio = None
    if audio_mode is not None:
        sr = pcfg.data.sample_rate
        n = round(window_s * sr)
        s0 = round(t / pcfg.data.fps * sr) - n // 2
        wave = tc.clip.wave[:, max(s0, 0):s0 + n]
        if wave.shape[1] < n:  # a clip a few samples short of its duration
            wave = F.pad(wave, (0, n - wave.shape[1]))
        if mirror:
            wave = flip_channels(wave)
        if audio_mode == "mono":
            wave = wave.mean(dim=0, keepdim=True).expand(2, -1)
        audio = audio_input(wave, features)
    return video, audio, boxes


def make_batch(items, tracks, cfg, pcfg, features, audio_mode, device):
    vids, auds, boxes = [], [], []
    for ci, t, ref, mirror in items:
        v, a, b = sample_inputs(tracks[ci], t, ref, mirror, audio_mode, pcfg, features, cfg.window_s)
        vids.append(v)
        auds.append(a)
        boxes.append(b.to(device))
    audio = torch.stack(auds).to(device) if audio_mode is not None else None
    return torch.stack(vids).to(device), audio, boxes


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(model: LocalizationNet, optimizer, scheduler, tracks: list[TrackClip], cfg: Config, pcfg,
                    features: AudioFeatures, audio_mode: str | None, device, epoch: int, frozen: bool) -> float:
    from flipray.progress import tqdm  # tqdm_ray inside Ray tasks
    model.train()
    if frozen:  # frozen sub-networks keep their BatchNorm statistics too
        model.backbone.eval()
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(tracks) * cfg.samples_per_clip, generator=g).tolist()
    items = [(i % len(tracks),) + draw_pair(tracks[i % len(tracks)], cfg, pcfg.data.fps, g) for i in order]
    total, n = 0.0, 0
    bar = tqdm(range(0, len(items), cfg.batch_size), desc=f"epoch {epoch}", unit="batch", leave=False)
    for start in bar:
        video, audio, boxes = make_batch(items[start:start + cfg.batch_size], tracks, cfg, pcfg, features,
                                         audio_mode, device)
        out = model(video if model.uses_visual else None, audio)
        loss, _ = yolo_loss(out, boxes, model.anchors, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(boxes)
        n += len(boxes)
        bar.set_postfix(loss=f"{total / n:.3f}")
    return total / max(n, 1)


@torch.no_grad()
def predict(model: LocalizationNet, tracks: list[TrackClip], cfg: Config, pcfg, features: AudioFeatures,
            audio_mode: str | None, device) -> list[dict]:
    """One record per evaluation window: clip index, target / reference frame, kept boxes + scores (after NMS, best
    first), true boxes."""
    from torchvision.ops import nms
    model.eval()
    windows = [(ci, t, ref, False) for ci, tc in enumerate(tracks) for t, ref in eval_windows(tc, cfg, pcfg.data.fps)]
    records = []
    for start in range(0, len(windows), cfg.batch_size):
        chunk = windows[start:start + cfg.batch_size]
        video, audio, gts = make_batch(chunk, tracks, cfg, pcfg, features, audio_mode, device)
        boxes, scores = decode(model(video if model.uses_visual else None, audio), model.anchors)
        for (ci, t, ref, _), bx, sc, gt in zip(chunk, boxes.cpu(), scores.cpu(), gts):
            keep = nms(bx.float(), sc.float(), cfg.nms_iou)[:cfg.max_boxes]
            records.append({"clip": ci, "t": t, "ref": ref, "boxes": bx[keep], "scores": sc[keep], "gt": gt.cpu()})
    return records


def score(records: list[dict], clip_ids: list[str]) -> tuple[dict[str, float], dict]:
    """(ap50, iou, x_err, y_err in %, per-frame {"clip", "iou", "x", "y"}) of a set of evaluation records."""
    ids = [f"{clip_ids[r['clip']]}@{r['t']}" for r in records]
    pred_boxes = torch.cat([r["boxes"] for r in records])
    pred_scores = torch.cat([r["scores"] for r in records])
    pred_ids = [i for i, r in zip(ids, records) for _ in range(len(r["boxes"]))]
    gt_boxes = torch.cat([r["gt"] for r in records])
    gt_ids = [i for i, r in zip(ids, records) for _ in range(len(r["gt"]))]
    ap = metrics.ap50(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids)
    images, ious = metrics.top_box_iou(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids, reduction="none")
    by_id = dict(zip(ids, records))
    tops, matched = [], []
    for image in images:  # the top box against the true box it overlaps most (nearest centre when none overlaps)
        r = by_id[image]
        top = r["boxes"][0]
        overlap = box_iou(top[None], r["gt"])[0]
        if overlap.max() > 0:
            k = int(overlap.argmax())
        else:
            k = int(((r["gt"][:, :2] + r["gt"][:, 2:]) / 2 - (top[:2] + top[2:]) / 2).norm(dim=1).argmin())
        tops.append(top)
        matched.append(r["gt"][k])
    x_err, y_err = metrics.center_error(torch.stack(tops), torch.stack(matched), 1.0, 1.0, reduction="none")
    frames = {"clip": [by_id[i]["clip"] for i in images], "iou": ious * 100, "x": x_err, "y": y_err}
    return {"ap50": 100 * ap, "iou": float(ious.mean()) * 100, "x_err": float(x_err.mean()),
            "y_err": float(y_err.mean())}, frames


def evaluate(model, tracks: list[TrackClip], cfg: Config, pcfg, features, audio_mode, device) -> dict:
    """{"metrics": all + *_moving, "per_clip", "clip_ids", "records"} on the evaluation clips."""
    records = predict(model, tracks, cfg, pcfg, features, audio_mode, device)
    clip_ids = [tc.clip.clip_id for tc in tracks]
    result, frames = score(records, clip_ids)
    moving = [r for r in records if tracks[r["clip"]].moving]
    if moving:
        result.update({f"{k}_moving": v for k, v in score(moving, clip_ids)[0].items()})
    else:
        log.warning("no eval clip moves by >= %s deg: the *_moving metrics are NaN", cfg.moving_min_deg)
        result.update({f"{k}_moving": float("nan") for k in ("ap50", "iou", "x_err", "y_err")})
    per_clip = {"ap50": [], "iou": [], "x_err": [], "y_err": []}
    clip_of = torch.tensor(frames["clip"])
    for ci in range(len(tracks)):
        sel = clip_of == ci
        per_clip["ap50"].append(float((frames["iou"][sel] >= 50).double().mean()) * 100)
        per_clip["iou"].append(float(frames["iou"][sel].mean()))
        per_clip["x_err"].append(float(frames["x"][sel].mean()))
        per_clip["y_err"].append(float(frames["y"][sel].mean()))
    return {"metrics": result, "per_clip": per_clip, "clip_ids": clip_ids, "records": records}


# ---------------------------------------------------------------------------------------------------------------------
# The trial

@functools.lru_cache(maxsize=2)
def cached_clips(root: str, split: str, resize: int, sample_rate: int, max_clips: int):
    """load_clips, kept for the next trial in this process: `--local` runs every method in one process and a Ray
    worker may run several, and decoding (~1 min for data/demo) would otherwise repeat per method. The clips are only
    read (2 entries: the train and the eval split)."""
    return load_clips(root, split, resize, sample_rate, max_clips)


def run_trial(cfg: Config, report=None) -> dict:
    """Train one method (cfg.method) on cfg.train_split, evaluate it on cfg.eval_split (the contract in
    flipray/tasks/base.py)."""
    spec = method_spec(cfg, METHODS)
    frozen = bool(spec.get("frozen"))
    if frozen:
        cfg = dataclasses.replace(cfg, lr_backbone=0.0)
    device = setup(cfg)
    pretext, pcfg = pretext_network(cfg)
    if getattr(pcfg.data, "audio_channels", 2) != 2:
        raise ValueError(f"{cfg.pretext}: localize needs a stereo (left/right) pretext network, this one hears "
                         f"{pcfg.data.audio_channels} channels (FOA); use the flip, mismatch or shift network")
    features = AudioFeatures(pcfg)
    train_clips, skipped = cached_clips(cfg.data_root, cfg.train_split, pcfg.data.resize, pcfg.data.sample_rate,
                                        cfg.max_clips)
    eval_clips, skipped_eval = cached_clips(cfg.data_root, cfg.eval_split, pcfg.data.resize, pcfg.data.sample_rate,
                                            cfg.max_clips)
    skipped = dict(skipped)
    train, s1 = prepare(train_clips, cfg, pcfg)
    tracks, s2 = prepare(eval_clips, cfg, pcfg)
    skipped.update(skipped_eval | s1 | s2)
    if not train or not tracks:
        raise ValueError(f"{cfg.data_root}: no usable {cfg.train_split if not train else cfg.eval_split} clips "
                         f"(a sounding object or face and a {cfg.window_s}-s window): {skipped}")
    wh = torch.cat([b[:, 2:] - b[:, :2] for tc in train for t in tc.frames for b in [tc.targets[t]]])
    anchors = kmeans_anchors(wh.clamp_min(1e-3), cfg.anchors)
    model = LocalizationNet(pretext, pcfg, cfg, spec["audio"], spec["visual"], anchors).to(device)
    del pretext  # its fusion and classifier are not used
    optimizer = torch.optim.AdamW(param_groups(model.backbone, model.head, cfg), weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) * cfg.samples_per_clip / cfg.batch_size)
    decay = (lambda k: 0.5 * (1 + math.cos(math.pi * min(k / max(steps, 1), 1.0)))) if cfg.schedule == "cosine" \
        else (lambda k: 1.0)
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    moving = sum(tc.moving for tc in tracks)
    log.info("localize %s: %d train / %d eval clips (%d moving), grid %dx%d, anchors %s, %d skipped", cfg.method,
             len(train), len(tracks), moving, model.grid, model.grid, anchors.tolist(), len(skipped))

    history, ev = [], None
    for epoch in range(1, cfg.epochs + 1):
        loss = train_one_epoch(model, optimizer, scheduler, train, cfg, pcfg, features, spec["audio"], device, epoch,
                               frozen)
        entry = {"epoch": epoch, "loss": loss}
        if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
            ev = evaluate(model, tracks, cfg, pcfg, features, spec["audio"], device)
            entry.update(ev["metrics"])
        history.append(entry)
        log.info("localize %s epoch %d: %s", cfg.method, epoch,
                 ", ".join(f"{k} {v:.3g}" for k, v in entry.items() if k != "epoch"))
        if report is not None:
            report(epoch, {k: v for k, v in entry.items() if k != "epoch"})

    figures = {}
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures["tracking"] = str(tracking_figure(ev["records"], tracks, cfg, out / "tracking.png"))
        figures["curves"] = str(curves_figure(history, cfg, out / "curves.png"))
    return {"metrics": ev["metrics"], "per_clip": ev["per_clip"], "clip_ids": ev["clip_ids"], "history": history,
            "figures": figures, "anchors": anchors.tolist(), "skipped": skipped,
            "eval_windows": len(ev["records"]), "moving_clips": moving}


# ---------------------------------------------------------------------------------------------------------------------
# Figures

def tracking_figure(records: list[dict], tracks: list[TrackClip], cfg: Config, path: Path, frames_per_clip: int = 6
                    ) -> Path:
    """Per clip (moving ones first): the reference frame, then target frames over time with the true box (green)
    and the top predicted box (red), each titled with its time and IOU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    by_clip: dict[int, list[dict]] = {}
    for r in records:
        by_clip.setdefault(r["clip"], []).append(r)
    chosen = sorted(by_clip, key=lambda ci: (not tracks[ci].moving, ci))[:max(cfg.figure_clips, 1)]
    cols = frames_per_clip + 1
    fig, axes = plt.subplots(len(chosen), cols, figsize=(1.9 * cols, 2.1 * len(chosen)), squeeze=False)
    for row, ci in zip(axes, chosen):
        tc, recs = tracks[ci], by_clip[ci]
        picks = [recs[round(k * (len(recs) - 1) / max(frames_per_clip - 1, 1))] for k in range(frames_per_clip)]
        size = tc.clip.frames.shape[1]
        fps = tc.clip.row.get("fps", 6)
        row[0].imshow(tc.clip.frames[picks[0]["ref"]].numpy())
        row[0].set_title(f"{tc.clip.clip_id}\nreference {picks[0]['ref'] / fps:.1f}s (of t={picks[0]['t'] / fps:.1f}s)"
                         + (" (moving)" if tc.moving else ""), fontsize=7)
        for ax, r in zip(row[1:], picks):
            ax.imshow(tc.clip.frames[r["t"]].numpy())
            for box, colour in [(g, "lime") for g in r["gt"]] + [(r["boxes"][0], "red")]:
                x0, y0, x1, y1 = (box * size).tolist()
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
            iou = float(box_iou(r["boxes"][:1], r["gt"]).max())
            ax.set_title(f"t={r['t'] / fps:.1f}s IOU {iou:.2f}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"localize {cfg.method}: true box green, top predicted box red (audio window centred on t)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(history: list[dict], cfg: Config, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss (YOLOv2)")
    ev = [h for h in history if "ap50" in h]
    for key in ("ap50", "iou", "ap50_moving"):
        b.plot([h["epoch"] for h in ev], [h[key] for h in ev], marker="o", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel(f"{cfg.eval_split} (%)")
    b.legend(fontsize=8)
    fig.suptitle(f"localize {cfg.method}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
