"""The audio U-Net of the paper's upmixing and separation heads (Figure 3 c, d): 2.5D Visual Sound's Mono2Binaural
U-Net (Gao & Grauman, CVPR 2019) with pretext features concatenated at the innermost layer.

    spectrogram (B, in_ch, F, T) -> 5 x [Conv2d k4 s2 + BN + LeakyReLU(0.2)]            (channels ngf .. 8 ngf)
        bottleneck (B, 8 ngf, F/32, T/32)  ++  condition (B, cond_dim, Tc) -> 1x1 conv -> resampled to T/32 steps,
                                                                             tiled over the F/32 frequency rows
        -> 5 x [ConvTranspose2d k4 s2 + BN + ReLU] with skip connections -> (B, out_ch, F, T), tanh or sigmoid

    python -c "from flipray.tasks.unet import AudioUNet; import torch; \
               print(AudioUNet(2, 2, ngf=16, cond_dim=144)(torch.randn(1, 2, 256, 288), torch.randn(1, 144, 6)).shape)"

One class serves both heads: upmixing (flipray/tasks/spatialize.py: the mono mix's real/imag STFT in, a tanh complex
mask out) and separation (flipray/tasks/separate.py: the mixture's L/R magnitudes in, sigmoid ratio masks out).
The condition keeps its time axis (the pretext streams give one vector per time step) and is resampled onto the
bottleneck's time steps rather than pooled, so a source moving across the frame stays aligned with its sound;
a (B, cond_dim) vector is tiled over time instead. `cond_dim=0` is the "no visual features" U-Net.

Also here, because both heads cut clips the same way: `Spectrogram` (flipray's STFT, 512/160/400 at 16 kHz, the low
256 bins as in the authors' code) and `Chunks`, the examples: audio chunks of 2.5D Visual Sound's 0.63 s that start
on a video frame, with the stored frames shown during them, and the sliding windows of whole-clip inference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flipray.config import Config
from flipray.pretext.data import SampleParams, augment_frames

DEPTH = 5  # stride-2 levels: F and T are padded to multiples of 2**DEPTH


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AudioUNet(nn.Module):
    """(B, in_ch, F, T) spectrogram (+ condition) -> (B, out_ch, F, T) mask in (-1, 1) (tanh) or (0, 1) (sigmoid)."""

    def __init__(self, in_ch: int = 2, out_ch: int = 2, ngf: int = 64, cond_dim: int = 0, cond_proj: int = 64,
                 out_act: str = "tanh"):
        super().__init__()
        if out_act not in ("tanh", "sigmoid"):
            raise ValueError(f"out_act must be 'tanh' (complex mask) or 'sigmoid' (ratio mask), got {out_act!r}")
        self.out_act, self.cond_dim = out_act, cond_dim
        w = [ngf, 2 * ngf, 4 * ngf, 8 * ngf, 8 * ngf]
        self.down = nn.ModuleList([_down(cin, cout) for cin, cout in zip([in_ch] + w[:-1], w)])
        # A learned 1x1 projection brings conditions of any width (144 flattened demo-map channels, 784 for the
        # paper's, 512 fused) to one size, so the head is the same across pretext networks.
        self.cond = nn.Sequential(nn.Conv1d(cond_dim, cond_proj, 1), nn.ReLU(inplace=True)) if cond_dim else None
        c = cond_proj if cond_dim else 0
        self.up = nn.ModuleList([_up(w[4] + c, w[3]), _up(2 * w[3], w[2]), _up(2 * w[2], w[1]), _up(2 * w[1], w[0])])
        self.last = nn.ConvTranspose2d(2 * w[0], out_ch, 4, 2, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (cond is None) != (self.cond is None):
            raise ValueError(f"this U-Net was built with cond_dim={self.cond_dim}: pass a condition exactly when "
                             "cond_dim > 0")
        f, t = x.shape[-2:]
        m = 2 ** DEPTH
        x = F.pad(x, (0, -t % m, 0, -f % m))  # zeros after the last frame / bin; cropped off again below
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        if self.cond is not None:
            if cond.ndim == 2:
                cond = cond[:, :, None]
            c = self.cond(cond)
            c = F.interpolate(c, size=x.shape[-1], mode="linear", align_corners=False)
            x = torch.cat([x, c[:, :, None, :].expand(-1, -1, x.shape[-2], -1)], dim=1)
        for layer, skip in zip(self.up, reversed(skips[:-1])):
            x = torch.cat([layer(x), skip], dim=1)
        x = self.last(x)[..., :f, :t]
        return torch.tanh(x) if self.out_act == "tanh" else torch.sigmoid(x)


# ---------------------------------------------------------------------------------------------------------------------
# Spectrograms and chunks (shared by flipray/tasks/spatialize.py and flipray/tasks/separate.py)

class Spectrogram:
    """Complex STFT (..., n_fft/2, frames) with the pretext's n_fft / hop / Hann window, centred frames; the Nyquist
    bin is dropped (256 bins fit the U-Net's five halvings) and put back as zeros by `inverse`."""

    def __init__(self, pcfg: Config):
        d = pcfg.data
        self.n_fft, self.hop, self.win = d.n_fft, d.hop_length, d.win_length
        self.window = torch.hann_window(self.win)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        flat = wave.reshape(-1, wave.shape[-1])
        spec = torch.stft(flat, self.n_fft, self.hop, self.win, window=self.window.to(wave.device, wave.dtype),
                          center=True, return_complex=True)[:, :-1]
        return spec.reshape(*wave.shape[:-1], *spec.shape[-2:])

    def inverse(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        flat = F.pad(spec.reshape(-1, *spec.shape[-2:]), (0, 0, 0, 1))
        wave = torch.istft(flat, self.n_fft, self.hop, self.win, window=self.window.to(spec.device, spec.real.dtype),
                           center=True, length=length)
        return wave.reshape(*spec.shape[:-2], length)


@dataclass(frozen=True)
class Chunks:
    """The examples cut from a clip: `seconds` of audio starting on video frame f0, and the `frames` stored frames
    shown during that time (4 at 6 fps for 0.63 s). Each frame goes through the pretext visual stream unchanged."""
    seconds: float
    fps: float
    sample_rate: int

    @property
    def samples(self) -> int:
        return round(self.seconds * self.sample_rate)

    @property
    def frames(self) -> int:
        return max(1, math.ceil(self.seconds * self.fps - 1e-6))

    def start_sample(self, f0: int) -> int:
        return round(f0 / self.fps * self.sample_rate)

    def last_start(self, n_frames: int, n_samples: int) -> int:
        """Latest start frame whose frames and audio both lie inside a clip of n_frames frames / n_samples samples."""
        f0 = n_frames - self.frames
        while f0 >= 0 and self.start_sample(f0) + self.samples > n_samples:
            f0 -= 1
        if f0 < 0:
            raise ValueError(f"a clip of {n_frames} frames / {n_samples} samples is shorter than one "
                             f"{self.seconds}-s chunk")
        return f0

    def sliding(self, n_frames: int, n_samples: int, hop: int) -> list[int]:
        """Start frames of whole-clip inference: every `hop` frames, plus the last start so the windows reach the
        clip's end (up to the part after the last start's chunk, under a frame period, which no window covers)."""
        last = self.last_start(n_frames, n_samples)
        starts = list(range(0, last + 1, max(1, hop)))
        return starts if starts[-1] == last else starts + [last]

    def wave(self, wave: torch.Tensor, f0: int) -> torch.Tensor:
        s = self.start_sample(f0)
        return wave[..., s:s + self.samples]

    def video(self, frames: torch.Tensor, f0: int, pcfg: Config, mirror: bool = False) -> torch.Tensor:
        """uint8 (N, R, R, 3) frames at pcfg.data.resize -> float (frames, 3, crop, crop), centre crop, as the
        pretext network evaluates (flipray.tasks.base.visual_input); `mirror` flips left-right."""
        x = frames[f0:f0 + self.frames]
        if mirror:
            x = x.flip(2)
        margin = (pcfg.data.resize - pcfg.data.crop) // 2
        return augment_frames(x, SampleParams(f0, margin, margin, 1.0, 1.0, 1.0, False, False), pcfg.data.crop)


def overlap_add(pieces: list[tuple[int, torch.Tensor]], length: int) -> torch.Tensor:
    """Average of overlapping (start sample, (C, L) waveform) pieces over `length` samples; zero where none lies."""
    first = pieces[0][1]
    total = torch.zeros(*first.shape[:-1], length, dtype=first.dtype)
    count = torch.zeros(length, dtype=first.dtype)
    for start, piece in pieces:
        end = min(start + piece.shape[-1], length)
        total[..., start:end] += piece[..., :end - start].cpu()
        count[start:end] += 1
    return total / count.clamp_min(1)
