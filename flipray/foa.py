"""First-order ambisonics (FOA) and equirectangular panoramas: the conventions of 360-degree clips, in code.

    python -c "from flipray import foa; import numpy as np; w = foa.encode(np.random.randn(16000), 30.0); \
               print(foa.intensity_doa(foa.rotate_foa(w, 90.0), 16000))"      # -> about (120.0, 0.0)

Conventions (the TAU / DCASE spatial sound data use the same):
  - azimuth in degrees, counter-clockwise seen from above, 0 = front, +90 = LEFT, -90 = right, +-180 = behind;
    elevation in degrees, +90 = up. (Stereo clips in flipray use the opposite sign: positive = right.)
  - channels in ACN order W, Y, Z, X with SN3D normalisation: a plane wave s(t) from (azimuth a, elevation e) is
        W = s,  Y = s sin(a) cos(e),  Z = s sin(e),  X = s cos(a) cos(e)
    (Y points left, Z up, X to the front. The paper's Sec. 6 calls Y front-back and X left-right; its rotation
    formula is the same either way.)
  - equirectangular panorama, W x H pixels (W = 2H): the centre column looks to the front, azimuth grows to the LEFT
    (column 0 is behind, +180), so column x (pixel centre at x + 0.5) sees azimuth 180 - 360 (x + 0.5) / W, and row y
    sees elevation 90 - 180 (y + 0.5) / H. A panorama viewed from inside the sphere looks like a normal photo: what
    is on the left of the picture is on the listener's left.

Rotating the scene about the vertical axis by theta (counter-clockwise, so a source at a moves to a + theta):
  - sound field (the paper's negative): W and Z unchanged, X' = X cos(theta) - Y sin(theta),
    Y' = X sin(theta) + Y cos(theta)                                                           `rotate_foa`
  - picture: the panorama rolled by -theta W / 360 columns (content moves left as theta grows)  `roll_panorama`
Doing both keeps the audio-visual alignment (the rotate task's joint augmentation); mirroring the panorama
left-right together with Y -> -Y does too (`mirror_foa`).

The active intensity vector I = Re{conj(W) [X, Y, Z]} points towards the source; averaged over time-frequency bins
it gives the classical, non-learned direction-of-arrival estimate (`intensity_doa`), and mel-projected and normalised
per bin it gives three extra network input channels (`intensity_features`, as Cao et al. 2019 use for DCASE): log-mel
magnitudes alone lose the signs of X and Y, so they cannot tell a from -a or 180 - a, nor a 180-degree rotation from
none.
"""
from __future__ import annotations

import math

import numpy as np
import torch

CHANNELS = ("W", "Y", "Z", "X")  # ACN order
CONVENTIONS = ("azimuth deg counter-clockwise from the front, 90 = left (TAU/DCASE); elevation deg, 90 = up; "
               "audio ACN order W,Y,Z,X, SN3D; equirectangular frames: centre column = front, azimuth grows to the "
               "left, column x sees 180 - 360 (x + 0.5) / width; boxes [x0, y0, x1, y1] in pixels, x1 may exceed "
               "the width when a box wraps around the seam")


def wrap_deg(a):
    """Angles folded into [-180, 180) degrees (numpy arrays, tensors or floats)."""
    return (a + 180.0) % 360.0 - 180.0


def angular_error(a, b):
    """|a - b| on the circle, in [0, 180] degrees (numpy or torch)."""
    return abs(wrap_deg(a - b))


# ---------------------------------------------------------------------------------------------------------------------
# Encoding and rotation

def direction_gains(azimuth_deg, elevation_deg=0.0) -> np.ndarray:
    """SN3D gains (4, ...) of W, Y, Z, X for directions (azimuth counter-clockwise, 90 = left; elevation up)."""
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    a, e = np.broadcast_arrays(a, e)
    return np.stack([np.ones_like(a), np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])


def encode(mono, azimuth_deg, elevation_deg=0.0) -> np.ndarray:
    """FOA (4, n) in ACN/SN3D of a mono signal (n,) arriving from (azimuth, elevation) degrees.

    Directions are scalars, or arrays of n values (one per sample: a moving source), azimuth counter-clockwise
    from the front (90 = left)."""
    mono = np.asarray(mono, dtype=float)
    gains = direction_gains(azimuth_deg, elevation_deg)
    return (gains[:, None] if gains.ndim == 1 else gains) * mono


