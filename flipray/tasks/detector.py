"""The detector of flipray.tasks.localize: a YOLOv2 head on the pretext sub-networks, its anchors, loss and decoding.

Anchors: k-means with 1 - IOU distance (YOLOv2) on the training targets' (w, h), deterministic. Loss (YOLOv2): for
each true box, the cell holding its centre and the anchor of best shape IOU are responsible: squared error of
(sigmoid(tx), sigmoid(ty)) against the centre's offset in the cell and of (tw, th) against log(w / anchor_w),
log(h / anchor_h), times `coord_weight`; objectness BCE with target 1 there and 0 for every other anchor, times
`noobj_weight`, except predictions whose decoded box overlaps a true box by more than `ignore_iou`. The objectness
bias starts at the prior log(p / (1 - p)), p = 1 / (S * S * anchors). The head's design: docs/tasks.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flipray.tasks.metrics import box_iou



def kmeans_anchors(wh: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """YOLOv2's anchors: k-means on box (w, h) with distance 1 - IOU of boxes sharing a centre; (k, 2), by area.
    Deterministic: starts from the area quantiles."""
    wh = wh.double()
    if len(wh) < k:
        raise ValueError(f"{k} anchors need at least {k} training boxes, got {len(wh)}")
    order = torch.argsort(wh.prod(1))
    centers = wh[order[((torch.arange(k) + 0.5) / k * len(wh)).long()]].clone()
    for _ in range(iters):
        assign = shape_iou(wh, centers).argmax(1)
        new = torch.stack([wh[assign == j].median(0).values if (assign == j).any() else centers[j]
                           for j in range(k)])
        if torch.allclose(new, centers):
            break
        centers = new
    return centers[torch.argsort(centers.prod(1))].float()


def shape_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IOU of (w, h) shapes a (N, 2) and b (M, 2) placed on the same centre -> (N, M)."""
    inter = torch.minimum(a[:, None, 0], b[None, :, 0]) * torch.minimum(a[:, None, 1], b[None, :, 1])
    return inter / (a[:, None].prod(-1) + b[None].prod(-1) - inter)


def map_side(size: int) -> int:
    """Side of the visual trunk's map for a size x size input (conv1, maxpool, layer2..4 halve it, rounding up)."""
    for _ in range(5):
        size = (size + 1) // 2
    return size


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LocalizationNet(nn.Module):
    """The pretext sub-networks a method uses (`backbone`) and a YOLOv2 deconvolution head (`head`).

    forward(video (B, 3, R, R) | None, audio (B, C, n_mels, T) | None) -> (B, A, 5, S, S): per anchor and grid cell
    tx, ty, tw, th, objectness logit.
    """

    def __init__(self, pretext, pcfg, cfg, audio: str | None, visual: bool, anchors: torch.Tensor):
        super().__init__()
        if not (audio or visual):
            raise ValueError("a localization model needs audio, visual context or both")
        if pretext.variant in ("motion", "pooled-visual"):
            raise ValueError(f"localize needs the per-frame spatial visual map; pretext variant {pretext.variant!r} "
                             "has none (use base, mono or gcc-phat)")
        self.uses_audio, self.uses_visual = audio is not None, visual
        self.backbone = nn.ModuleDict()
        if visual:
            self.backbone["visual"] = pretext.visual
        if audio:
            self.backbone["audio"] = pretext.audio
            if pretext.mono_audio is not None:
                self.backbone["mono_audio"] = pretext.mono_audio
        self.side = map_side(pcfg.data.resize)
        self.grid = self.side * 2 ** cfg.deconvs
        self.register_buffer("anchors", anchors.float().clone())
        a = len(anchors)
        audio_dim = (pcfg.model.audio_dim * (2 if pretext.mono_audio is not None else 1)) if audio else 0
        c_in = 2 + (pcfg.model.visual_reduce if visual else 0) + audio_dim
        ch = cfg.head_channels
        self.skip = visual and cfg.skip and cfg.deconvs > 0
        merge_in = ch + 2 + audio_dim + 4 * pcfg.model.visual_width  # + trunk layer3's channels
        self.head = nn.ModuleDict({
            "fuse": nn.Sequential(conv_bn(c_in, ch), conv_bn(ch, ch)),
            "up": nn.ModuleList(nn.Sequential(nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1, bias=False),
                                              nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
                                for _ in range(cfg.deconvs)),
            "merge": conv_bn(merge_in, ch) if self.skip else nn.Identity(),
            "out": nn.Conv2d(ch, a * 5, 1)})
        with torch.no_grad():  # objectness starts at the prior: one responsible anchor per frame
            prior = 1.0 / (self.grid * self.grid * a)
            self.head["out"].bias.view(a, 5)[:, 4] = math.log(prior / (1 - prior))

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        if "mono_audio" in self.backbone:  # the pretext's `mono` variant: stereo stream + mono-mix stream
            return torch.cat([self.backbone["audio"](audio[:, :2]), self.backbone["mono_audio"](audio[:, 2:3])], 1)
        return self.backbone["audio"](audio)

    def visual_maps(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pretext visual map (B, visual_reduce, h, w), the trunk's layer3 map (B, 4 * width, ~2h, ~2w))."""
        vis = self.backbone["visual"]
        t = vis.trunk
        layer3 = t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(video)))))))
        return vis.reduce(t.layer4(layer3)), layer3

    def forward(self, video: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        ref = video if video is not None else audio
        b, s = ref.shape[0], self.side
        parts, tiled = [], []  # maps at the visual map's size; vectors tiled at every scale (the audio)
        if self.uses_visual:
            v, layer3 = self.visual_maps(video)
            if v.shape[-1] != s:
                raise ValueError(f"visual map is {tuple(v.shape[-2:])}, expected {s}x{s}: the reference frame must be "
                                 "the pretext's data.resize square")
            parts.append(v)
        if self.uses_audio:
            tiled.append(self.embed_audio(audio).mean(dim=-1)[:, :, None, None])
        x = self.head["fuse"](torch.cat(parts + [t.expand(-1, -1, s, s) for t in tiled] + [coords(b, s, ref)], 1))
        for k, up in enumerate(self.head["up"]):
            x = up(x)
            if k == 0 and self.skip:  # finer visual detail for the box, with the audio and the position again
                n = x.shape[-1]
                fine = F.interpolate(layer3, size=(n, n), mode="bilinear", align_corners=False) \
                    if layer3.shape[-1] != n else layer3
                x = self.head["merge"](torch.cat([x, fine] + [t.expand(-1, -1, n, n) for t in tiled]
                                                 + [coords(b, n, ref)], 1))
        out = self.head["out"](x)
        return out.view(b, len(self.anchors), 5, self.grid, self.grid)


def coords(b: int, s: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, s, s): x and y of each cell centre in [-1, 1], so the head knows where a cell is."""
    lin = (torch.arange(s, device=like.device, dtype=like.dtype) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xx, yy])[None].expand(b, -1, -1, -1)


def decode(out: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A, 5, S, S) -> boxes (B, A*S*S, 4) [x0, y0, x1, y1] in [0, 1] and objectness scores (B, A*S*S)."""
    b, a, _, s, _ = out.shape
    cells = torch.arange(s, device=out.device, dtype=out.dtype)
    cx = (cells.view(1, 1, 1, s) + out[:, :, 0].sigmoid()) / s
    cy = (cells.view(1, 1, s, 1) + out[:, :, 1].sigmoid()) / s
    w = anchors[:, 0].view(1, a, 1, 1) * out[:, :, 2].clamp(max=4).exp()
    h = anchors[:, 1].view(1, a, 1, 1) * out[:, :, 3].clamp(max=4).exp()
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0, 1)
    return boxes.reshape(b, -1, 4), out[:, :, 4].sigmoid().reshape(b, -1)


