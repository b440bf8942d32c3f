"""The clip contract in code: decode a window of a clip, augment it, turn audio into features, batch it.

Everything here is plain PyTorch + torchcodec, so the library runs without DALI; `dali_pipelines/` produces the same
batch dict from the same `SampleParams`. A batch is:
    video  float (B, T, 3, H, W), ImageNet-normalised      audio  float (B, C, S) peak-normalised waveform; the model's
                                                           front end (AudioFeatures) makes features on its device
    label  float (B,), 1 = audio altered by the pretext task  clip_id, start_s  to trace a sample back to its clip
    item   int (B,), the dataset item (sample accounting)       weight float (B,), 0 for EpochSampler's pads

The pretext task (train.task) decides what "altered" means: `flip` swaps the left and right channels (the paper),
`mismatch` takes the audio of another clip (Arandjelovic & Zisserman), `shift` takes the same clip's audio
shifted in time by data.shift_min_s..shift_max_s (Owens & Efros). Same network, same batches, same label convention.

Conventions: audio channel 0 = left; a window starts on a video frame (start_s = start_frame / fps); every random
choice comes from a generator seeded by (seed, epoch, clip index), so a resumed run or a second loader draws the
same sample.
"""
from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch.utils.data import Dataset, Sampler, default_collate

from flipray.config import Config
from flipray.dataset.cache import open_store
from flipray.dataset.manifest import read_manifest
from flipray.dataset.store import dataset_rows, is_s3, require_splits

log = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
GCC_BANDS_HZ = ((0, 1000), (1000, 4000), (4000, 8000))  # the three GCC-PHAT channels of the `gcc-phat` variant
# `ild` front ends: the level difference log10(L/R) is multiplied by this before it enters the network (units of
# 3.3 dB), so it arrives at about the spread of the mean log-mel (std 0.42 against 1.5 bels on the demo scenes);
# left inside L and R log-mels it is a 2% difference between two channels that random weights mostly average away.
ILD_SCALE = 3.0


class ClipDecodeError(ValueError):
    """A clip's video or audio file is unreadable, truncated or not in the expected format; names the file."""


# ---------------------------------------------------------------------------------------------------------------------
# Decoding (torchcodec)

def decode_video(path: str | Path | bytes, indices: list[int] | None = None, size: int | None = None,
                 expect_frames: int | None = None, name: str | None = None, panorama: bool = False,
                 fit: str = "squash") -> torch.Tensor:
    """uint8 frames (N, H, W, 3) of a video file made square by `fit` (resize_square; wide clips squashed whole by
    default, so that sidecar boxes and azimuths, which describe the whole frame, still hold) and resized to `size`
    if given (`panorama`: equirectangular frames resized to size x 2 size, never cropped; flipray.foa.resize_panorama).

    `indices` selects frames (all when None). `path` may also be the file's bytes (an object from the clip store),
    which `name` then names in errors. Raises ClipDecodeError naming the file when it cannot be read or has
    fewer frames than `expect_frames` (a truncated upload) or than the indices need.
    """
    from torchcodec.decoders import VideoDecoder
    src, path = _decoder_source(path, name)
    try:
        dec = VideoDecoder(src, dimension_order="NHWC", seek_mode="approximate")
        n = dec.metadata.num_frames
        if n is None or n <= 0:
            raise ClipDecodeError(f"{path}: video has no frames")
        if expect_frames is not None and n < expect_frames:
            raise ClipDecodeError(f"{path}: video has {n} frames, the manifest says {expect_frames} (truncated?)")
        if indices is None:
            frames = dec.get_frames_in_range(0, n).data
        else:
            if max(indices) >= n:
                raise ClipDecodeError(f"{path}: frame {max(indices)} requested, the video has {n}")
            frames = dec.get_frames_at(indices).data
    except ClipDecodeError:
        raise
    except Exception as e:  # torchcodec raises RuntimeError/ValueError with FFmpeg's words
        raise ClipDecodeError(f"{path}: cannot decode video ({first_line(e)})") from None
    if expect_frames is not None and indices is None and frames.shape[0] < expect_frames:
        raise ClipDecodeError(f"{path}: decoded {frames.shape[0]} frames, the manifest says {expect_frames}")
    if panorama:
        from flipray.foa import resize_panorama
        return resize_panorama(frames, size)
    return resize_square(frames, size, fit)


def _decoder_source(path, name: str | None):
    """torchcodec decoders take a path string or the encoded bytes; errors name `name`, else the path."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return bytes(path), name or f"<{len(path)} bytes>"
    return str(path), name or path


def first_line(e: Exception) -> str:
    """FFmpeg errors come with a C++ source location and a bug-report footer; keep the words that matter."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(", ")[-1] if "SingleStreamDecoder" in text else text


