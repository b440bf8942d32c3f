"""Synthetic spatial audio-visual scenes: training data for the flip task without downloading anything.

    flipray synth --out data/synth --clips 1000 --seed 0            # 10-s clips, 6 fps, 256x256, all cores
    python -m flipray.synth.scenes --out data/synth --clips 1000 --seed 0  # the same without the CLI dispatcher

A scene is a procedural background plus a set of objects: one or two sounding objects (6 classes, each with its own
look and its own sound family) and a few silent distractors (mostly silent-only classes, sometimes look-alikes of
sounding classes, so that the network has to match the sound to the object; `--novel-look-prob 1` gives every object a
random look instead, for held-out sets of objects never seen; `--novel-sound-prob 1` gives every sounding object a
sound family no class has, for sounds never heard; `--sync-pulse F` makes sounding objects grow with their sound;
`--clutter-prob 1` paints static things into every backdrop; `--head-detail-prob 1` gives binaural heads pinna notches
and a measured head's low-frequency time difference; `--width` renders wide frames). Each scene yields
--clips-per-scene clips with new motion and sound draws; objects stand still or move left-right, up-down or
diagonally, bouncing off the frame edges. The audio is what a listener at the camera hears: every sounding object's
sound rendered with both cues of the clip's capture setup (one per clip, `--mics`: binaural heads of several sizes and
ear asymmetries with Woodworth ITD and Brown-Duda head shadow, spaced omni pairs, near-coincident cardioid pairs,
coincident XY/MS pairs, two-mic phones; render_capture) from where the camera sees it, block by block so moving
sources move, plus optional room reverb (early reflections as random taps, or with `--reflections image-source` a
shoebox room's first-order reflections heard from their directions), diffuse background noise and a lossy AAC round
trip. Room, microphones, spectra, levels, SNR and field of view are randomised so that a model trained here has a
chance on real recordings.

Files (docs/clip-format.md): clips/<clip_id>.webm (VP9, keyframe every second), clips/<clip_id>.flac (16 kHz,
16-bit, channel 0 = left), clips/<clip_id>.json (per-frame ground truth) and manifest.jsonl, written last.

Geometry: the camera is a pinhole at the listener's head looking straight ahead, with a horizontal field of view hfov
drawn per scene, so its focal length is f = (W/2) / tan(hfov/2) pixels. A pixel (x, y) is seen at
    azimuth   = atan((x - W/2) / f) = atan((x - W/2)/(W/2) * tan(hfov/2))    positive = listener's right
    elevation = atan((H/2 - y) / hypot(f, x - W/2))                          positive = up
Video frame i shows time i / fps.

Determinism: scene s draws from np.random.default_rng([seed, s]) and its clip k from default_rng([seed, s, k]), so
one seed gives byte-identical FLACs and identical sidecars whatever --workers is (and, with this machine's ffmpeg,
byte-identical webm files too: single-threaded encoding, bitexact muxing).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom
from scipy.signal import fftconvolve, lfilter
from tqdm import tqdm

from flipray import media, overrides
from flipray.atomic import write_bytes
from flipray.overrides import UsageError
from flipray.dataset.manifest import MANIFEST_NAME, assign_splits, manifest_lock, read_manifest, write_manifest


@dataclass
class SynthConfig:
    """Every knob of the generator; (lo, hi) pairs are uniform ranges drawn per scene or per clip."""
    # clip format (docs/clip-format.md)
    duration_s: float = 10.0
    fps: int = 6                       # the paper's frame rate; 30 also works
    size: int = 256                    # frame height, and width unless `width` says otherwise (pixels, even: yuv420p)
    width: int = 0                     # frame width; 0 = size (square, as ingest stores video); e.g. 456 at 256
                                       # for 16:9 held-out sets (flipray check --frame-fit on wide video)
    sample_rate: int = 16000
    clips_per_scene: int = 2           # clips sharing a background and object set; splits are by scene
    # camera and objects
    hfov_deg: tuple = (50.0, 100.0)    # horizontal field of view, per scene
    two_source_prob: float = 0.25      # scenes with two sounding objects (of different classes) instead of one
    max_distractors: int = 2           # silent objects per scene: 0..max, each count half as likely as the one before
    lookalike_prob: float = 0.2        # a distractor looks like a sounding class (and stays silent)
    novel_look_prob: float = 0.0       # an object gets a random shape, colour and pattern instead of its class's
                                       # look (a bell is a yellow ringed circle); scenes and audio stay the same.
                                       # 1.0: held-out sets of objects never seen
    novel_sound_prob: float = 0.0      # a sounding object's sound comes from a family no class has (NOVEL_FAMILIES:
                                       # plucked strings, drums, chirps, applause) instead of its class's; pictures and
                                       # every other draw stay the same. 1.0: held-out sets of sounds never heard
    sync_pulse: float = 0.0            # a sounding object's picture grows by up to this fraction of its size with its
                                       # sound's loudness per frame (as mouths, strings and cones move with their
                                       # sound), so that which object sounds can be seen, not only guessed from its
                                       # look; silent objects keep their size. Audio is the same whatever its value
    clutter_prob: float = 0.0          # the backdrop gets 4-12 static things painted into it at full contrast
                                       # (random shapes, colours and patterns, 15-110 px at 256: furniture, posters),
                                       # as real rooms have; other draws stay the same. 1.0: held-out sets of
                                       # cluttered scenes
    head_detail_prob: float = 0.0      # a binaural head gets what measured heads have and a sphere lacks: a low-
                                       # frequency time difference 1.2-1.6x Woodworth's, pinna notches that move with
                                       # the direction, and an uneven response per ear (draw_head_detail); other draws
                                       # stay the same. 1.0: held-out sets of heads unlike flipray's sphere
    object_px: tuple = (30, 70)        # object width at size 256, scaled with --size; height = width * 0.8-1.25
    motion_probs: tuple = (0.4, 0.3, 0.1, 0.2)  # static, left-right, up-down, diagonal
    crossing_time_s: tuple = (2.5, 8.0)  # a moving object travels one frame width in this time
    min_offcentre_deg: float = 8.0     # static / up-down sounding objects keep |azimuth| >= this: left/right decidable
    # sound: per clip one capture setup drawn (uniformly) from `mics` (MIC_TYPES; render_capture has the physics)
    mics: tuple = ("binaural", "spaced", "near-coincident", "coincident", "phone")
    head_radius_m: tuple = (0.07, 0.10)  # binaural heads, per clip; 0.0875 m is the average adult head
    ear_offset_deg: tuple = (0.0, 12.0)  # binaural: each ear set back from +-90 deg by this (independently: asymmetry)
    ear_gain_db: tuple = (-1.5, 1.5)     # binaural and pairs: per-capsule sensitivity mismatch
    spaced_m: tuple = (0.10, 0.60)       # spaced omni pairs (A-B)
    near_coincident_m: tuple = (0.10, 0.30)  # near-coincident cardioid pairs (ORTF 0.17 m at +-55 deg)
    near_coincident_deg: tuple = (40.0, 65.0)  # half the angle between the capsules' axes
    coincident_deg: tuple = (35.0, 68.0)  # XY: half-angle of a coincident cardioid pair (level differences only)
    ms_width: tuple = (0.4, 1.0)          # MS: side gain against a cardioid mid (decoded L = M + wS, R = M - wS)
    phone_m: tuple = (0.02, 0.16)        # two-mic phones / small arrays: omni capsules this far apart
    source_level_db: tuple = (-10.0, 0.0)  # per sounding object, before peak normalisation
    spectral_tilt_db_per_octave: tuple = (-3.0, 3.0)  # random brightness of each source around 1 kHz
    reverb_prob: float = 0.7
    rt60_s: tuple = (0.1, 0.6)         # low-frequency RT60; at 8 kHz it is 30-80% of this (absorption)
    drr_db: tuple = (3.0, 15.0)        # direct-to-reverberant energy ratio: > 0 keeps the interaural cues audible
    reflections: str = "diffuse"       # early reflections: "diffuse" (a few random taps per ear, no direction) or
                                       # "image-source" (the six first-order reflections of a shoebox room, each heard
                                       # through the clip's microphones from its own direction, as real rooms send
                                       # them); the late tail is diffuse either way
    wall_reflection: tuple = (0.5, 0.9)  # image-source: pressure reflection coefficient of the walls, per room
    source_distance_m: tuple = (1.0, 4.0)  # image-source: distance from the camera to each sounding object
    noise: bool = True                 # diffuse background noise
    snr_db: tuple = (10.0, 35.0)
    lossy_audio_prob: float = 0.0      # AAC round trip, as web video audio has been
    aac_kbps: tuple = (48, 64, 96, 128)  # bitrates the round trip picks from
    peak: tuple = (0.5, 0.95)          # final peak level: nothing clips, loudness varies

    def __post_init__(self):
        if self.duration_s < 1 or self.fps <= 0 or self.clips_per_scene < 1 or self.max_distractors < 0:
            raise UsageError("duration_s must be >= 1 (sounds need room for a few events), fps positive, "
                             "clips_per_scene >= 1, max_distractors >= 0")
        if not 0 <= self.sync_pulse <= 1:
            raise UsageError(f"sync_pulse must be a fraction of the object's size in [0, 1], got {self.sync_pulse}")
        if self.size < 64 or self.size % 2:
            raise UsageError(f"size must be an even number of pixels >= 64 (yuv420p, objects of 30-70 px at 256), "
                             f"got {self.size}")
        if self.width and (self.width < self.size or self.width % 2):
            raise UsageError(f"width must be 0 (square) or an even number of pixels >= size ({self.size}), "
                             f"got {self.width}")
        if self.reflections not in REFLECTIONS:
            raise UsageError(f"reflections must be one of {', '.join(REFLECTIONS)}, got {self.reflections!r}")
        for name in ("two_source_prob", "lookalike_prob", "novel_look_prob", "novel_sound_prob", "clutter_prob",
                     "head_detail_prob", "reverb_prob", "lossy_audio_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} must be a probability, got {getattr(self, name)}")
        self.mics = tuple(self.mics)
        bad = [m for m in self.mics if m not in MIC_TYPES]
        if not self.mics or bad:
            raise UsageError(f"mics must be a non-empty subset of {', '.join(MIC_TYPES)}; got {', '.join(bad) or 'none'}")


# Sounding classes: class -> (sound family, look = (shape, RGB colour, pattern)). Silent classes have no family.
SOUNDING_CLASSES = {
    "bell":    ("tonal",   ("circle",   (235, 185, 35),  "rings")),
    "shaker":  ("noise",   ("square",   (215, 45, 45),   "stripes")),
    "tapper":  ("clicks",  ("diamond",  (40, 85, 225),   "checker")),
    "talker":  ("speech",  ("circle",   (240, 170, 130), "face")),
    "buzzer":  ("buzz",    ("triangle", (45, 185, 65),   "dots")),
    "whistle": ("whistle", ("cross",    (185, 60, 215),  "solid")),
}
SILENT_CLASSES = {
    "rock":  (None, ("circle", (125, 125, 125), "speckle")),
    "crate": (None, ("square", (135, 95, 55),   "frame")),
    "hoop":  (None, ("ring",   (40, 170, 170),  "solid")),
}
MOTIONS = ("static", "left-right", "up-down", "diagonal")

# Shapes in box coordinates u, v in [-1, 1] (v points down) and patterns as brightness multipliers.
SHAPES = {
    "circle":   lambda u, v: u ** 2 + v ** 2 <= 1,
    "square":   lambda u, v: np.maximum(abs(u), abs(v)) <= 0.92,
    "diamond":  lambda u, v: abs(u) + abs(v) <= 1,
    "triangle": lambda u, v: (v <= 0.9) & (abs(u) <= (v + 1) / 2),
    "cross":    lambda u, v: (np.maximum(abs(u), abs(v)) <= 1) & (np.minimum(abs(u), abs(v)) <= 0.34),
    "ring":     lambda u, v: (u ** 2 + v ** 2 <= 1) & (u ** 2 + v ** 2 >= 0.3),
}
PATTERNS = {
    "solid":   lambda u, v, rng: np.ones_like(u),
    "stripes": lambda u, v, rng: np.where(np.sin(3 * np.pi * (u + v)) > 0, 1.0, 0.55),
    "checker": lambda u, v, rng: np.where((np.floor(2 * u + 2) + np.floor(2 * v + 2)) % 2 == 0, 1.0, 0.5),
    "rings":   lambda u, v, rng: np.where(np.sin(3 * np.pi * np.hypot(u, v)) > 0, 1.0, 0.6),
    "dots":    lambda u, v, rng: np.where(((2.5 * u) % 1 - 0.5) ** 2 + ((2.5 * v) % 1 - 0.5) ** 2 < 0.06, 1.6, 1.0),
    "face":    lambda u, v, rng: np.where(((abs(u) - 0.35) ** 2 + (v + 0.25) ** 2 < 0.02)  # eyes
                                          | ((abs(u) < 0.4) & (abs(v - 0.4) < 0.07)), 0.2, 1.0),  # mouth
    "speckle": lambda u, v, rng: rng.uniform(0.7, 1.15, u.shape),
    "frame":   lambda u, v, rng: np.where((np.maximum(abs(u), abs(v)) > 0.62) | (abs(v) % 0.4 < 0.06), 0.6, 1.0),
}

REFLECTIONS = ("diffuse", "image-source")
IMAGE_SOURCE_STREAM = 104_729  # reflections="image-source": the room's draws, default_rng([seed, scene, k, this]), so
                               # that every other draw of the clip is the same whichever reflections it has
NOVEL_SOUND_STREAM = 15_485_863  # novel_sound_prob: whether and what object i sounds like, default_rng([seed,
                                 # scene, k, this, i])
NOVEL_LOOK_STREAM = 7_919  # novel_look_prob: whether and how object i looks new, default_rng([seed, scene, this, i])
CLUTTER_STREAM = 6_700_417  # clutter_prob: whether and what the backdrop holds, default_rng([seed, scene, this])
HEAD_DETAIL_STREAM = 3_571  # head_detail_prob: whether and how clip k's head departs from the sphere,
                            # default_rng([seed, scene, k, this])
# Knobs added after datasets were made, at the value that renders exactly what those datasets hold (their draws come
# from streams of their own): a sidecar without one was made with this value, so `flipray synth` keeps its clips.
ADDED_LATER = {"clutter_prob": 0.0, "head_detail_prob": 0.0}

# Block processing for time-varying filters: Hann blocks of 32 ms every 16 ms, zero-padded to twice their length.
BLOCK, HOP, NFFT = 512, 256, 1024
WINDOW = np.hanning(BLOCK + 1)[:BLOCK]  # periodic Hann: shifted copies at 50% overlap sum to exactly one
ALPHA_MIN, THETA_MIN_DEG = 0.1, 150.0  # Brown & Duda (1998) head-shadow constants


# ----------------------------------------------------------------------------------------------------------------------
# Binaural rendering

def filter_blockwise(x, H):
    """Filter x (n,) with a frequency response that changes every HOP samples.

    H: (..., n // HOP + 2, NFFT // 2 + 1) complex, block b centred on sample b * HOP; leading dims (e.g. ears) are kept.
    Windowed blocks overlap-add back to x, and the zero padding keeps delays and short filter tails from wrapping
    around, so a constant H is plain linear filtering and a changing one crossfades smoothly.
    """
    n = len(x)
    nb = n // HOP + 2
    padded = np.zeros((nb + 1) * HOP)
    padded[HOP:HOP + n] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, BLOCK)[::HOP] * WINDOW  # (nb, BLOCK)
    Y = np.fft.irfft(np.fft.rfft(frames, NFFT) * H, NFFT)  # (..., nb, NFFT)
    out = np.zeros(Y.shape[:-2] + (nb + NFFT // HOP - 1, HOP))
    for k in range(NFFT // HOP):  # overlap-add, one HOP-long quarter of every block at a time
        out[..., k:k + nb, :] += Y[..., k * HOP:(k + 1) * HOP]
    return out.reshape(Y.shape[:-2] + (-1,))[..., HOP:HOP + n]


def _per_block(values, n):
    """Scalar, or values spaced evenly over n samples (value i at sample i * n / len), at the block centres."""
    values = np.atleast_1d(np.asarray(values, dtype=float))
    return np.interp(np.arange(n // HOP + 2) * HOP, np.arange(len(values)) * (n / len(values)), values)


def render_binaural(mono, azimuth_deg, sr=16000, head_radius_m=0.0875, elevation_deg=0.0, speed_of_sound=343.0,
                    ear_offset_deg=(0.0, 0.0), detail: dict | None = None):
    """Stereo (2, n), channel 0 = left, of `mono` heard by a spherical head from the given direction.

    azimuth_deg (positive = listener's right) and elevation_deg: scalars, or arrays spread evenly over the signal
    (one per sample, one per video frame, ...), followed block by block (16 ms), so moving sources move.
    Both interaural cues, per block:
      ITD: Woodworth, tau = r/c (theta + sin theta) with theta the lateral angle off the median plane; the far ear is
           delayed by tau (a fractional delay, applied as a phase shift).
      ILD: Brown-Duda head shadow per ear, H(w) = (1 + j alpha w / 2w0) / (1 + j w / 2w0), w0 = c / r, with
           alpha = (1 + a_min/2) + (1 - a_min/2) cos(phi / 150 deg * 180 deg) for phi the angle between the source and
           that ear: up to +6 dB at high frequencies for the near ear, down to -20 dB for the far one.
    ear_offset_deg (left, right): each ear set back from +-90 deg by this much (real heads: ~5-10 deg, not
    symmetric), which moves its shadow (for sources in front, as the camera sees them).
    detail (draw_head_detail's dict, or None for the sphere alone) adds, per ear, what measured heads have:
      lf_itd_gain      the delay grows towards low frequencies, tau(f) = tau (1 + (g - 1) / (1 + (f / 1.5 kHz)^2)):
                       g x Woodworth's below ~1 kHz (Kuhn's low-frequency limit is 1.5x)
      notches          pinna notches [(f at the ear's axis in Hz, Hz per degree off it, depth dB, Q)], their
                       frequency moving with the source's angle to that ear
      ripple_db        a fixed response per ear (ear canal, capsule): [ear][dB at 8 bands spaced in log frequency]
    """
    n = len(mono)
    az, el = np.radians(_per_block(azimuth_deg, n)), np.radians(_per_block(elevation_deg, n))
    lateral = np.arcsin(np.clip(np.sin(az) * np.cos(el), -1, 1))  # angle off the median plane, + = right
    itd = head_radius_m / speed_of_sound * (np.abs(lateral) + np.sin(np.abs(lateral)))
    ears = np.array([[-1.0], [1.0]])  # left ear axis at lateral -90 deg, right at +90
    offset = np.asarray(ear_offset_deg, dtype=float)[:, None]
    phi = np.minimum(np.degrees(np.pi / 2 - ears * lateral) + offset, 180.0)  # (2, nb): 0 = facing that ear
    alpha = (1 + ALPHA_MIN / 2) + (1 - ALPHA_MIN / 2) * np.cos(np.radians(phi / THETA_MIN_DEG * 180))
    delay = np.where(ears * lateral < 0, itd, 0.0)  # the far ear hears it later
    f = np.fft.rfftfreq(NFFT, 1 / sr)
    w = 2 * np.pi * f
    x = w / (2 * speed_of_sound / head_radius_m)
    delay = delay[..., None]  # (2, nb, 1)
    if detail:
        delay = delay * (1 + (detail["lf_itd_gain"] - 1) / (1 + (f / 1500.0) ** 2))
    H = (1 + 1j * alpha[..., None] * x) / (1 + 1j * x) * np.exp(-1j * w * delay)
    if detail:
        H = H * _ear_response(detail, phi, f)
    return filter_blockwise(mono, H)


def _ear_response(detail: dict, phi_deg, f):
    """(2, nb, F) real gains of render_binaural's `detail` for each ear at angle phi_deg (2, nb) to the source."""
    log_f = np.log2(np.maximum(f, 50.0))
    bands = np.linspace(np.log2(100.0), np.log2(8000.0), 8)
    ripple = np.stack([np.interp(log_f, bands, ear) for ear in np.asarray(detail["ripple_db"], dtype=float)])
    gain_db = np.broadcast_to(ripple[:, None, :], phi_deg.shape + f.shape).copy()
    for ear, notches in enumerate(detail["notches"]):
        for f0, slope, depth_db, q in notches:
            centre = np.clip(f0 + slope * (phi_deg[ear] - 90.0), 2000.0, 7800.0)[:, None]  # (nb, 1)
            # a resonance-shaped dip: depth_db at the centre, half of it at centre +- centre / (2 q)
            gain_db[ear] -= depth_db / (1 + (2 * q * (f - centre) / centre) ** 2)
    return 10 ** (gain_db / 20)


def draw_head_detail(rng) -> dict:
    """A head's departures from the sphere (render_binaural's `detail`), drawn per clip: measured heads' low-frequency
    time difference is 1.2-1.6x the Woodworth one; each ear has two notches 6-18 dB deep, at 4-7 kHz for a source on
    the ear's axis and moving by up to 20 Hz per degree away from it (within 2-7.8 kHz), and a response uneven by up
    to 3 dB."""
    return {"lf_itd_gain": round(float(rng.uniform(1.2, 1.6)), 3),
            "notches": [[[round(float(rng.uniform(4000, 7000)), 1), round(float(rng.uniform(-20, 20)), 2),
                          round(float(rng.uniform(6, 18)), 2), round(float(rng.uniform(2, 6)), 2)] for _ in range(2)]
                        for _ear in range(2)],
            "ripple_db": [[round(float(v), 2) for v in rng.uniform(-3, 3, 8)] for _ear in range(2)]}


# ----------------------------------------------------------------------------------------------------------------------
# Capture setups: the microphones a clip is recorded with

MIC_TYPES = ("binaural", "spaced", "near-coincident", "coincident", "phone")
# what `flipray check` and the evaluation report group by: the near-coincident pair is a spaced pair of directional
# capsules (time and level), XY and MS are coincident (level only)
CAPTURE_GROUP = {"binaural": "binaural", "spaced": "spaced", "near-coincident": "spaced", "coincident": "coincident",
                 "phone": "phone"}


def capture_group(meta: dict | None) -> str:
    """binaural | spaced | coincident | phone | unknown: the capture group of a clip's sidecar (clips rendered before
    capture setups existed had a binaural head)."""
    render = (meta or {}).get("render") or {}
    if "capture" in render:
        return CAPTURE_GROUP.get(render["capture"].get("type"), "unknown")
    return "binaural" if render.get("head_radius_m") else "unknown"


def draw_capture(rng, cfg: SynthConfig) -> dict:
    """One capture setup and its parameters, drawn from cfg.mics: what the sidecar records under render.capture."""
    kind = str(rng.choice(cfg.mics))
    gains = [round(float(g), 2) for g in rng.uniform(*cfg.ear_gain_db, 2)]
    if kind == "binaural":
        return {"type": kind, "head_radius_m": round(float(rng.uniform(*cfg.head_radius_m)), 4),
                "ear_offset_deg": [round(float(o), 2) for o in rng.uniform(*cfg.ear_offset_deg, 2)], "gain_db": gains}
    if kind == "spaced":
        return {"type": kind, "spacing_m": round(float(rng.uniform(*cfg.spaced_m)), 3), "pattern": "omni",
                "gain_db": gains}
    if kind == "near-coincident":
        return {"type": kind, "spacing_m": round(float(rng.uniform(*cfg.near_coincident_m)), 3),
                "pattern": "cardioid", "angle_deg": round(float(rng.uniform(*cfg.near_coincident_deg)), 1),
                "gain_db": gains}
    if kind == "coincident":
        if rng.random() < 0.5:
            return {"type": kind, "layout": "xy", "pattern": "cardioid", "spacing_m": 0.0,
                    "angle_deg": round(float(rng.uniform(*cfg.coincident_deg)), 1), "gain_db": gains}
        return {"type": kind, "layout": "ms", "pattern": "cardioid+figure-8", "spacing_m": 0.0,
                "ms_width": round(float(rng.uniform(*cfg.ms_width)), 3), "gain_db": gains}
    return {"type": "phone", "spacing_m": round(float(rng.uniform(*cfg.phone_m)), 3), "pattern": "omni",
            "gain_db": gains}


def _cardioid(az, el, axis_deg):
    """First-order cardioid gain 0.5 + 0.5 cos(angle between the source and a horizontal capsule axis)."""
    return 0.5 + 0.5 * np.cos(el) * np.cos(az - np.radians(axis_deg))


def render_capture(mono, azimuth_deg, sr=16000, capture: dict | None = None, elevation_deg=0.0,
                   speed_of_sound=343.0):
    """Stereo (2, n), channel 0 = left, of a far-field source heard by the capture setup `capture` (draw_capture's
    dict; a default binaural head when None). Directions as render_binaural's (positive azimuth = right), followed
    block by block. Physics per type:
      binaural         render_binaural: Woodworth ITD + Brown-Duda head shadow, ears set back by ear_offset_deg,
                       and the head's `detail` if it has one
      spaced / phone   omni capsules spacing_m apart on the left-right axis: time of flight only, the capsule on
                       the source's side hears it d sin(lateral) / c earlier; no level difference
      near-coincident  the same time of flight between cardioids aimed +-angle_deg: time and level differences
      coincident       xy: cardioids at one point aimed +-angle_deg; ms: cardioid mid + figure-8 side decoded to
                       L = M + wS, R = M - wS: level differences only, zero delay
    plus each capsule's sensitivity (gain_db).
    """
    capture = capture or {"type": "binaural", "head_radius_m": 0.0875}
    kind = capture["type"]
    gains = 10 ** (np.asarray(capture.get("gain_db", [0.0, 0.0]), dtype=float)[:, None] / 20)  # (2, 1)
    if kind == "binaural":
        return render_binaural(mono, azimuth_deg, sr, capture["head_radius_m"], elevation_deg, speed_of_sound,
                               ear_offset_deg=capture.get("ear_offset_deg", (0.0, 0.0)),
                               detail=capture.get("detail")) * gains
    if kind not in MIC_TYPES:
        raise ValueError(f"capture type must be one of {MIC_TYPES}, got {kind!r}")
    n = len(mono)
    az, el = np.radians(_per_block(azimuth_deg, n)), np.radians(_per_block(elevation_deg, n))
    lateral_sin = np.sin(az) * np.cos(el)  # + = right
    spacing = capture.get("spacing_m", 0.0)
    tdoa = spacing * lateral_sin / speed_of_sound  # > 0: the right capsule hears it first
    delay = np.stack([np.maximum(tdoa, 0.0), np.maximum(-tdoa, 0.0)])  # (2, nb): the far capsule is late
    if kind in ("spaced", "phone"):
        level = np.ones((2, len(az)))
    elif kind == "near-coincident" or capture.get("layout") == "xy":
        a = capture["angle_deg"]
        level = np.stack([_cardioid(az, el, -a), _cardioid(az, el, a)])
    else:  # ms: figure-8 side capsule facing left, so S > 0 for a source on the left
        mid, side = _cardioid(az, el, 0.0), -lateral_sin
        w = capture["ms_width"]
        level = np.stack([mid + w * side, mid - w * side])
    f = np.fft.rfftfreq(NFFT, 1 / sr)
    H = level[..., None] * np.exp(-2j * np.pi * f * delay[..., None])
    return filter_blockwise(mono, H) * gains


# ----------------------------------------------------------------------------------------------------------------------
# Sound families: each draws a mono signal of n samples

def _events(rng, n, sr, length_s, gap_s):
    """(start, stop) samples of back-to-back events whose lengths and gaps are uniform in (lo, hi) seconds."""
    events, pos = [], int(rng.uniform(0, gap_s[1]) * sr)
    while pos < n:
        stop = min(n, pos + int(rng.uniform(*length_s) * sr))
        events.append((pos, stop))
        pos = stop + int(rng.uniform(*gap_s) * sr)
    return events


def _envelope(length, sr, attack_s, decay_s, release_s=0.01):
    """Linear attack, exponential decay and a short linear release at the end (no clicks)."""
    t = np.arange(length) / sr
    return np.minimum.reduce([t / attack_s, (length / sr - t) / release_s, np.ones(length)]) * np.exp(-t / decay_s)


def _oscillator(freq, amps, rng, size=4096):
    """Periodic wave with harmonic amplitudes amps (k = 1..K) at instantaneous frequency freq (cycles per sample),
    read from a one-period table; amps must stop below Nyquist for the highest freq."""
    k = np.arange(1, len(amps) + 1)[:, None]
    u = np.arange(size) / size
    table = (amps[:, None] * np.sin(2 * np.pi * k * u + rng.uniform(0, 2 * np.pi, (len(amps), 1)))).sum(0)
    pos = np.cumsum(freq) % 1.0 * size
    i = pos.astype(int)
    frac = pos - i
    return table[i] * (1 - frac) + table[(i + 1) % size] * frac


def _smooth_noise(rng, n, sr, knot_s):
    """A slowly wandering curve, N(0, 1) at knots every knot_s seconds, linear in between."""
    knots = np.arange(0, n / sr + knot_s, knot_s)
    return np.interp(np.arange(n) / sr, knots, rng.standard_normal(len(knots)))


def _tonal(n, sr, rng):
    """Instrument: notes from a major scale on harmonic partials (random roll-off), vibrato, plucked-to-bowed decay."""
    base = 110 * 2 ** rng.uniform(0, 3)  # 110-880 Hz; notes go up to an octave above
    attack, decay = rng.uniform(0.003, 0.06), rng.uniform(0.15, 2.0)
    f0, env = np.full(n, base), np.zeros(n)
    for a, b in _events(rng, n, sr, (0.15, 0.9), (0.0, 0.12)):
        f0[a:b] = base * 2 ** (rng.choice([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
        env[a:b] = rng.uniform(0.5, 1.0) * _envelope(b - a, sr, attack, decay)
    f0 *= 1 + rng.uniform(0, 0.012) * np.sin(2 * np.pi * rng.uniform(4, 7) * np.arange(n) / sr)
    K = max(1, min(40, int(0.45 * sr / (2.05 * base))))
    amps = np.arange(1, K + 1) ** -rng.uniform(0.5, 1.5) * rng.uniform(0.3, 1.0, K)
    return _oscillator(f0 / sr, amps, rng) * env


def _noise(n, sr, rng):
    """Shaker / rustle / spray: noise in one random band (centre 0.6-5.5 kHz, 0.8-3 octaves), in decaying bursts."""
    f = np.fft.rfftfreq(n, 1 / sr)
    centre, octaves = 600 * 2 ** rng.uniform(0, 3.2), rng.uniform(0.8, 3.0)
    band = np.exp(-0.5 * (np.log2(np.maximum(f, 1.0) / centre) / (octaves / 2)) ** 2)
    x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * band, n)
    env, decay = np.zeros(n), rng.uniform(0.02, 0.3)
    for a, b in _events(rng, n, sr, (0.05, 0.5), (0.03, 0.4)):
        env[a:b] = rng.uniform(0.4, 1.0) * _envelope(b - a, sr, 0.003, decay)
    return x * env


def _clicks(n, sr, rng):
    """Tapping / crinkling: Poisson hits (3-48 per second, in spells) each ringing 1-3 resonant modes plus a crackle."""
    rate = 3 * 2 ** rng.uniform(0, 4)
    hits = (np.cumsum(rng.exponential(1 / rate, int(2 * rate * n / sr) + 10)) * sr).astype(int)
    hits = hits[hits < n]
    train = np.zeros(n)
    train[hits] = rng.uniform(0.2, 1.0, len(hits))
    spells = np.zeros(n)
    for a, b in _events(rng, n, sr, (1.0, 4.0), (0.0, 0.6)):
        spells[a:b] = 1.0
    if not (train * spells).any():  # no hit in a spell (3% of 1-s clips): one, so that a sounding object sounds
        train[rng.choice(np.flatnonzero(spells))] = rng.uniform(0.2, 1.0)  # (a spell starts within 0.6 s)
    t = np.arange(int(0.1 * sr)) / sr
    ir = rng.uniform(0, 0.6) * rng.standard_normal(len(t)) * np.exp(-t / 0.002)
    for _ in range(rng.integers(1, 4)):  # resonant modes: 0.7-6 kHz, 3-30 ms decays
        mode = np.sin(2 * np.pi * rng.uniform(700, 6000) * t) * np.exp(-t / rng.uniform(0.003, 0.03))
        ir += rng.uniform(0.3, 1.0) * mode
    return fftconvolve(train * spells, ir)[:n]


def _speech(n, sr, rng):
    """Formant babble: glottal pulses at an intonated f0 through three moving formants, syllable by syllable, with
    pauses; a fifth of the syllables are unvoiced hiss, which also puts energy above 3 kHz."""
    f0 = 90 * 2 ** rng.uniform(0, 1.4) * (1 + 0.08 * _smooth_noise(rng, n, sr, 0.3))  # 90-240 Hz
    phase = np.cumsum(f0 / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal cycle
    syllables = _events(rng, n, sr, (0.08, 0.3), (0.0, 0.06))
    centres = np.array([(a + b) / 2 for a, b in syllables])
    formants = np.stack([rng.uniform(300, 850, len(syllables)), rng.uniform(850, 2400, len(syllables)),
                         rng.uniform(2200, 3400, len(syllables))], 1)
    voiced = rng.random(len(syllables)) < 0.8
    blocks = np.arange(n // HOP + 2) * HOP
    F = np.stack([np.interp(blocks, centres, formants[:, i]) for i in range(3)], 1)[:, :, None]  # (nb, 3, 1)
    bandwidth = np.array([80.0, 120.0, 180.0])[:, None] * rng.uniform(0.7, 1.5)
    f = np.fft.rfftfreq(NFFT, 1 / sr)
    vocal_tract = (np.array([1.0, 0.6, 0.35])[:, None] / np.sqrt(1 + ((f - F) / (bandwidth / 2)) ** 2)).sum(1)
    starts = np.array([a for a, _ in syllables])
    is_voiced = voiced[np.maximum(np.searchsorted(starts, blocks, side="right") - 1, 0)][:, None]
    voice = filter_blockwise(pulses, vocal_tract / np.sqrt(1 + (f / 200) ** 2) * is_voiced)  # glottal roll-off
    hiss_band = np.exp(-0.5 * (np.log2(np.maximum(f, 1.0) / rng.uniform(3000, 6000)) / 0.6) ** 2)
    hiss = filter_blockwise(rng.standard_normal(n), (0.3 * vocal_tract + hiss_band) * ~is_voiced)
    env = np.zeros(n)
    for (a, b), loud in zip(syllables, rng.uniform(0.3, 1.0, len(syllables)) * (rng.random(len(syllables)) > 0.12)):
        env[a:b] = loud * np.sin(np.pi * np.arange(b - a) / (b - a)) ** 0.5  # 12% skipped: pauses between words
    return (voice / (np.std(voice) + 1e-9) + 0.5 * hiss / (np.std(hiss) + 1e-9)) * env


def _buzz(n, sr, rng):
    """Buzzer / insect / razor: a bright sawtooth- or square-like wave at a low wobbling f0, amplitude-modulated,
    switched on and off."""
    base = 70 * 2 ** rng.uniform(0, 2.2)  # 70-320 Hz
    f0 = base * (1 + 0.03 * _smooth_noise(rng, n, sr, 0.2))
    K = min(60, int(0.45 * sr / (1.15 * base)))
    k = np.arange(1, K + 1)
    amps = np.where((k % 2 == 1) | (rng.random() < 0.5), 1.0 / k, 0.0)  # half the time odd harmonics only
    t = np.arange(n) / sr
    am = 1 - rng.uniform(0, 0.7) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(8, 40) * t))
    env = np.zeros(n)
    for a, b in _events(rng, n, sr, (0.4, 3.0), (0.05, 0.6)):
        env[a:b] = _envelope(b - a, sr, 0.01, 1e9)
    return _oscillator(f0 / sr, amps, rng) * am * env


def _whistle(n, sr, rng):
    """Whistle / kettle / tuning fork: a nearly pure tone (0.7-3.5 kHz) gliding between notes, vibrato, breath."""
    target, env = np.full(n, np.nan), np.zeros(n)
    for a, b in _events(rng, n, sr, (0.2, 1.5), (0.02, 0.3)):
        target[a:b] = 700 * 2 ** rng.uniform(0, 2.3)
        env[a:b] = _envelope(b - a, sr, rng.uniform(0.01, 0.08), rng.uniform(0.5, 5.0), 0.03)
    target = np.where(np.isnan(target), np.nanmean(target), target)
    glide = math.exp(-1 / (rng.uniform(0.01, 0.06) * sr))
    f = lfilter([1 - glide], [1, -glide], target, zi=[glide * target[0]])[0]  # one-pole glide between notes
    f *= 1 + rng.uniform(0, 0.01) * np.sin(2 * np.pi * rng.uniform(4, 7) * np.arange(n) / sr)
    tone = _oscillator(f / sr, np.array([1.0, rng.uniform(0, 0.2)]), rng)
    breath = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * (np.fft.rfftfreq(n, 1 / sr) > 1000), n)
    return (tone + rng.uniform(0.05, 0.3) * breath) * env


FAMILIES = {"tonal": _tonal, "noise": _noise, "clicks": _clicks, "speech": _speech, "buzz": _buzz,
            "whistle": _whistle}


# Sound families no class uses (novel_sound_prob): held-out sets of sounds a model trained here never heard.

def _pluck(n, sr, rng):
    """Plucked string (Karplus-Strong): a noise burst circulating in a delay line, averaged and damped, note by note."""
    out = np.zeros(n)
    for a, b in _events(rng, n, sr, (0.2, 1.2), (0.0, 0.3)):
        period = max(2, int(sr / (82 * 2 ** rng.uniform(0, 3.5))))  # 82 Hz - 1 kHz
        damping = rng.uniform(0.990, 0.999)
        line = rng.uniform(-1, 1, period) * rng.uniform(0.4, 1.0)
        cycles = []
        for _ in range((b - a) // period + 1):  # one period at a time: the line played, then averaged and damped
            cycles.append(line)
            line = damping * 0.5 * (line + np.roll(line, -1))
        out[a:b] = np.concatenate(cycles)[:b - a] * _envelope(b - a, sr, 0.001, 1e9)
    return out


def _drum(n, sr, rng):
    """Drums: membrane hits whose pitch falls (40-250 Hz), with a noisy stick attack, at a steady tempo with gaps."""
    out, beat = np.zeros(n), rng.uniform(0.15, 0.6)
    t = np.arange(int(0.6 * sr)) / sr
    for a, _ in _events(rng, n, sr, (beat, beat), (0.0, 0.0)):
        if rng.random() < 0.25:
            continue
        f0 = rng.uniform(40, 250)
        pitch = f0 * (1 + rng.uniform(0.5, 2.0) * np.exp(-t / 0.03))
        hit = np.sin(2 * np.pi * np.cumsum(pitch) / sr) * np.exp(-t / rng.uniform(0.05, 0.3))
        hit += rng.uniform(0.1, 0.6) * rng.standard_normal(len(t)) * np.exp(-t / 0.01)
        m = min(len(t), n - a)
        out[a:a + m] += rng.uniform(0.5, 1.0) * hit[:m]
    return out


def _chirp(n, sr, rng):
    """Birdsong / alarms: tone sweeps (0.5-6 kHz, up or down, 30-400 ms) in phrases."""
    f, env = np.full(n, 1000.0), np.zeros(n)
    for a, b in _events(rng, n, sr, (0.03, 0.4), (0.02, 0.5)):
        lo, hi = sorted(500 * 2 ** rng.uniform(0, 3.6, 2))
        sweep = np.geomspace(lo, hi, b - a)
        f[a:b] = sweep if rng.random() < 0.5 else sweep[::-1]
        env[a:b] = np.sin(np.pi * np.arange(b - a) / (b - a))
    return np.sin(2 * np.pi * np.cumsum(f) / sr) * env


def _applause(n, sr, rng):
    """Applause / rain: dense short noise bursts (5-15 ms, 20-200 per second), each with its own colour."""
    rate = 20 * 10 ** rng.uniform(0, 1)
    out = np.zeros(n)
    starts = (np.cumsum(rng.exponential(1 / rate, int(2 * rate * n / sr) + 10)) * sr).astype(int)
    for a in starts[starts < n]:
        m = min(int(rng.uniform(0.005, 0.015) * sr), n - a)
        burst = np.diff(rng.standard_normal(m + 1)) if rng.random() < 0.5 else rng.standard_normal(m)
        out[a:a + m] += rng.uniform(0.2, 1.0) * burst * np.exp(-np.arange(m) / (0.3 * m))
    for a, b in _events(rng, n, sr, (1.0, 4.0), (0.0, 0.8)):  # swells
        out[a:b] *= rng.uniform(0.4, 1.0)
    return out


NOVEL_FAMILIES = {"pluck": _pluck, "drum": _drum, "chirp": _chirp, "applause": _applause}


def source_signal(family, n, sr, rng, tilt_db_per_octave=0.0):
    """Mono sound of a family (a key of FAMILIES or NOVEL_FAMILIES), n samples at sr, unit RMS, with a spectral tilt
    around 1 kHz and nothing below 50 Hz."""
    x = {**FAMILIES, **NOVEL_FAMILIES}[family](n, sr, rng)
    f = np.maximum(np.fft.rfftfreq(n, 1 / sr), 1.0)
    x = np.fft.irfft(np.fft.rfft(x) * (f / 1000) ** (tilt_db_per_octave / 6.02) * (f > 50), n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def frame_loudness(mono, sr, fps, num_frames):
    """The sound's RMS over each video frame's 1/fps around it, as a fraction of its loudest frame's (0..1)."""
    edges = np.clip(np.round((np.arange(num_frames + 1) - 0.5) / fps * sr).astype(int), 0, len(mono))
    rms = np.array([np.sqrt(np.mean(mono[a:b] ** 2)) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])])
    return rms / max(rms.max(), 1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# Room, noise, codec

def room_tails(rng, sr, rt60, drr_db, early_taps=True):
    """Left and right reverberation (2, L) of a random room, to convolve with the dry mono sound: a pre-delay set by
    the room size, a few early reflections, then a late tail of exponentially decaying noise whose high frequencies
    die faster (absorption). Ears get independent noise (a diffuse field carries no interaural cue). Energy per ear is
    10^(-drr/10) of the direct sound. early_taps=False leaves the random early reflections out (image sources
    replace them)."""
    room_m, hf_rt60_ratio = rng.uniform(3.0, 15.0), rng.uniform(0.3, 0.8)
    predelay = int(room_m / 343.0 * sr)
    tail_len = int(1.2 * rt60 * sr)
    rt60_f = rt60 * (1 - (1 - hf_rt60_ratio) * np.fft.rfftfreq(NFFT, 1 / sr) / (sr / 2))
    t_blocks = np.arange(tail_len // HOP + 2) * HOP / sr
    decay = np.exp(-6.91 * t_blocks[:, None] / rt60_f)  # -60 dB at rt60, per frequency
    tails = np.zeros((2, predelay + tail_len))
    for ear in range(2):
        tails[ear, predelay:] = filter_blockwise(rng.standard_normal(tail_len), decay)
        taps = predelay + rng.integers(0, int(0.03 * sr), 6)  # early reflections, standing out from the tail
        tails[ear, taps] += rng.choice([-1, 1], 6) * rng.uniform(1.0, 4.0, 6) * early_taps  # drawn either way: the
        # same rng sequence whether or not image sources replace them
    tails *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tails ** 2, axis=1, keepdims=True))
    return tails, room_m


def draw_shoebox(rng, room_m: float, cfg: SynthConfig) -> dict:
    """A shoebox room for image_source_reflections, recorded in the sidecar as drawn: room_m wide (left-right), 0.6-1.2
    x that deep and 2.5-4 m high, the camera somewhere in its middle half at 1-2 m, walls reflecting
    cfg.wall_reflection of the pressure."""
    depth, height = room_m * rng.uniform(0.6, 1.2), rng.uniform(2.5, 4.0)
    dims = np.array([room_m, depth, height])
    mic = dims * rng.uniform(0.25, 0.75, 3)
    mic[2] = rng.uniform(1.0, min(2.0, height - 0.5))
    return {"room_dims_m": np.round(dims, 2).tolist(), "mic_m": np.round(mic, 2).tolist(),
            "wall_reflection": round(float(rng.uniform(*cfg.wall_reflection)), 3)}


def image_source_reflections(mono, azimuth_deg, elevation_deg, sr, capture, room: dict, distance_m: float):
    """The six first-order reflections (2, n) of the shoebox `room` (draw_shoebox) of a source distance_m from the
    camera in the given direction (per block, so moving sources move), heard by `capture` from their own directions.

    Each wall mirrors the source; the image's sound arrives later by the extra path, weaker by 1/distance and the
    wall's reflection coefficient, and from the image's direction: a side wall's reflection comes from the far side
    of the camera, so its interaural cue points away from the source (a cue diffuse tails never carry)."""
    n = len(mono)
    dims, mic, beta = np.array(room["room_dims_m"]), np.array(room["mic_m"]), room["wall_reflection"]
    az, el = np.radians(_per_block(azimuth_deg, n)), np.radians(_per_block(elevation_deg, n))
    rel = distance_m * np.stack([np.sin(az) * np.cos(el), np.cos(az) * np.cos(el), np.sin(el)], axis=1)  # x right,
    src = np.clip(mic + rel, 0.05, dims - 0.05)  # y ahead, z up; a source past a wall stands just inside it
    direct_m = np.linalg.norm(src - mic, axis=1)
    out = np.zeros((2, n))
    for axis in range(3):
        for wall in (0.0, dims[axis]):
            image = src.copy()
            image[:, axis] = 2 * wall - src[:, axis]
            v = image - mic
            dist = np.linalg.norm(v, axis=1)
            az_i = np.degrees(np.arctan2(v[:, 0], v[:, 1]))
            el_i = np.degrees(np.arcsin(np.clip(v[:, 2] / dist, -1, 1)))
            # one delay per image (its mean extra path): a delay that changed block by block would smear the sound
            lag = int(round(float(np.mean(dist - direct_m)) / 343.0 * sr))
            gain = beta * float(np.mean(direct_m / dist))
            delayed = np.zeros(n)
            delayed[lag:] = mono[:n - lag] * gain
            out += render_capture(delayed, az_i, sr, capture, el_i)
    return out


def _diffuse_noise(rng, n, sr):
    """Background noise (2, n) of random colour (1/f^beta, beta 0-2), partly coherent between the ears (0-0.6)."""
    beta, coherence = rng.uniform(0, 2), rng.uniform(0, 0.6)
    f = np.maximum(np.fft.rfftfreq(n, 1 / sr), 20.0)
    spectra = (rng.standard_normal((3, len(f))) + 1j * rng.standard_normal((3, len(f)))) * f ** (-beta / 2)
    common, left, right = np.fft.irfft(spectra, n)
    return math.sqrt(coherence) * common + math.sqrt(1 - coherence) * np.stack([left, right]), beta


_ffmpeg = media.ffmpeg  # every ffmpeg call goes through flipray.media


def _aac_round_trip(audio, sr, kbps):
    """Encode stereo float audio (2, n) to AAC in an .m4a (whose edit list trims the encoder delay) and decode it."""
    with tempfile.TemporaryDirectory() as tmp:
        m4a = os.path.join(tmp, "a.m4a")
        _ffmpeg(["-f", "f32le", "-ar", str(sr), "-ac", "2", "-i", "-", "-c:a", "aac", "-b:a", f"{kbps}k", m4a],
                stdin=audio.T.astype("<f4").tobytes())
        raw = _ffmpeg(["-i", m4a, "-f", "f32le", "-ar", str(sr), "-ac", "2", "-"])
    decoded = np.frombuffer(raw, "<f4").reshape(-1, 2).T.astype(float)
    out = np.zeros_like(audio)
    out[:, :min(audio.shape[1], decoded.shape[1])] = decoded[:, :audio.shape[1]]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Pictures

def _background(rng, size, width=None):
    """A muted backdrop (size, width, 3) uint8: smoothed colour noise, soft stripes or a gradient, plus faint grain
    (drawn square, width x width, and centre-cropped to the height)."""
    if width and width != size:
        top = (width - size) // 2
        return _background(rng, width)[top:top + size]
    kind = rng.integers(3)
    c1, c2 = rng.uniform(30, 225, (2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        cells = rng.integers(3, 12)
        img = zoom(rng.uniform(30, 225, (cells, cells, 3)), (size / cells, size / cells, 1), order=3, mode="nearest")
    elif kind == 1:
        stripes = 0.5 + 0.5 * np.tanh(3 * np.sin(2 * np.pi * along * rng.uniform(2, 12)))
        img = c1 + (c2 - c1) * stripes[..., None]
    else:
        img = c1 + (c2 - c1) * ((along - along.min()) / (along.max() - along.min()))[..., None]
    grain = zoom(rng.normal(0, 10, (size // 4, size // 4, 3)), (size / (size // 4), size / (size // 4), 1), order=1)
    grey = img.mean(-1, keepdims=True)
    img = 128 + 0.7 * (grey - 128) + 0.5 * (img - grey) + grain  # lower contrast and saturation than the objects
    return np.clip(img, 0, 255).astype(np.uint8)


def _clutter(rng, background, size):
    """The backdrop (size, width, 3) uint8 with 4-12 static things painted in at full contrast: random shapes,
    colours and patterns, 15-110 px wide at size 256, anywhere (partly outside the frame too)."""
    img = background.astype(float)
    height, width = img.shape[:2]
    for _ in range(rng.integers(4, 13)):
        look = (str(rng.choice(list(SHAPES))), tuple(rng.uniform(0, 255, 3)), str(rng.choice(list(PATTERNS))))
        w = max(4, int(rng.uniform(15, 110) * size / 256))
        h = max(4, int(w * rng.uniform(0.5, 2.0)))
        rgb, cover = sprite(look, w, h, rng)
        paste(img, rgb, cover, int(rng.uniform(-w / 2, width - w / 2)), int(rng.uniform(-h / 2, height - h / 2)))
    return img.astype(np.uint8)


def paste(img, rgb, cover, x, y) -> list[int]:
    """Composite a sprite (premultiplied rgb and cover, sprite()'s) into img (H, W, 3) in place, its top-left corner at
    pixel (x, y); the part overhanging the frame is dropped. Returns the pasted box [x0, y0, x1, y1]."""
    h, w = cover.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img.shape[1]), min(y + h, img.shape[0])
    region = img[y0:y1, x0:x1]
    mixed = region * (1 - cover[y0 - y:y1 - y, x0 - x:x1 - x]) + rgb[y0 - y:y1 - y, x0 - x:x1 - x]
    region[:] = np.clip(mixed, 0, 255).astype(img.dtype)
    return [int(x0), int(y0), int(x1), int(y1)]


def sprite(look, w, h, rng):
    """One object instance: premultiplied RGB (h, w, 3) and coverage (h, w, 1) of the class's shape, colour and
    pattern with a dark outline and a little colour jitter, antialiased by 3x3 supersampling."""
    shape, colour, pattern = look
    v, u = np.mgrid[0:3 * h, 0:3 * w]
    u, v = (u + 0.5) / (3 * w) * 2 - 1, (v + 0.5) / (3 * h) * 2 - 1
    outer, inner = SHAPES[shape](u, v), SHAPES[shape](u / 0.86, v / 0.86)
    rgb = np.clip(np.array(colour) + rng.uniform(-25, 25, 3), 0, 255) * PATTERNS[pattern](u, v, rng)[..., None]
    rgb = np.where((outer & ~inner)[..., None], 0.3 * rgb, rgb)
    cover = outer[..., None].astype(float)
    pool = lambda a: a.reshape(h, 3, w, 3, a.shape[-1]).mean((1, 3))
    return np.clip(pool(rgb * cover), 0, 255), pool(cover)


def _track(obj, t):
    """Box centre (len(t), 2) of an object at times t (s): a straight line that bounces off the frame edges."""
    span = obj["hi"] - obj["lo"]
    u = (obj["start"] - obj["lo"] + np.outer(t, obj["velocity"])) % (2 * span)
    return obj["lo"] + span - np.abs(u - span)


def _direction(xy, size, focal, width=None):
    """Azimuth and elevation (degrees) of pixel positions xy (..., 2) through the pinhole camera (frames of
    width x size pixels; square when width is None)."""
    dx, dy = xy[..., 0] - (width or size) / 2, size / 2 - xy[..., 1]
    return np.degrees(np.arctan2(dx, focal)), np.degrees(np.arctan2(dy, np.hypot(focal, dx)))


# ----------------------------------------------------------------------------------------------------------------------
# One clip

def make_clip(out_dir, cfg: SynthConfig, seed: int, scene: int, k: int) -> dict:
    """Write clip k of scene `scene` (webm, flac, json) under out_dir/clips/ and return its manifest row (no split)."""
    size, sr, fps = cfg.size, cfg.sample_rate, cfg.fps
    width = cfg.width or size
    n, num_frames = round(cfg.duration_s * sr), round(cfg.duration_s * fps)
    scene_id, clip_id = f"s{scene:06d}", f"s{scene:06d}_c{k}"

    # The scene: camera, background and object set, the same for all its clips.
    srng = np.random.default_rng([seed, scene])
    hfov = srng.uniform(*cfg.hfov_deg)
    focal = (width / 2) / math.tan(math.radians(hfov) / 2)  # the field of view is horizontal
    background = _background(srng, size, width)
    crng = np.random.default_rng([seed, scene, CLUTTER_STREAM])  # its own stream: other draws stay the same
    if crng.random() < cfg.clutter_prob:
        background = _clutter(crng, background, size)
    n_sounding = 2 if srng.random() < cfg.two_source_prob else 1
    classes = list(srng.choice(list(SOUNDING_CLASSES), n_sounding, replace=False))
    weights = 0.5 ** np.arange(cfg.max_distractors + 1)
    for _ in range(srng.choice(cfg.max_distractors + 1, p=weights / weights.sum())):
        kinds = SOUNDING_CLASSES if srng.random() < cfg.lookalike_prob else SILENT_CLASSES
        classes.append(srng.choice(list(kinds)))
    objects = []
    for i, cls in enumerate(classes):
        family, look = {**SOUNDING_CLASSES, **SILENT_CLASSES}[cls]
        w = int(srng.uniform(*cfg.object_px) * size / 256)
        h = int(w * srng.uniform(0.8, 1.25))
        rgb, cover = sprite(look, w, h, srng)
        # Novel looks come from a stream of their own, drawn after the class sprite, so that every other draw of
        # the scene and its clips (sizes, motions, audio) is the same whatever novel_look_prob is.
        lrng = np.random.default_rng([seed, scene, NOVEL_LOOK_STREAM, i])
        if lrng.random() < cfg.novel_look_prob:
            novel = (str(lrng.choice(list(SHAPES))), tuple(lrng.uniform(30, 240, 3)), str(lrng.choice(list(PATTERNS))))
            rgb, cover = sprite(novel, w, h, lrng)
        objects.append(dict(id=i, cls=str(cls), family=family, sounding=i < n_sounding, w=w, h=h, rgb=rgb, cover=cover))

    # The clip: motions, sounds and recording conditions.
    rng = np.random.default_rng([seed, scene, k])
    for obj in objects:
        obj["lo"] = np.array([obj["w"] / 2, obj["h"] / 2])
        obj["hi"] = np.array([width, size]) - obj["lo"]
        obj["motion"] = str(rng.choice(MOTIONS, p=np.array(cfg.motion_probs) / sum(cfg.motion_probs)))
        obj["start"] = rng.uniform(obj["lo"], obj["hi"])
        if obj["sounding"] and obj["motion"] in ("static", "up-down"):  # never parked on the centre line
            reach = obj["hi"][0] - width / 2
            margin = min(focal * math.tan(math.radians(cfg.min_offcentre_deg)), reach)
            obj["start"][0] = width / 2 + rng.choice([-1, 1]) * rng.uniform(margin, reach)
        direction = {"static": (0, 0), "left-right": (rng.choice([-1, 1]), 0), "up-down": (0, rng.choice([-1, 1])),
                     "diagonal": rng.choice([-1, 1], 2) / math.sqrt(2)}[obj["motion"]]
        obj["velocity"] = np.array(direction, dtype=float) * size / rng.uniform(*cfg.crossing_time_s)

    # Audio: each sounding object rendered along its track by the clip's microphones, then room, noise, level, codec.
    capture = draw_capture(rng, cfg)
    hrng = np.random.default_rng([seed, scene, k, HEAD_DETAIL_STREAM])  # its own stream: other draws stay the same
    if capture["type"] == "binaural" and hrng.random() < cfg.head_detail_prob:
        capture["detail"] = draw_head_detail(hrng)
    direct, dry, sources = np.zeros((2, n)), np.zeros(n), []
    for obj in objects:
        if obj["sounding"]:
            obj["level_db"] = rng.uniform(*cfg.source_level_db)
            mono = source_signal(obj["family"], n, sr, rng, rng.uniform(*cfg.spectral_tilt_db_per_octave))
            nrng = np.random.default_rng([seed, scene, k, NOVEL_SOUND_STREAM, obj["id"]])
            if nrng.random() < cfg.novel_sound_prob:  # drawn after the class's sound: the rng above is unchanged
                obj["family"] = str(nrng.choice(list(NOVEL_FAMILIES)))
                mono = source_signal(obj["family"], n, sr, nrng, nrng.uniform(*cfg.spectral_tilt_db_per_octave))
            mono *= 10 ** (obj["level_db"] / 20)
            if cfg.sync_pulse:
                obj["loudness"] = frame_loudness(mono, sr, fps, num_frames)
            az, el = _direction(_track(obj, np.arange(n) / sr), size, focal, width)
            direct += render_capture(mono, az, sr, capture, el)
            dry += mono
            sources.append((mono, az, el))
    audio, render = direct, {"capture": capture, "head_radius_m": capture.get("head_radius_m"), "rt60_s": None,
                             "snr_db": None, "lossy_audio": None}
    if rng.random() < cfg.reverb_prob:
        rt60, drr = rng.uniform(*cfg.rt60_s), rng.uniform(*cfg.drr_db)
        tails, room_m = room_tails(rng, sr, rt60, drr, early_taps=cfg.reflections == "diffuse")
        audio = audio + np.stack([fftconvolve(dry, tail)[:n] for tail in tails])
        render.update(rt60_s=round(rt60, 3), drr_db=round(drr, 2), room_m=round(room_m, 2))
        if cfg.reflections == "image-source":
            irng = np.random.default_rng([seed, scene, k, IMAGE_SOURCE_STREAM])
            room = draw_shoebox(irng, room_m, cfg)  # one room and camera; each sounding object at its own distance
            distances = [round(float(irng.uniform(*cfg.source_distance_m)), 2) for _ in sources]
            for (mono, az, el), distance in zip(sources, distances):
                audio = audio + image_source_reflections(mono, az, el, sr, capture, room, distance)
            render["image_source"] = {**room, "source_distance_m": distances}
    if cfg.noise:
        snr = rng.uniform(*cfg.snr_db)
        noise, beta = _diffuse_noise(rng, n, sr)
        audio = audio + noise * math.sqrt(np.mean(audio ** 2) / np.mean(noise ** 2) * 10 ** (-snr / 10))
        render.update(snr_db=round(snr, 2), noise_beta=round(beta, 2))
    peak = rng.uniform(*cfg.peak)
    audio *= peak / max(np.abs(audio).max(), 1e-9)
    if rng.random() < cfg.lossy_audio_prob:
        kbps = int(rng.choice(cfg.aac_kbps))
        audio = _aac_round_trip(audio, sr, kbps)
        audio *= peak / max(np.abs(audio).max(), 1e-9)  # the codec can overshoot
        render["lossy_audio"] = f"aac-{kbps}k"
    render["peak"] = round(peak, 3)

    # Video: background, then objects from the last to the first, so distractors never hide a sounding object.
    frames = np.repeat(background[None], num_frames, axis=0)
    for obj in reversed(objects):
        scales = 1 + cfg.sync_pulse * obj["loudness"] if "loudness" in obj else np.ones(num_frames)
        centres = _track(obj, np.arange(num_frames) / fps)
        obj["boxes"], obj["centres"] = [], []
        for frame, centre, scale in zip(frames, centres, scales):
            rgb, cover = obj["rgb"], obj["cover"]
            if scale != 1:
                h, w = max(1, round(obj["h"] * scale)), max(1, round(obj["w"] * scale))
                rgb, cover = (zoom(a, (h / obj["h"], w / obj["w"], 1), order=1) for a in (rgb, cover))
            h, w = cover.shape[:2]
            x, y = np.round(centre - np.array([w / 2, h / 2])).astype(int)
            obj["boxes"].append(paste(frame, rgb, cover, x, y))  # a grown object may overhang: the part inside
            obj["centres"].append([x + w / 2, y + h / 2])  # the whole object's, also when it overhangs
    clips_dir = Path(out_dir) / "clips"
    media.write_vp9(clips_dir / f"{clip_id}.webm", frames, fps)
    media.write_flac(clips_dir / f"{clip_id}.flac", audio, sr)

    sidecar_objects = []
    for obj in objects:
        az, el = _direction(np.array(obj["centres"], dtype=float), size, focal, width)
        sidecar_objects.append({
            "id": obj["id"], "class": obj["cls"], "family": obj["family"], "sounding": obj["sounding"],
            "motion": obj["motion"], "boxes": obj["boxes"], "azimuth_deg": np.round(az, 2).tolist(),
            "elevation_deg": np.round(el, 2).tolist(),
            "level_db": round(obj["level_db"], 2) if obj["sounding"] else None})
    sidecar = {
        "clip_id": clip_id, "scene_id": scene_id, "source": "synthetic", "duration_s": cfg.duration_s, "fps": fps,
        "num_frames": num_frames, "width": width, "height": size, "sample_rate": sr, "channels": 2,
        "conventions": "azimuth deg, positive = listener's right, 0 = straight ahead; audio channel 0 = left; "
                       "boxes [x0, y0, x1, y1] in pixels",
        "camera": {"hfov_deg": round(hfov, 3)}, "render": render, "objects": sidecar_objects,
        "generator": {"seed": seed, "scene": scene, "clip": k, "config": asdict(cfg)},
    }
    write_bytes(clips_dir / f"{clip_id}.json", json.dumps(sidecar).encode())
    return {"clip_id": clip_id, "scene_id": scene_id, "duration_s": cfg.duration_s, "fps": fps,
            "num_frames": num_frames, "sample_rate": sr, "channels": 2, "video": f"clips/{clip_id}.webm",
            "audio": f"clips/{clip_id}.flac", "meta": f"clips/{clip_id}.json"}


def _make_clip_task(task):
    return make_clip(*task)


def render_clips(task_fn, tasks: list, workers: int | None, progress: bool, desc: str) -> list[dict]:
    """task_fn(task) -> manifest row for every task, in `workers` processes (default: all cores); rows in clip_id
    order. task_fn must be a module-level function (the pool pickles it)."""
    if not tasks:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    bar = dict(total=len(tasks), unit="clip", disable=not progress, desc=desc)
    if workers == 1:
        rows = [task_fn(task) for task in tqdm(tasks, **bar)]
    else:  # spawn: fresh interpreters, no fork of a parent that may hold threads
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = list(tqdm(pool.imap_unordered(task_fn, tasks), **bar))
    return sorted(rows, key=lambda row: row["clip_id"])


# ----------------------------------------------------------------------------------------------------------------------
# Dataset

_TEMPORARY = re.compile(r"\.[sp]\d{6}_c\d+\.(webm|flac|json)-.+")  # flipray.atomic's names for synth's clip files


def plan_clips(out_dir, seed: int, cfg, wanted: list[tuple[int, int]]) -> tuple[list[dict], list[tuple[int, int]]]:
    """(manifest rows to keep, (scene, clip) pairs to make) for a generator run into out_dir that asks for `wanted`.

    A dataset never loses clips: the clips out_dir's manifest lists are kept when this run would make them the same
    way (their sidecars' `generator` has this seed and config), and the new manifest lists them too, beyond `wanted`
    if need be; so the same command again makes nothing, and a larger --clips adds clips. A listed clip made
    otherwise (another seed or config, or not by this generator) is a UsageError: this run would replace its files.
    A listed clip of this generator whose files are gone (its sidecar too, by its clip id) is made again; files no
    manifest lists (an interrupted run) are overwritten."""
    root = Path(out_dir)
    if not (root / MANIFEST_NAME).exists():
        return [], list(wanted)
    try:
        listed = read_manifest(root)
    except ValueError as e:
        raise UsageError(f"--out {root}: {e}; not writing over it") from None
    want = json.loads(json.dumps({"seed": seed, "config": asdict(cfg)}))  # tuples as the sidecars hold them: lists
    kept, have, made_again = [], set(), set()
    for row in listed:
        named = re.fullmatch(r"[sp](\d{6})_c(\d+)", row["clip_id"])  # synth: s000012_c0, synth360: p000012_c0
        if named and not (root / row["meta"]).exists():  # a clip of this naming that lost its sidecar: unverified,
            made_again.add((int(named[1]), int(named[2])))  # made again (a sidecar of another run would refuse)
            continue
        try:
            generator = json.loads((root / row["meta"]).read_text())["generator"]
        except (OSError, ValueError, KeyError, TypeError):
            generator = None
        if generator is not None and isinstance(generator.get("config"), dict):
            later = {k: v for k, v in ADDED_LATER.items() if k in want["config"]}  # synth360 has none of them
            generator = {**generator, "config": {**later, **generator["config"]}}
        same = generator is not None and {"seed": generator.get("seed"), "config": generator.get("config")} == want
        if not same:
            if generator is None:
                how = "its sidecar has no generator record: not made by this generator"
            elif generator.get("seed") != seed:
                how = f"seed {generator.get('seed')}, not {seed}"
            else:
                differ = sorted(k for k, v in want["config"].items() if (generator.get("config") or {}).get(k) != v)
                how = "another config (" + ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "") + ")"
            raise UsageError(f"--out {root} holds a dataset of {len(listed)} clips made otherwise ({row['clip_id']}: "
                             f"{how}); writing here would replace its clips: give another --out")
        where = (generator["scene"], generator["clip"])
        if all((root / row[k]).is_file() for k in ("video", "audio", "meta")):
            kept.append(row)
            have.add(where)
        else:
            made_again.add(where)
    todo = sorted((set(wanted) | made_again) - have)
    return kept, todo


def make_clips(task_fn, out_dir, seed: int, cfg, clips: int, per_scene: int, workers: int | None, progress: bool,
               desc: str) -> list[dict]:
    """The first `clips` clips (scenes of per_scene clips) in out_dir, with the ones it already lists kept
    (plan_clips): rows in clip_id order, without splits; only the missing clips are rendered (render_clips)."""
    kept, todo = plan_clips(out_dir, seed, cfg, [(i // per_scene, i % per_scene) for i in range(clips)])
    if kept and progress:
        print(f"{out_dir}: {len(kept)} clips of this seed and config already there, kept; {len(todo)} to make")
    clips_dir = Path(out_dir) / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    for leftover in clips_dir.glob(".*"):  # a cut-off run's temporary files (a full disk, a kill): the caller
        if _TEMPORARY.fullmatch(leftover.name):  # holds the folder's lock, so no generator is writing them now
            leftover.unlink(missing_ok=True)
    tasks = [(str(out_dir), cfg, seed, scene, k) for scene, k in todo]
    return sorted(kept + render_clips(task_fn, tasks, workers, progress, desc), key=lambda r: r["clip_id"])


def generate(out_dir, clips: int, seed: int = 0, workers: int | None = None, progress: bool = False,
             **options) -> list[dict]:
    """Write `clips` clips (scenes of cfg.clips_per_scene clips each) and then manifest.jsonl under out_dir; return
    the manifest rows in clip_id order (with the clips out_dir already listed: `plan_clips`). options are
    SynthConfig fields; workers defaults to os.cpu_count()."""
    cfg = SynthConfig(**options)
    if clips < 1:
        raise UsageError(f"clips must be >= 1, got {clips}")
    with manifest_lock(out_dir):  # planned from the manifest, written at the end: alone in out_dir meanwhile
        rows = make_clips(_make_clip_task, out_dir, seed, cfg, clips, cfg.clips_per_scene, workers, progress,
                          "synth")
        splits = assign_splits([row["scene_id"] for row in rows], seed=seed)
        for row in rows:
            row["split"] = splits[row["scene_id"]]
        write_manifest(out_dir, rows)
    return rows


def main(argv=None):
    defaults = SynthConfig()
    p = argparse.ArgumentParser(prog="flipray synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root to write clips/ and manifest.jsonl into")
    p.add_argument("--clips", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, required=True, help="same seed, same dataset")
    p.add_argument("--fps", type=int, choices=(6, 30), default=defaults.fps, help="video frame rate")
    p.add_argument("--size", type=int, default=defaults.size, help="frame height (and width, unless --width), pixels")
    p.add_argument("--width", type=int, default=defaults.width, help="frame width, pixels (0: square)")
    p.add_argument("--duration", type=float, default=defaults.duration_s, help="clip length, seconds")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes")
    p.add_argument("--clips-per-scene", type=int, default=defaults.clips_per_scene,
                   help="clips sharing a background and object set (splits are by scene)")
    p.add_argument("--lossy-audio-prob", type=float, default=defaults.lossy_audio_prob,
                   help="probability of an AAC round trip per clip")
    p.add_argument("--reverb-prob", type=float, default=defaults.reverb_prob, help="probability of room reverb")
    p.add_argument("--noise", action=argparse.BooleanOptionalAction, default=defaults.noise,
                   help="diffuse background noise")
    p.add_argument("--max-distractors", type=int, default=defaults.max_distractors, help="silent objects per scene")
    p.add_argument("--two-source-prob", type=float, default=defaults.two_source_prob,
                   help="probability of two sounding objects in a scene")
    p.add_argument("--novel-look-prob", type=float, default=defaults.novel_look_prob,
                   help="probability that an object gets a random look instead of its class's (1: objects never seen)")
    p.add_argument("--novel-sound-prob", type=float, default=defaults.novel_sound_prob,
                   help="probability that a sounding object's sound comes from a family no class has (1: sounds never "
                        "heard)")
    p.add_argument("--clutter-prob", type=float, default=defaults.clutter_prob,
                   help="probability that a scene's backdrop holds static things at full contrast (1: cluttered "
                        "scenes)")
    p.add_argument("--sync-pulse", type=float, default=defaults.sync_pulse,
                   help="sounding objects grow by up to this fraction of their size with their sound's loudness")
    p.add_argument("--head-detail-prob", type=float, default=defaults.head_detail_prob,
                   help="probability that a binaural head gets pinna notches, an uneven response and a larger "
                        "low-frequency time difference (1: heads unlike flipray's sphere)")
    p.add_argument("--reflections", choices=REFLECTIONS, default=defaults.reflections,
                   help="early reflections of reverberant rooms: diffuse taps, or first-order image sources heard from "
                        "their directions")
    p.add_argument("--mics", default=",".join(defaults.mics),
                   help=f"capture setups drawn per clip, comma-separated from {','.join(MIC_TYPES)}")
    overrides.add_arguments(p, "SynthConfig")
    args = p.parse_args(argv)
    flags = dict(fps="fps", size="size", width="width", duration="duration_s", clips_per_scene="clips_per_scene",
                 lossy_audio_prob="lossy_audio_prob", reverb_prob="reverb_prob", noise="noise",
                 max_distractors="max_distractors", two_source_prob="two_source_prob", reflections="reflections",
                 novel_look_prob="novel_look_prob", novel_sound_prob="novel_sound_prob", sync_pulse="sync_pulse",
                 clutter_prob="clutter_prob", head_detail_prob="head_detail_prob")
    try:
        options = asdict(overrides.config_from_args(SynthConfig, args, p, flags))
        if args.mics != p.get_default("mics"):  # a list of any length, so not through the tuple rule of --set
            options = asdict(SynthConfig(**{**options, "mics": tuple(m.strip() for m in args.mics.split(",")
                                                                      if m.strip())}))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.clips < 1:
        p.error(f"--clips must be >= 1, got {args.clips}")
    start = time.time()
    rows = generate(args.out, args.clips, args.seed, workers=args.workers, progress=True, **options)
    splits = collections.Counter(row["split"] for row in rows)
    print(f"wrote {len(rows)} clips ({', '.join(f'{s} {splits[s]}' for s in ('train', 'val', 'test'))}) "
          f"to {Path(args.out) / 'manifest.jsonl'} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    with overrides.user_errors("flipray synth"):
        main()