def yolo_loss(out: torch.Tensor, boxes: list[torch.Tensor], anchors: torch.Tensor, cfg
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """YOLOv2's detection loss (see the module docstring), summed over cells and averaged over the batch; `cfg`
    gives coord_weight, noobj_weight and ignore_iou."""
    b, a, _, s, _ = out.shape
    obj = torch.zeros(b, a, s, s, dtype=torch.bool, device=out.device)
    txy = torch.zeros(b, a, 2, s, s, device=out.device)
    twh = torch.zeros(b, a, 2, s, s, device=out.device)
    with torch.no_grad():
        pred_boxes, _ = decode(out.detach(), anchors)
        ignore = torch.zeros(b, a * s * s, dtype=torch.bool, device=out.device)
        for i, gt in enumerate(boxes):
            if len(gt) == 0:
                continue
            ignore[i] = box_iou(pred_boxes[i], gt).max(1).values > cfg.ignore_iou
            wh = (gt[:, 2:] - gt[:, :2]).clamp_min(1e-4)
            centre = (gt[:, :2] + gt[:, 2:]) / 2 * s
            cell = centre.long().clamp(0, s - 1)
            best = shape_iou(wh, anchors).argmax(1)
            for k in range(len(gt)):
                j, y, x = int(best[k]), int(cell[k, 1]), int(cell[k, 0])
                obj[i, j, y, x] = True
                txy[i, j, :, y, x] = centre[k] - cell[k]
                twh[i, j, :, y, x] = torch.log(wh[k] / anchors[j])
    logits = out[:, :, 4]
    noobj = ~obj & ~ignore.view(b, a, s, s)
    pos = obj[:, :, None].expand(-1, -1, 2, -1, -1)
    loss_xy = ((out[:, :, :2].sigmoid() - txy)[pos] ** 2).sum()
    loss_wh = ((out[:, :, 2:4] - twh)[pos] ** 2).sum()
    loss_obj = F.binary_cross_entropy_with_logits(logits[obj], torch.ones_like(logits[obj]), reduction="sum")
    loss_noobj = F.binary_cross_entropy_with_logits(logits[noobj], torch.zeros_like(logits[noobj]), reduction="sum")
    loss = (cfg.coord_weight * (loss_xy + loss_wh) + loss_obj + cfg.noobj_weight * loss_noobj) / b
    parts = {k: float(v.detach()) / b for k, v in
             {"xy": loss_xy, "wh": loss_wh, "obj": loss_obj, "noobj": loss_noobj}.items()}
    return loss, parts