FRAME_FITS = ("crop", "pad", "squash")


def resize_square(frames: torch.Tensor, size: int | None, fit: str = "squash") -> torch.Tensor:
    """uint8 (N, H, W, 3) frames made square, then resized (antialiased bilinear) to size x size (size None: the
    square's own side; a squashed frame keeps its height). A wide frame is fit by `fit`: "squash" it whole (ingest's
    default too), "pad" it to a square with each frame's mean colour above and below, or "crop" its centre square (it
    loses the sides, where the most lateral objects are). A tall frame is always centre-cropped: that keeps its whole
    width, all a left/right question needs."""
    if fit not in FRAME_FITS:
        raise ValueError(f"frame fit must be one of {', '.join(FRAME_FITS)}, got {fit!r}")
    n, h, w, _ = frames.shape
    s = min(h, w)
    if fit == "crop" or h >= w:
        frames = frames[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    elif fit == "pad":
        square = frames.float().mean(dim=(1, 2), keepdim=True).round().to(torch.uint8).expand(n, w, w, 3).clone()
        top = (w - h) // 2
        square[:, top:top + h] = frames
        frames, s = square, w
    elif size is None:
        size = s
    if size is None or (size == s and frames.shape[1] == frames.shape[2]):
        return frames.contiguous()
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decode_audio(path: str | Path | bytes, sample_rate: int, channels: int | None = 2,
                 expect_seconds: float | None = None, name: str | None = None) -> torch.Tensor:
    """float32 waveform (C, S) of an audio file (a path, or its bytes named by `name`) at `sample_rate`; channel 0 =
    left.

    Raises ClipDecodeError naming the file when it is unreadable, has the wrong channel count, or is much shorter
    than `expect_seconds` (a truncated upload).
    """
    from torchcodec.decoders import AudioDecoder
    src, path = _decoder_source(path, name)
    try:
        dec = AudioDecoder(src, sample_rate=sample_rate)
        wave = dec.get_all_samples().data
    except Exception as e:
        raise ClipDecodeError(f"{path}: cannot decode audio ({first_line(e)})") from None
    if channels is not None and wave.shape[0] != channels:
        raise ClipDecodeError(f"{path}: audio has {wave.shape[0]} channel(s), expected {channels}")
    if expect_seconds is not None and wave.shape[1] < 0.95 * expect_seconds * sample_rate:
        raise ClipDecodeError(f"{path}: audio lasts {wave.shape[1] / sample_rate:.2f} s, the manifest says "
                              f"{expect_seconds:.2f} s (truncated?)")
    return wave.float()


# ---------------------------------------------------------------------------------------------------------------------
# Sample parameters: every random choice of one sample, drawn in one place

@dataclass
class SampleParams:
    start_frame: int        # first stored-video frame of the window
    crop_x: int             # crop offset in the resized frame
    crop_y: int
    brightness: float       # colour jitter factors (1 = unchanged)
    contrast: float
    saturation: float
    joint_flip: bool        # mirror frames AND swap channels (alignment unchanged)
    swap: bool              # the pretext task's negative (label 1): channels swapped / other clip / time-shifted
    audio_clip: int = -1    # clip whose audio is used (-1 = this clip; the mismatch task's negatives)
    audio_shift: int = 0    # audio window start minus video window start, in stored-video frames (shift task)
    rotation_deg: float = 0.0  # rotate task's negative: FOA sound field rotated by this (flipray.foa.rotate_foa)
    roll_deg: float = 0.0   # 360 clips: panorama AND sound field rotated by this (joint augmentation, label unchanged)

    @property
    def label(self) -> float:
        return float(self.swap)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()[:8], "little") >> 1


