"""The Spatial Alignment Network (Yang, Russell & Salamon, CVPR 2020) and the ablations of its Table 2.

    video (B, T, 3, H, W) -> ResNet-18 per frame -> 1x1 conv to 16 channels -> 16 x h x w map flattened per frame
                                                                               -> visual (B, 16*h*w, T)
    audio (B, C, n_mels, S) -> 4 squeeze-and-excitation residual blocks, stride 2 -> conv over all mel bands
                                                                               -> audio (B, audio_dim, S/16)
    fusion: visual resampled to the audio's time steps, concatenated on channels, two 1x1 convs,
            average over time -> fused (B, fusion_dim) -> Linear -> one logit (channels swapped?)
    (model.fusion=attend, not the paper's: audio queries attend over the map's cells; AttentionFusion below)

Flattening the visual map instead of pooling it keeps *where* things are, which the flip task needs; the
`pooled-visual` variant pools anyway to show the difference. For the paper's shapes (18 x 3 x 224 x 224 video,
2 x 128 x 288 log-mel) the map is 16 x 7 x 7 = 784 channels and both streams have 18 time steps.

    python -c "from flipray.pretext.models import *; from flipray.config import load_config; \
               print(count_parameters(SpatialAlignmentNet(load_config('paper'))))"
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock
from torchvision.models.video import mc3_18

from flipray.config import FRONT_ENDS, Config
from flipray.pretext.data import AudioFeatures


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _init_weights(module: nn.Module):
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch renormalisation (Ioffe 2017), the authors' norm: training normalises with the batch statistics, then
    corrects them towards the running ones (r = sigma_B / sigma clipped to [1/rmax, rmax], d = (mu_B - mu) / sigma
    clipped to [-dmax, dmax], both without gradient), so training and evaluation see the same normalisation even
    with small or correlated batches. Same parameters and buffers as BatchNorm2d (checkpoints interchange)."""

    def __init__(self, num_features: int, rmax: float = 3.0, dmax: float = 5.0, **kw):
        super().__init__(num_features, **kw)
        self.rmax, self.dmax = rmax, dmax

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        std = (var + self.eps).sqrt()
        running_std = (self.running_var + self.eps).sqrt()
        with torch.no_grad():
            r = (std / running_std).clamp(1 / self.rmax, self.rmax)
            d = ((mean - self.running_mean) / running_std).clamp(-self.dmax, self.dmax)
            n = x.numel() / x.shape[1]
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        y = (x - mean[None, :, None, None]) / std[None, :, None, None] * r[None, :, None, None] + d[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def norm2d(kind: str, channels: int) -> nn.Module:
    """model.norm: BatchNorm2d, or the authors' BatchRenorm2d."""
    return BatchRenorm2d(channels) if kind == "batchrenorm" else nn.BatchNorm2d(channels)


# ---------------------------------------------------------------------------------------------------------------------
# Visual stream

class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 up to layer4 (no pooling, no fc), with a configurable base width.

    At width 64 the parameter names and shapes are torchvision's, so an ImageNet resnet18 state_dict loads as is;
    narrower widths keep the same topology for CPU-sized presets.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        layers, inplanes = [], width
        for i, planes in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and inplanes == planes else nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = 8 * width

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_imagenet_trunk(trunk: ResNet18Trunk, path: str):
    """Load a torchvision resnet18 state_dict file (e.g. resnet18-f37072fd.pth you downloaded) into the trunk."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not a torchvision resnet18 state_dict (missing {missing[:3]}..., "
                         f"unexpected {unexpected[:3]}...)")


class VisualNet(nn.Module):
    """Per-frame ResNet-18; 1x1 reduction; the spatial map flattened into channels (or pooled, for the ablation)."""

    def __init__(self, cfg: Config, pooled: bool = False):
        super().__init__()
        m = cfg.model
        self.pooled = pooled
        self.trunk = ResNet18Trunk(m.visual_width)
        if pooled:
            self.out_dim = self.trunk.out_channels
        else:
            self.reduce = nn.Sequential(nn.Conv2d(self.trunk.out_channels, m.visual_reduce, 1, bias=False),
                                        norm2d(m.norm, m.visual_reduce), nn.ReLU(inplace=True))
            side = cfg.data.crop
            width = 2 * side if cfg.data.audio_channels == 4 else side  # 360 clips: crop x 2 crop panoramas
            for _ in range(5):  # conv1, maxpool, layer2..4 each halve the side (rounding up)
                side, width = (side + 1) // 2, (width + 1) // 2
            self.map_size = side
            self.out_dim = m.visual_reduce * side * width

    def feature_map(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, C, h, w): the reduced spatial map (for attention maps / Grad-CAM)."""
        b, t = video.shape[:2]
        x = self.reduce(self.trunk(video.flatten(0, 1)))
        return x.unflatten(0, (b, t))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        if self.pooled:
            x = self.trunk(video.flatten(0, 1)).mean(dim=(2, 3))
        else:
            x = self.feature_map(video).flatten(2)
        return x.reshape(b, t, -1).transpose(1, 2)  # (B, D, T)


class MotionNet(nn.Module):
    """The `motion` ablation: torchvision's mixed-convolution 3D ResNet (mc3_18) over the clip, map flattened."""

    def __init__(self, cfg: Config):
        super().__init__()
        net = mc3_18(weights=None)
        self.trunk = nn.Sequential(net.stem, net.layer1, net.layer2, net.layer3, net.layer4)
        r = cfg.model.visual_reduce
        self.reduce = nn.Sequential(nn.Conv3d(512, r, 1, bias=False), nn.BatchNorm3d(r), nn.ReLU(inplace=True))
        side = cfg.data.crop
        for _ in range(4):  # stem, layer2..4 halve space; time keeps its length
            side = (side + 1) // 2
        self.out_dim = r * side * side

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.reduce(self.trunk(video.transpose(1, 2)))  # (B, r, T, h, w)
        return x.transpose(1, 2).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Audio stream

class SEResBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, squeeze-and-excitation (reduction 16), 1x1 conv shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 2, reduction: int = 16, norm: str = "batchnorm"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm2d(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm2d(norm, cout))
        hidden = max(cout // reduction, 4)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, cout), nn.Sigmoid())
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(norm, cout))

    def forward(self, x):
        y = self.body(x)
        y = y * self.se(y)[:, :, None, None]
        return F.relu(y + self.shortcut(x))


class AudioNet(nn.Module):
    """(B, C, n_mels, S) features -> (B, out_dim, S/16): four SE blocks, then one conv spanning all mel bands
    (`head` conv-bn-relu: + BatchNorm and ReLU; conv: the authors' plain conv with bias)."""

    def __init__(self, in_channels: int, width: int, out_dim: int, n_mels: int, norm: str = "batchnorm",
                 head: str = "conv-bn-relu"):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.blocks = nn.Sequential(*[SEResBlock(a, b, norm=norm) for a, b in zip([in_channels] + w[:3], w)])
        kernel = (n_mels // 16, 1)
        if head == "conv":
            self.collapse = nn.Sequential(nn.Conv2d(w[3], out_dim, kernel_size=kernel, bias=True))
        else:
            self.collapse = nn.Sequential(nn.Conv2d(w[3], out_dim, kernel_size=kernel, bias=False),
                                          nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))
        self.out_dim = out_dim

    def forward(self, x):
        return self.collapse(self.blocks(x)).squeeze(2)


def audio_in_channels(variant: str, audio_channels: int = 2, foa_intensity: bool = False,
                      front_end: str = "logmel") -> int:
    """Feature channels `flipray.pretext.data.AudioFeatures` produces: the front end's (L, R log-mels (+ cos, sin
    IPD) (+ 3 GCC-PHAT bands)), then + mono or + 3 GCC-PHAT bands for those variants;
    for FOA (audio_channels=4): W, Y, Z, X (+ 3 intensity-vector channels)."""
    if audio_channels == 4:
        return 7 if foa_intensity else 4
    return FRONT_ENDS[front_end] + {"mono": 1, "gcc-phat": 3}.get(variant, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Fusion by attention (model.fusion=attend)

class AttentionFusion(nn.Module):
    """Per audio step, each head's query (from the audio embedding) attends over the visual map's cells; the head says
    where in the picture its sound is (the attended cells' mean column, -1 left .. +1 right) and which side it is heard
    on (tanh of the audio embedding). Their product is + when picture and sound agree, - when the channels are swapped;
    the classifier weighs the heads' products averaged over time. A mirrored picture with swapped channels changes
    both signs, so the joint flip leaves the product as it is, as it leaves the label."""

    def __init__(self, visual_channels: int, map_h: int, map_w: int, audio_dim: int, heads: int, key_dim: int = 16):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.keys = nn.Linear(visual_channels, heads * key_dim)
        self.queries = nn.Conv1d(audio_dim, heads * key_dim, 1)
        self.sides = nn.Conv1d(audio_dim, heads, 1)
        columns = torch.linspace(-1, 1, map_w) if map_w > 1 else torch.zeros(1)
        self.register_buffer("columns", columns.repeat(map_h), persistent=False)  # cell -> its column, row-major
        self.out_dim = heads

    def forward(self, cells: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        """cells (B, C, h*w, T), audio (B, A, T) -> attention (B, heads, T, h*w), where / side / fused (B, heads, T)."""
        k = self.keys(cells.permute(0, 3, 2, 1)).unflatten(-1, (self.heads, self.key_dim))  # (B, T, n, H, d)
        q = self.queries(audio).unflatten(1, (self.heads, self.key_dim))                    # (B, H, d, T)
        scores = torch.einsum("btnhd,bhdt->bhtn", k, q) / self.key_dim ** 0.5
        attention = scores.softmax(dim=-1)
        where = attention @ self.columns.to(attention.dtype)
        side = torch.tanh(self.sides(audio))
        return {"attention": attention, "where": where, "side": side, "fused": where * side}


# ---------------------------------------------------------------------------------------------------------------------
# The two-stream network

class SpatialAlignmentNet(nn.Module):
    """Says whether the left/right audio channels of a clip were swapped (one logit, > 0 = swapped)."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, variant = cfg.model, cfg.model.variant
        self.variant = variant
        self.visual = MotionNet(cfg) if variant == "motion" else VisualNet(cfg, pooled=variant == "pooled-visual")
        # The audio front end (waveform -> features) on the model's device; its buffers are not in the state dict.
        self.front_end = AudioFeatures(cfg)
        stereo_in = self.front_end.channels - (1 if variant == "mono" else 0)
        self.audio = AudioNet(stereo_in, m.audio_width, m.audio_dim, cfg.data.n_mels, m.norm, m.audio_head)
        # The `mono` ablation: a third stream that hears only the mono mix (timbre, not direction).
        self.mono_audio = (AudioNet(1, m.audio_width, m.audio_dim, cfg.data.n_mels, m.norm, m.audio_head)
                           if variant == "mono" else None)
        audio_dim = m.audio_dim * (2 if self.mono_audio is not None else 1)
        if m.fusion == "attend":  # (validate: stereo flip task, so the map is square)
            side = self.visual.map_size
            self.fusion = AttentionFusion(m.visual_reduce, side, side, audio_dim, m.fusion_heads)
            fusion_out = self.fusion.out_dim
        else:
            self.fusion = nn.Sequential(nn.Conv1d(self.visual.out_dim + audio_dim, m.fusion_dim, 1),
                                        nn.ReLU(inplace=True),
                                        nn.Conv1d(m.fusion_dim, m.fusion_dim, 1), nn.ReLU(inplace=True))
            fusion_out = m.fusion_dim
        self.classifier = nn.Linear(fusion_out, 1)
        # P(swapped) = sigmoid(logit / temperature), the temperature fitted on the validation split after training
        # (train.calibrate), so a probability, and `flipray check`'s margin, mean the same for every model. Not used by
        # forward (training sees raw logits); saved with the weights.
        self.register_buffer("temperature", torch.ones(()))
        _init_weights(self)
        if isinstance(self.fusion, AttentionFusion):  # PyTorch's fan-in defaults: fan-out Kaiming saturates the tanh
            for layer in (self.fusion.keys, self.fusion.queries, self.fusion.sides):
                layer.reset_parameters()
        if m.visual_init.startswith("imagenet:"):
            load_imagenet_trunk(self.visual.trunk, m.visual_init.split(":", 1)[1])

    def embed_visual(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, visual_dim, T)."""
        return self.visual(video)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, C, n_mels, S) features -> (B, audio_dim, S/16), the stereo stream (plus the mono stream for `mono`,
        whose mono log-mel is the last channel)."""
        a = self.audio(audio[:, :-1] if self.mono_audio is not None else audio)
        if self.mono_audio is not None:
            a = torch.cat([a, self.mono_audio(audio[:, -1:])], dim=1)
        return a

    def audio_features(self, wave: torch.Tensor) -> torch.Tensor:
        """Peak-normalised waveform (B, C, S) -> the audio stream's input (B, C', n_mels, S'), on the wave's device
        (which must be the model's: the front end's buffers live there)."""
        if wave.device != self.front_end.fb.device:
            raise ValueError(f"audio waveform is on {wave.device}, the model on {self.front_end.fb.device}; move both "
                             f"to one device")
        if wave.device.type != "cuda":  # autocast only runs the forward in bfloat16 on CUDA (train.amp)
            return self.front_end(wave.float())
        with torch.autocast("cuda", enabled=False):  # phase and log need float32, not bfloat16
            return self.front_end(wave.float())

    def features(self, video: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        v, a = self.embed_visual(video), self.embed_audio(audio)
        if v.shape[-1] != a.shape[-1]:  # e.g. 6 demo frames against 18 audio steps
            v = F.interpolate(v, size=a.shape[-1], mode="linear", align_corners=False)
        if isinstance(self.fusion, AttentionFusion):  # the map's cells back apart: (B, C, h*w, T)
            out = self.fusion(v.unflatten(1, (self.fusion.keys.in_features, -1)), a)
            return {"visual": v, "audio": a, **out, "pooled": out["fused"].mean(dim=-1)}
        fused = self.fusion(torch.cat([v, a], dim=1))
        return {"visual": v, "audio": a, "fused": fused, "pooled": fused.mean(dim=-1)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before calibration have no temperature: uncalibrated (1.0)
        state_dict.setdefault(prefix + "temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """audio: features (B, C', n_mels, S'), or the peak-normalised waveform (B, C, S) that the loaders hand,
        turned into features here by the front end on the model's device."""
        if audio.dim() == 3:
            audio = self.audio_features(audio)
        return self.classifier(self.features(video, audio)["pooled"]).squeeze(-1)