def _rotation(theta_deg):
    t = math.radians(float(theta_deg))
    return math.cos(t), math.sin(t)


def rotate_foa(wave, theta_deg: float):
    """The sound field (..., 4, S) in ACN order (W, Y, Z, X) rotated counter-clockwise by theta about the vertical
    axis, so a source at azimuth a is heard at a + theta (90 = left): W and Z unchanged,
    X' = X cos(theta) - Y sin(theta), Y' = X sin(theta) + Y cos(theta) (the paper's Sec. 6 transform).
    numpy arrays or torch tensors; rotate_foa(rotate_foa(w, t), -t) == w."""
    if wave.shape[-2] != 4:
        raise ValueError(f"rotate_foa needs FOA audio with 4 channels (W, Y, Z, X) on axis -2, got shape "
                         f"{tuple(wave.shape)}")
    c, s = _rotation(theta_deg)
    w, y, z, x = (wave[..., i, :] for i in range(4))
    out = [w, x * s + y * c, z, x * c - y * s]
    return torch.stack(out, dim=-2) if isinstance(wave, torch.Tensor) else np.stack(out, axis=-2)


def mirror_foa(wave):
    """The sound field mirrored left-right (azimuth a -> -a): Y -> -Y. Pairs with flipping the panorama's columns."""
    if wave.shape[-2] != 4:
        raise ValueError(f"mirror_foa needs FOA audio with 4 channels (W, Y, Z, X), got shape {tuple(wave.shape)}")
    sign = [1.0, -1.0, 1.0, 1.0]
    if isinstance(wave, torch.Tensor):
        return wave * torch.tensor(sign, dtype=wave.dtype, device=wave.device)[:, None]
    return wave * np.array(sign)[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# Equirectangular panoramas

def panorama_column(azimuth_deg, width: int):
    """Column (float, pixel centres at .5) of an equirectangular panorama `width` wide that sees `azimuth_deg`
    (counter-clockwise, 90 = left): the centre column is the front and azimuth grows to the left. In [0, width)."""
    return ((0.5 - np.asarray(azimuth_deg) / 360.0) * width) % width


def panorama_row(elevation_deg, height: int):
    """Row (float) of an equirectangular panorama `height` high that sees `elevation_deg` (90 = up, row 0)."""
    return (0.5 - np.asarray(elevation_deg) / 180.0) * height


def column_azimuth(x, width: int):
    """Azimuth (deg, counter-clockwise, in [-180, 180)) seen at column position x (column c's centre: c + 0.5)."""
    return wrap_deg(180.0 - 360.0 * np.asarray(x, dtype=float) / width)


def roll_pixels(theta_deg: float, width: int) -> int:
    """Columns torch.roll must shift a panorama by to rotate the scene by theta (counter-clockwise): -theta W / 360.
    theta must be a whole number of columns (360 / width degrees each)."""
    shift = -theta_deg * width / 360.0
    if abs(shift - round(shift)) > 1e-6:
        raise ValueError(f"a rotation of {theta_deg} deg is not a whole number of columns of a {width}-px panorama "
                         f"({360 / width:.4g} deg each)")
    return int(round(shift)) % width


def roll_panorama(frames, theta_deg: float, width_axis: int = -2):
    """Frames of an equirectangular panorama with the scene rotated counter-clockwise by theta about the vertical
    axis: what was seen at azimuth a is seen at a + theta, matching rotate_foa(wave, theta). `width_axis` is -2 for
    uint8 (..., H, W, 3) frames and -1 for float (..., 3, H, W)."""
    shift = roll_pixels(theta_deg, frames.shape[width_axis])
    if isinstance(frames, torch.Tensor):
        return torch.roll(frames, shifts=shift, dims=width_axis)
    return np.roll(frames, shift, axis=width_axis)


def resize_panorama(frames: torch.Tensor, height: int | None) -> torch.Tensor:
    """uint8 (N, H, W, 3) equirectangular frames resized (antialiased bilinear) to height x 2 height, never cropped:
    a crop would cut directions out of the sphere. The horizontal seam wraps, so the resize pads circularly."""
    n, h, w, _ = frames.shape
    if height is None or (h == height and w == 2 * height):
        return frames.contiguous()
    x = frames.permute(0, 3, 1, 2).float()
    pad = max(w // 32, 2)  # antialiasing reads a few columns across the seam
    x = torch.cat([x[..., -pad:], x, x[..., :pad]], dim=-1)
    x = torch.nn.functional.interpolate(x, size=(height, 2 * height + round(2 * pad * 2 * height / w)),
                                        mode="bilinear", antialias=True, align_corners=False)
    p = (x.shape[-1] - 2 * height) // 2
    x = x[..., p:p + 2 * height]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Active intensity vector

def _stft(wave: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    window = torch.hann_window(win, device=wave.device, dtype=wave.dtype)
    return torch.stft(wave.reshape(-1, wave.shape[-1]), n_fft, hop, win, window=window, center=True,
                      return_complex=True).reshape(*wave.shape[:-1], n_fft // 2 + 1, -1)


def intensity(wave, n_fft: int = 512, hop: int = 160, win: int = 400) -> torch.Tensor:
    """Active intensity (..., 3, F, T) per STFT bin, components in ACN order (Y, Z, X): Re{conj(W) [Y, Z, X]} of a
    (..., 4, S) FOA wave (numpy or torch). Points towards the source (for SN3D, |I| = |W|^2 for a plane wave)."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.shape[-2] != 4:
        raise ValueError(f"intensity needs FOA audio with 4 channels (W, Y, Z, X), got shape {tuple(wave.shape)}")
    spec = _stft(wave, n_fft, hop, win)
    return (spec[..., :1, :, :].conj() * spec[..., 1:, :, :]).real


def intensity_doa(wave, sample_rate: int = 16000, n_fft: int = 512, hop: int = 160, win: int = 400,
                  band_hz: tuple = (100.0, 7000.0)) -> tuple[float, float]:
    """Classical DOA of a (4, S) FOA wave: (azimuth, elevation) in degrees (azimuth counter-clockwise, 90 = left)
    of the active intensity vector summed over all frames and the bins in `band_hz` (energy-weighted). One dominant
    source; diffuse reverberation and noise average out, early reflections bias it a little."""
    inten = intensity(wave, n_fft, hop, win)
    freqs = torch.fft.rfftfreq(n_fft, 1 / sample_rate)
    keep = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    iy, iz, ix = inten[..., keep, :].sum(dim=(-1, -2)).double().unbind(-1)
    return math.degrees(math.atan2(iy, ix)), math.degrees(math.atan2(iz, math.hypot(ix, iy)))


def intensity_features(wave: torch.Tensor, mel_fb: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """Three network input channels (..., 3, n_mels, T) in ACN order (Y, Z, X): the active intensity vector per
    STFT bin divided by the bin's energy (|W|^2 + |Y|^2 + |Z|^2 + |X|^2, so a plane wave gives its unit direction
    / 2), projected on the mel filterbank `mel_fb` (n_freqs, n_mels) normalised to unit sum per band.
    Rotating the sound field rotates these (unlike log-mel magnitudes, which lose the signs)."""
    spec = _stft(wave, n_fft, hop, win)
    inten = (spec[..., :1, :, :].conj() * spec[..., 1:, :, :]).real
    energy = spec.abs().pow(2).sum(dim=-3, keepdim=True)
    iv = inten / (energy + 1e-8 * energy.amax(dim=(-1, -2, -3), keepdim=True).clamp_min(1e-12))
    fb = mel_fb / mel_fb.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.einsum("...ft,fm->...mt", iv, fb.to(iv.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Samples of 360-degree clips (flipray.pretext.data.make_sample calls this when data.audio_channels = 4)

def transform_sample(frames, wave, p):
    """One window of a 360 clip as the sample parameters `p` (flipray.pretext.data.SampleParams) say: uint8 frames
    (T, H, 2H, 3) and FOA wave (4, S) -> the same. Joint augmentations keep the alignment: mirror the panorama AND
    negate Y (p.joint_flip), roll the panorama AND rotate the sound field by p.roll_deg. The rotate task's negative
    (label 1) then rotates the sound field alone by p.rotation_deg, the picture untouched."""
    if p.joint_flip:
        frames, wave = frames.flip(-2), mirror_foa(wave)
    if p.roll_deg:
        frames, wave = roll_panorama(frames, p.roll_deg, width_axis=-2), rotate_foa(wave, p.roll_deg)
    if p.rotation_deg:
        wave = rotate_foa(wave, p.rotation_deg)
    return frames, wave