def draw_params(cfg: Config, clip_frames: int, seed: int, epoch: int, index: int, train: bool,
                swap: bool | None = None, n_clips: int = 1) -> SampleParams:
    """The augmentation and label of sample `index` (of `n_clips` clips) in `epoch`.

    Training draws everything at random. Evaluation is deterministic and unaugmented: centre crop, no jitter or
    joint flip, a fixed random window per clip, and `swap` (the task's negative) given by the caller (each clip is
    scored both ways).
    """
    d = cfg.data
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    u = torch.rand(12, generator=g).tolist()  # fixed number of draws: adding a knob never shifts the others
    last_start = clip_frames - cfg.window_frames
    if last_start < 0:
        raise ValueError(f"clip of {clip_frames} frames is shorter than the {cfg.window_frames}-frame window")
    start = min(int(u[0] * (last_start + 1)), last_start)
    swap = u[7] < 0.5 if swap is None else swap
    audio_clip, audio_shift = -1, 0
    if swap and cfg.train.task == "mismatch":
        if n_clips < 2:
            raise ValueError("train.task=mismatch needs at least 2 clips in the split")
        audio_clip = (index + 1 + min(int(u[8] * (n_clips - 1)), n_clips - 2)) % n_clips
    elif swap and cfg.train.task == "shift":
        start, audio_shift = _shifted_window(cfg, last_start, u[8], u[9], u[10])
    rotation = 0.0
    if swap and cfg.train.task == "rotate":
        rotation = float(d.rotations_deg[min(int(u[8] * len(d.rotations_deg)), len(d.rotations_deg) - 1)])
    pano = d.audio_channels == 4  # 360 clips: frames at crop x 2*crop, rolled (with the sound field), never cropped
    if not train:
        margin = 0 if pano else (d.resize - d.crop) // 2
        return SampleParams(start, margin, margin, 1.0, 1.0, 1.0, False, swap, audio_clip, audio_shift, rotation)
    j, cols = d.color_jitter, 2 * d.crop
    return SampleParams(
        start_frame=start,
        crop_x=0 if pano else min(int(u[1] * (d.resize - d.crop + 1)), d.resize - d.crop),
        crop_y=0 if pano else min(int(u[2] * (d.resize - d.crop + 1)), d.resize - d.crop),
        brightness=1 + j * (2 * u[3] - 1), contrast=1 + j * (2 * u[4] - 1), saturation=1 + j * (2 * u[5] - 1),
        joint_flip=u[6] < d.joint_flip_p,
        swap=swap, audio_clip=audio_clip, audio_shift=audio_shift, rotation_deg=rotation,
        roll_deg=360.0 * min(int(u[11] * cols), cols - 1) / cols if pano else 0.0)


def _shifted_window(cfg: Config, last_start: int, u_size: float, u_sign: float, u_start: float) -> tuple[int, int]:
    """(video start, audio shift) in frames for a shift-task negative: |shift| drawn in data.shift_min_s..max_s,
    capped by what the clip allows; both windows inside the clip."""
    fps = cfg.data.fps
    lo, hi = round(cfg.data.shift_min_s * fps), round(cfg.data.shift_max_s * fps)
    if last_start < max(lo, 1):
        raise ValueError(f"train.task=shift: clips need room for a {cfg.data.shift_min_s}-s shift of the "
                         f"{cfg.data.window_s}-s window ({cfg.window_frames + lo} frames), got "
                         f"{cfg.window_frames + last_start}")
    size = lo + min(int(u_size * (min(hi, last_start) - lo + 1)), min(hi, last_start) - lo)
    sign = 1 if u_sign < 0.5 else -1
    start = min(int(u_start * (last_start - size + 1)), last_start - size)  # the earlier of the two windows
    return (start, size) if sign > 0 else (start + size, -size)


def pair_size(cfg: Config, train: bool) -> int:
    """Items per drawn training window: 2 with train.pair_negatives (the window as recorded, then as the task's
    negative, adjacent in every epoch's order), else 1."""
    return 2 if train and cfg.train.pair_negatives else 1


def num_items(n_clips: int, cfg: Config, train: bool) -> int:
    """Items in one pass over a split: one random window per clip when training (twice with train.pair_negatives);
    when evaluating, data.eval_windows fixed windows per clip, each scored as recorded and swapped."""
    return n_clips * pair_size(cfg, train) if train else n_clips * 2 * cfg.data.eval_windows


def item_params(cfg: Config, clips: list[dict], seed: int, epoch: int, item: int,
                train: bool) -> tuple[int, SampleParams]:
    """(clip index, SampleParams) of dataset item `item` in `epoch`: the one mapping both loaders use."""
    if train and cfg.train.pair_negatives:  # item = (clip, negative?): one draw, the label given
        (ci, side), window = divmod(item, 2), epoch
        swap = bool(side)
    elif train:
        ci, window, swap = item, epoch, None
    else:  # item = (clip, window, swap); the window index seeds the window's position instead of the epoch
        ci, rest = divmod(item, 2 * cfg.data.eval_windows)
        window, swap = rest // 2, bool(rest % 2)
    return ci, draw_params(cfg, clips[ci]["num_frames"], seed, window, ci, train, swap, n_clips=len(clips))


def window_frame_indices(cfg: Config, start_frame: int) -> list[int]:
    """Stored-frame indices the model sees: num_frames spread evenly over the window (all 18 for the paper)."""
    n, span = cfg.data.num_frames, cfg.window_frames
    return [start_frame + (i * span) // n for i in range(n)]


def take_frames(frames: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """frames[indices] as a new tensor. Evenly spaced indices (every preset's) are a strided slice copied in one
    pass: indexing with a Python list gathers element by element, 3 ms for the demo's 6 small frames and 23 ms for
    the paper's 18 (docs/performance.md)."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if step > 0 and indices == list(range(indices[0], indices[-1] + 1, step)):
        return frames[indices[0]:indices[-1] + 1:step].clone(memory_format=torch.contiguous_format)
    return frames.index_select(0, torch.tensor(indices))


def window_samples_range(cfg: Config, start_frame: int) -> tuple[int, int]:
    start = round(start_frame / cfg.data.fps * cfg.data.sample_rate)
    return start, start + cfg.window_samples


def audio_window(cfg: Config, clip_index: int, p: SampleParams) -> tuple[int, int]:
    """(clip whose audio the sample hears, first frame of its audio window): the task's negative decides both."""
    return (p.audio_clip if p.audio_clip >= 0 else clip_index), p.start_frame + p.audio_shift


# ---------------------------------------------------------------------------------------------------------------------
# Transforms

def flip_channels(wave: torch.Tensor) -> torch.Tensor:
    """The pretext transform: swap left and right (channel 0 <-> 1) of a (..., 2, S) waveform."""
    if wave.shape[-2] != 2:
        raise ValueError(f"flip_channels needs stereo audio (2 channels), got {wave.shape[-2]}")
    return wave.flip(-2)


def joint_flip(frames: torch.Tensor, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror frames left-right AND swap the audio channels: the scene is mirrored, audio-visual alignment kept.

    `frames` is (..., H, W, 3) uint8 or (..., 3, H, W) float; the width axis is found from the layout.
    """
    width_axis = -2 if frames.shape[-1] == 3 and frames.dtype == torch.uint8 else -1
    return frames.flip(width_axis), flip_channels(wave)


def augment_frames(frames: torch.Tensor, p: SampleParams, crop: int, crop_w: int | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, crop, crop_w or crop): crop, colour jitter, ImageNet normalisation."""
    # HWC -> CHW in the one copy that converts to float, then every step in place on that fresh contiguous tensor:
    # the strided, allocate-per-step version took 3-6x longer for the same values (docs/performance.md). Contiguous
    # also because a channels-last input's weight gradients disagree with DDP's gradient buckets.
    x = frames[:, p.crop_y:p.crop_y + crop, p.crop_x:p.crop_x + (crop_w or crop)].permute(0, 3, 1, 2).to(
        torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255.0)
    if p.brightness != 1.0:
        x.mul_(p.brightness)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    if p.contrast != 1.0:
        mean = gray.mean(dim=(2, 3), keepdim=True)
        x.sub_(mean).mul_(p.contrast).add_(mean)
    if p.saturation != 1.0:
        x.sub_(gray).mul_(p.saturation).add_(gray)
    return x.clamp_(0.0, 1.0).sub_(IMAGENET_MEAN).div_(IMAGENET_STD)


class AudioFeatures(torch.nn.Module):
    """Waveform (..., C, S) at 16 kHz -> features (..., C', n_mels, T): the audio front end, on the waveform's device.

    Stereo channels by model.front_end: log10-mel of left and right (`logmel`, the paper's stacked input; level
    differences only), or for `ild-ipd-gcc` (the default) their mean and their difference, the level difference,
    times ILD_SCALE (same information; the laterality cue as a channel of its own, docs/stereo.md); `ipd` adds cos
    and sin of the interaural phase difference per mel band (the left x conj(right) cross-spectrum pooled over each
    band's bins, divided by the pooled |L||R|: a band whose phase difference is steady gives (cos, sin) of it, an
    incoherent or silent band gives ~0); `ipd-gcc` and `ild-ipd-gcc` add three band-limited GCC-PHAT maps
    (lags -n_mels/2..n_mels/2-1 samples, bands GCC_BANDS_HZ, peak scaled to ~1). Then the mono mix for the `mono`
    variant, or the paper's unscaled GCC-PHAT maps for `gcc-phat`. FOA clips: W, Y, Z, X log-mels (+ intensity).
    The mel filterbank is Slaney-scaled and -normalised so DALI's mel_filter_bank defaults reproduce it. Buffers are
    not saved in checkpoints (they follow from the config). Loaders hand the peak-normalised waveform; the training
    loop calls this on the training device (docs/stereo.md).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.data
        self.variant, self.n_mels, self.sr = cfg.model.variant, d.n_mels, d.sample_rate
        self.audio_channels = d.audio_channels
        self.front_end = cfg.model.front_end if d.audio_channels != 4 else "logmel"
        self.cues = set(self.front_end.split("-"))  # what the name lists: ild, ipd, gcc (beside the log-mels)
        self.intensity = d.audio_channels == 4 and d.foa_intensity  # FOA: + 3 intensity-vector maps (flipray.foa)
        self.n_fft, self.hop, self.win = d.n_fft, d.hop_length, d.win_length
        # torchaudio.transforms.MelSpectrogram(norm="slaney", mel_scale="slaney", power=2) computed from one STFT
        # that the phase features share
        with torch.device("cpu"):  # computed on the CPU even under a meta / cuda default device, then moved there
            fb = torchaudio.functional.melscale_fbanks(d.n_fft // 2 + 1, 0.0, float(d.sample_rate // 2), d.n_mels,
                                                       d.sample_rate, norm="slaney", mel_scale="slaney")
            window = torch.hann_window(d.win_length)
        device = torch.get_default_device()
        self.register_buffer("fb", fb.to(device), persistent=False)             # (n_freqs, n_mels)
        self.register_buffer("window", window.to(device), persistent=False)

    @property
    def channels(self) -> int:
        from flipray.pretext.models import audio_in_channels
        return audio_in_channels(self.variant, self.audio_channels, self.intensity, self.front_end)

    def stft(self, wave: torch.Tensor) -> torch.Tensor:
        """Complex STFT (..., C, n_fft/2+1, T), centre=True with reflect padding, as torchaudio's Spectrogram."""
        shape = wave.shape
        spec = torch.stft(wave.reshape(-1, shape[-1]), self.n_fft, self.hop, self.win, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)
        return spec.reshape(*shape[:-1], *spec.shape[-2:])

    def mel_of_power(self, power: torch.Tensor) -> torch.Tensor:
        return torch.matmul(power.transpose(-1, -2), self.fb).transpose(-1, -2)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log10(self.mel_of_power(self.stft(wave).abs().pow(2)) + 1e-10)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.stft(wave)
        logmel = torch.log10(self.mel_of_power(spec.abs().pow(2)) + 1e-10)
        if "ild" in self.cues:  # mid and side: swapping the channels negates the second, keeps the first
            left, right = logmel[..., 0, :, :], logmel[..., 1, :, :]
            logmel = torch.stack([(left + right) / 2, ILD_SCALE * (left - right)], dim=-3)
        feats = [logmel]
        if self.intensity:
            from flipray.foa import intensity_features
            feats.append(intensity_features(wave, self.fb, self.n_fft, self.hop, self.win))
        if "ipd" in self.cues:
            feats.append(self.ipd(spec))
        if "gcc" in self.cues:
            feats.append(self.gcc_phat(spec, scaled=True))
        if self.variant == "mono":
            feats.append(self.log_mel(wave.mean(dim=-2, keepdim=True)))
        elif self.variant == "gcc-phat":
            feats.append(self.gcc_phat(spec))
        return torch.cat(feats, dim=-3)

    def ipd(self, spec: torch.Tensor) -> torch.Tensor:
        """(cos, sin) of the left-right phase difference per mel band: (..., 2, n_mels, T). Positive sin = left
        leads (a source on the left of a spaced pair); swapping the channels negates sin and keeps cos."""
        left, right = spec[..., 0, :, :], spec[..., 1, :, :]
        cross = left * right.conj()
        fb = self.fb.to(cross.real.dtype)
        pooled_re = torch.matmul(cross.real.transpose(-1, -2), fb).transpose(-1, -2)
        pooled_im = torch.matmul(cross.imag.transpose(-1, -2), fb).transpose(-1, -2)
        norm = torch.matmul((left.abs() * right.abs()).transpose(-1, -2), fb).transpose(-1, -2)
        norm = norm + 1e-8 * norm.amax(dim=(-2, -1), keepdim=True) + 1e-12  # silent bands -> 0, not noise
        return torch.stack([pooled_re / norm, pooled_im / norm], dim=-3)

    def gcc_phat(self, spec: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """Band-limited GCC-PHAT per STFT frame: (..., 3, n_mels lags, T); lag index n_mels/2 + k holds lag k
        samples, and a source on the left (right channel delayed by k) peaks at n_mels/2 - k. `scaled`: divided
        by the band's share of the spectrum, so a coherent delay peaks near 1 in every band."""
        cross = spec[..., 0, :, :] * spec[..., 1, :, :].conj()
        cross = cross / cross.abs().clamp_min(1e-8)
        freqs = torch.fft.rfftfreq(self.n_fft, 1 / self.sr, device=spec.device)
        half = self.n_mels // 2
        maps = []
        for lo, hi in GCC_BANDS_HZ:
            inband = (freqs >= lo) & (freqs < hi)
            band = inband.to(cross.dtype).unsqueeze(-1)
            cc = torch.fft.irfft(cross * band, n=self.n_fft, dim=-2)  # (..., n_fft lags, T)
            if scaled:
                cc = cc * (self.n_fft / (2.0 * inband.sum().clamp_min(1)))
            maps.append(torch.cat([cc[..., -half:, :], cc[..., :half, :]], dim=-2))
        return torch.stack(maps, dim=-3)


def peak_normalise(wave: torch.Tensor) -> torch.Tensor:
    """Scale so the loudest sample of any channel is 1 (keeps the level difference between channels)."""
    return wave / wave.abs().amax().clamp_min(1e-3)


def make_sample(frames: torch.Tensor, wave: torch.Tensor, p: SampleParams, cfg: Config) -> dict:
    """Window frames (T, H, W, 3) uint8 at cfg.data.resize and window audio (2, S) -> one training sample, whose
    "audio" is the peak-normalised waveform (2, S): the model's front end (AudioFeatures) runs on the training device.
    360 clips (data.audio_channels=4): frames (T, crop, 2 crop, 3), FOA audio (4, S), flipray.foa.transform_sample."""
    if cfg.data.audio_channels == 4:
        from flipray.foa import transform_sample
        frames, wave = transform_sample(frames, wave, p)
    elif p.joint_flip:
        frames, wave = joint_flip(frames, wave)
    if p.swap and cfg.train.task == "flip":  # the other tasks' negatives come from audio_window()
        wave = flip_channels(wave)
    width = 2 * cfg.data.crop if cfg.data.audio_channels == 4 else None
    return {"video": augment_frames(frames, p, cfg.data.crop, width),
            "audio": peak_normalise(wave).contiguous(),
            "label": torch.tensor(p.label)}


# ---------------------------------------------------------------------------------------------------------------------
# Dataset

class EpochSampler(Sampler):
    """Yields (epoch, item) pairs: this rank's share of a per-epoch permutation, from global position `start` on.

    The epoch's order is cut into steps of `step_size` positions (the global batch; default `world`, one position
    per rank); rank r takes positions [s + r*k, s + (r+1)*k) of each step s, k = step_size / world. So a step is the
    same set of samples at every world size, and a checkpoint's position (a step boundary) re-shards exactly for
    any other world size. Positions past the epoch's end are pads, yielded as item -1 - i (i a real item to decode,
    trained with weight 0), so every rank takes the same number of micro-batches (DDP) and no sample counts twice.
    Carrying the epoch in the item keeps DataLoader workers deterministic without set_epoch plumbing.
    `group` (pair_size: 2 with train.pair_negatives) shuffles items in runs of that many (items g*k .. g*k+g-1 stay
    adjacent), so with an even step size both halves of a pair land in the same optimizer step at any world size.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 start: int = 0, step_size: int | None = None, group: int = 1):
        step_size = step_size or world * group
        if step_size % world:
            raise ValueError(f"step size {step_size} is not divisible by {world} ranks")
        if n % group or step_size % group:
            raise ValueError(f"{n} items in steps of {step_size} do not split into groups of {group}")
        self.n, self.seed, self.epoch, self.shuffle, self.group = n, seed, epoch, shuffle, group
        self.rank, self.world, self.start, self.step_size = rank, world, start, step_size

    def permutation(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            units = torch.randperm(self.n // self.group, generator=g)
            return (units[:, None] * self.group + torch.arange(self.group)).flatten()
        return torch.arange(self.n)

    def order(self) -> list[int]:
        """This rank's items from `start` to the end of the epoch; pads as -1 - item."""
        perm, k = self.permutation(), self.step_size // self.world
        steps = torch.arange(self.start, self.n, self.step_size)
        pos = (steps.view(-1, 1) + self.rank * k + torch.arange(k).view(1, -1)).flatten()
        items = perm[pos % self.n]
        return torch.where(pos < self.n, items, -1 - items).tolist()

    def __iter__(self):
        for i in self.order():
            yield self.epoch, i

    def __len__(self) -> int:
        return len(range(self.start, self.n, self.step_size)) * (self.step_size // self.world)


def train_sampler(cfg: Config, n_items: int, epoch: int, start: int = 0, rank: int = 0,
                  world: int = 1) -> EpochSampler:
    """The training order every trainer (and its sample accounting) uses: steps of train.batch_size positions, the
    halves of a pair (train.pair_negatives) kept together."""
    return EpochSampler(n_items, cfg.train.seed, epoch, rank=rank, world=world, start=start,
                        step_size=cfg.train.batch_size, group=pair_size(cfg, train=True))


def check_data_root(cfg: Config) -> dict[str, int]:
    """Clips per split of data.root, or a UsageError naming it: no manifest there, or a split a trainer reads
    (train, val, test) empty. The trainers call it first, so a wrong root is one line before any worker starts, not a
    traceback after training."""
    rows = dataset_rows(cfg.data.root, "data.root")
    require_splits(rows, ("train", "val", "test"), "data.root", cfg.data.root,
                   "training needs clips in train, val and test")
    return {split: sum(r["split"] == split for r in rows) for split in ("train", "val", "test")}


class ClipDataset(Dataset):
    """One split of a dataset root (a folder, or s3://bucket/prefix through flipray.dataset.store), decoded with torchcodec.

    Train mode: item (epoch, i) is a random window of clip i with random augmentation and label.
    Eval mode: data.eval_windows fixed, unaugmented windows per clip, each as recorded and swapped (`item_params`),
    so accuracy is measured on every clip both ways.
    A clip that fails to decode is skipped and counted (`skipped`), never fatal.
    From S3, objects come through `flipray.dataset.cache.open_store` (the node-local cache when data.cache_dir is
    set), a batch's objects data.fetch_threads at a time (`__getitems__`) while its items are decoded in order.
    """

    def __init__(self, cfg: Config, split: str, train: bool, root: str | None = None, seed: int | None = None):
        self.cfg, self.train = cfg, train
        root = str(root or cfg.data.root)
        # s3://: manifest and objects come through flipray.dataset.store (and the node-local cache, if configured)
        self.store = open_store(root, cfg.data.cache_dir, cfg.data.cache_gb) if is_s3(root) else None
        self.root = root if self.store else Path(root)
        self.seed = cfg.train.seed if seed is None else seed
        self.clips = self.store.read_manifest(split) if self.store else read_manifest(self.root, split)
        if not self.clips:
            raise ValueError(f"{self.root}: no clips in split {split!r}")
        self.skipped: dict[str, str] = {}
        self._fetched: dict[str, Future] = {}  # key -> its object being fetched ahead, for the items being made
        self._decoded: dict | None = None      # (clip, frames) -> decoded window, within one batch (pairs share it)
        self._pool = None
        self.cache: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
        if cfg.data.cache:
            self._fill_cache()

    def __getstate__(self):  # DataLoader workers start with spawn: each makes its own thread pool
        return {**self.__dict__, "_pool": None, "_fetched": {}, "_decoded": None}

    def prefetch(self, objects: list[tuple[dict, str]]) -> None:
        """Start fetching the (clip, field) objects, data.fetch_threads at a time, for the `_file` calls that
        follow: decoding the first overlaps fetching the rest; a failure surfaces in `_file` for its clip only."""
        if self.store is None or self.cfg.data.fetch_threads <= 1:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cfg.data.fetch_threads, thread_name_prefix="flipray-fetch")
        keys = dict.fromkeys((c[f], c.get(f"{f}_sha256")) for c, f in objects)
        self._fetched = {key: self._pool.submit(self.store.get, key, sha) for key, sha in keys}

    def _decode(self, clip: dict, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        video, vname = self._file(clip, "video")
        pano = self.cfg.data.audio_channels == 4  # 360 clips: equirectangular frames at crop x 2*crop
        frames = decode_video(video, indices, self.cfg.data.crop if pano else self.cfg.data.resize,
                              expect_frames=clip["num_frames"], name=vname, panorama=pano)
        return frames, self._decode_audio(clip)

    def _decode_audio(self, clip: dict) -> torch.Tensor:
        audio, aname = self._file(clip, "audio")
        return decode_audio(audio, self.cfg.data.sample_rate, channels=self.cfg.data.audio_channels,
                            expect_seconds=clip["duration_s"], name=aname)

    def _file(self, clip: dict, field: str):
        """(local path, None), or for an S3 root (object bytes, URL), checked against the manifest's sha256."""
        if self.store is None:
            return self.root / clip[field], None
        try:
            ahead = self._fetched.get(clip[field])
            data = ahead.result() if ahead else self.store.get(clip[field], clip.get(f"{field}_sha256"))
            return data, self.store.url(clip[field])
        except (FileNotFoundError, ValueError) as e:  # missing or corrupt object: skip the clip like a bad decode
            raise ClipDecodeError(str(e)) from None

    def capture_groups(self) -> dict[str, str]:
        """clip_id -> capture group (binaural, spaced, coincident, phone; unknown without a sidecar), from the clips'
        sidecars: what the evaluation reports accuracy by."""
        import json

        from flipray.synth.scenes import capture_group
        out = {}
        for clip in self.clips:
            meta = None
            if clip.get("meta"):
                try:
                    raw = self.store.get(clip["meta"]) if self.store else (self.root / clip["meta"]).read_bytes()
                    meta = json.loads(raw)
                except (OSError, ValueError):
                    meta = None
            out[clip["clip_id"]] = capture_group(meta)
        return out

    def _fill_cache(self):
        from tqdm import tqdm

        def decode(clip):
            try:
                return self._decode(clip)
            except ClipDecodeError as e:
                return e

        self.cache = []
        ahead = 4 * self.cfg.data.fetch_threads
        # as many decoding threads as torch computes with (the decoders release the GIL: 1.7x on 2 cores); a 1-CPU
        # Ray worker decodes one clip at a time as before
        with ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="flipray-decode") as pool, \
                tqdm(total=len(self.clips), desc=f"decoding {len(self.clips)} clips into RAM", unit="clip",
                     leave=False) as bar:
            for i in range(0, len(self.clips), ahead):
                chunk = self.clips[i:i + ahead]
                self.prefetch([(c, f) for c in chunk for f in ("video", "audio")])
                for clip, out in zip(chunk, pool.map(decode, chunk)):
                    if isinstance(out, ClipDecodeError):
                        self._skip(clip, out)
                        out = None
                    self.cache.append(out)
                    bar.update()
        self._fetched = {}
        keep = [i for i, c in enumerate(self.cache) if c is not None]
        self.clips = [self.clips[i] for i in keep]
        self.cache = [self.cache[i] for i in keep]
        if not self.clips:
            raise ValueError(f"{self.root}: every clip failed to decode: {self.skipped}")

    def _skip(self, clip: dict, err: Exception):
        self.skipped[clip["clip_id"]] = str(err)
        log.warning("skipping clip %s: %s", clip["clip_id"], err)

    def __len__(self) -> int:
        return num_items(len(self.clips), self.cfg, self.train)

    def __getitems__(self, items: list) -> list[dict | None]:
        """A DataLoader batch: every object's request started first, then each item made exactly as __getitem__
        makes it (same order, same draws), decoding while the later objects arrive."""
        if self.cache is None and self.store is not None:
            objects = []
            for item in items:
                epoch, i = item if isinstance(item, tuple) else (0, item)
                ci, p = item_params(self.cfg, self.clips, self.seed, epoch, i, self.train)
                objects += [(self.clips[ci], "video"), (self.clips[ci], "audio"),  # _decode reads both
                            (self.clips[audio_window(self.cfg, ci, p)[0]], "audio")]  # the mismatch task's
            self.prefetch(objects)
        self._decoded = {}
        try:
            return [self[item] for item in items]
        finally:
            self._fetched, self._decoded = {}, None

    def __getitem__(self, item) -> dict | None:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        weight = 1.0
        if i < 0:  # an EpochSampler pad: a real sample (DDP needs the pass) that trains with weight 0
            i, weight = -1 - i, 0.0
        ci, p = item_params(self.cfg, self.clips, self.seed, epoch, i, self.train)
        clip = self.clips[ci]
        idx = window_frame_indices(self.cfg, p.start_frame)
        audio_ci, audio_start = audio_window(self.cfg, ci, p)
        s0, s1 = window_samples_range(self.cfg, audio_start)
        try:
            if self.cache is not None:
                frames, wave = self.cache[ci]
                frames, wave = take_frames(frames, idx), self.cache[audio_ci][1]
            else:
                key = (ci, tuple(idx))
                if self._decoded is not None and key in self._decoded:  # the other half of a pair, decoded once
                    frames, wave = self._decoded[key]
                else:
                    frames, wave = self._decode(clip, idx)
                    if self._decoded is not None:
                        self._decoded[key] = frames, wave
                if audio_ci != ci:
                    wave = self._decode_audio(self.clips[audio_ci])
        except ClipDecodeError as e:
            self._skip(clip, e)
            return None
        wave = wave[:, s0:s1]
        if wave.shape[1] < self.cfg.window_samples:  # a clip a few ms short: pad rather than drop
            wave = F.pad(wave, (0, self.cfg.window_samples - wave.shape[1]))
        sample = make_sample(frames, wave, p, self.cfg)
        sample["clip_id"] = clip["clip_id"]
        sample["start_s"] = p.start_frame / self.cfg.data.fps
        sample["item"], sample["weight"] = i, weight
        return sample


def collate(samples: list[dict | None]) -> dict:
    """Stack samples; clips that failed to decode arrive as None and are counted in `skipped`."""
    kept = [s for s in samples if s is not None]
    batch = {"skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    # default_collate stacks straight into shared memory inside a DataLoader worker, so handing the batch to the
    # training process is not a second copy (a paper-preset batch of 64 is 0.7 GB of frames)
    for k in ("video", "audio", "label"):
        batch[k] = default_collate([s[k] for s in kept])
    batch["clip_id"] = [s["clip_id"] for s in kept]
    batch["start_s"] = torch.tensor([s["start_s"] for s in kept])
    batch["item"] = torch.tensor([s.get("item", -1) for s in kept])   # dataset item: what sample accounting records
    batch["weight"] = torch.tensor([float(s.get("weight", 1.0)) for s in kept])  # 0 = a pad (trains nothing)
    return batch
