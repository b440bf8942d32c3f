"""Synthetic 360-degree scenes with first-order ambisonics: training data for the rotate task and DOA sets.

    flipray synth360 --out data/synth360 --clips 600 --seed 0                 # 10-s clips, 512x256 panoramas
    flipray synth360 --out data/synth360-demo --clips 600 --seed 0 --height 128 --duration 6
    flipray synth360 --out data/doa --doa --per-direction 20 --seed 1 --duration 3 --height 128   # 36 directions

A scene is an equirectangular panorama (a seamless backdrop: sky, horizon, ground) with objects of the classes of
flipray/synth/scenes.py drawn at (azimuth, elevation), and what a first-order ambisonics microphone at the camera hears:
every sounding object's sound (synth.py's sound families) encoded in ACN/SN3D from its direction sample by sample,
so moving sources move, plus optional reverberation (early reflections from random directions and an isotropic
diffuse tail) and diffuse background noise. Objects stand still, orbit (azimuth drifts, wrapping around the seam)
or wander (azimuth and elevation drift). One or two sounding objects, up to three silent distractors (some look like
sounding classes), so the network has to match the sound to the object.

Conventions (flipray/foa.py): azimuth counter-clockwise from the front, 90 deg = left (TAU/DCASE); elevation up;
audio channels ACN W, Y, Z, X with SN3D; the panorama's centre column is the front and azimuth grows to the left.

--doa writes a direction-of-arrival set like the TAU Spatial Sound data (36 directions every 10 deg): one static
sounding object per clip, on the azimuth grid, elevation drawn in --doa-elevation; clip i faces direction i mod 36 and
the splits are stratified by direction (every direction in every split), with the label in the sidecar's `doa`.

Files: the clip contract (docs/clip-format.md): clips/<id>.webm (VP9, W x H = 2H x H, keyframe every second),
clips/<id>.flac (16 kHz, 4 channels, 16-bit), clips/<id>.json (per-frame azimuth/elevation/boxes of every object),
manifest.jsonl written last (flipray.dataset.manifest). Deterministic from the seed, whatever --workers is.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom
from scipy.signal import fftconvolve

from flipray import foa, media, overrides
from flipray.atomic import write_bytes
from flipray.overrides import UsageError
from flipray.dataset.manifest import SPLITS, assign_splits, manifest_lock, write_manifest
from flipray.synth.scenes import (SILENT_CLASSES, SOUNDING_CLASSES, make_clips, room_tails,
                                  source_signal, sprite)

MOTIONS = ("static", "orbit", "wander")


@dataclass
class Synth360Config:
    """Every knob of the 360 generator; (lo, hi) pairs are uniform ranges drawn per scene or per clip."""
    duration_s: float = 10.0
    fps: int = 6
    height: int = 256                  # panorama height in pixels; width = 2 * height (512 x 256)
    sample_rate: int = 16000
    clips_per_scene: int = 2           # clips sharing a backdrop and object set (splits are by scene)
    two_source_prob: float = 0.25
    max_distractors: int = 3           # silent objects per scene: 0..max, each count half as likely as the one before
    lookalike_prob: float = 0.2        # a distractor looks like a sounding class (and stays silent)
    object_deg: tuple = (20.0, 45.0)   # object width in degrees of azimuth; height = width * 0.8-1.25
    elevation_deg: tuple = (-35.0, 35.0)  # where object centres start
    motion_probs: tuple = (0.4, 0.4, 0.2)  # static, orbit, wander
    speed_deg_s: tuple = (8.0, 40.0)   # angular speed of orbiting / wandering objects
    source_level_db: tuple = (-10.0, 0.0)
    spectral_tilt_db_per_octave: tuple = (-3.0, 3.0)
    reverb_prob: float = 0.5
    rt60_s: tuple = (0.1, 0.6)
    drr_db: tuple = (3.0, 15.0)        # direct-to-diffuse energy ratio of the tail (W channel)
    reflections: int = 4               # early reflections per source, each from a random direction
    reflection_gain_db: tuple = (-14.0, -6.0)
    noise: bool = True                 # isotropic diffuse background noise
    snr_db: tuple = (10.0, 35.0)
    peak: tuple = (0.5, 0.95)
    # DOA sets (--doa): one static sounding object per clip on an azimuth grid
    doa: bool = False
    doa_step_deg: float = 10.0         # 36 directions, as the TAU Spatial Sound set
    doa_elevation_deg: tuple = (-20.0, 20.0)

    def __post_init__(self):
        if self.duration_s < 1 or self.fps <= 0 or self.clips_per_scene < 1 or self.max_distractors < 0:
            raise UsageError("duration_s must be >= 1, fps positive, clips_per_scene >= 1, max_distractors >= 0")
        if self.height < 32 or self.height % 2:
            raise UsageError(f"height must be an even number of pixels >= 32 (yuv420p), got {self.height}")
        if not 0 < self.doa_step_deg <= 180 or abs(360 / self.doa_step_deg - round(360 / self.doa_step_deg)) > 1e-9:
            raise UsageError(f"doa_step_deg must divide 360, got {self.doa_step_deg}")
        for name in ("two_source_prob", "lookalike_prob", "reverb_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} must be a probability, got {getattr(self, name)}")

    @property
    def width(self) -> int:
        return 2 * self.height

    @property
    def directions(self) -> int:
        return round(360 / self.doa_step_deg)


# ----------------------------------------------------------------------------------------------------------------------
# Pictures

def _panorama_background(rng, height):
    """A seamless equirectangular backdrop (H, 2H, 3) uint8: sky above a horizon, ground below, both textured with
    colour cells that wrap around the seam, plus faint grain; muted so the objects stand out."""
    width = 2 * height
    sky, ground = rng.uniform(60, 220, 3), rng.uniform(40, 180, 3)
    el = 90 - 180 * (np.arange(height) + 0.5) / height
    horizon = rng.uniform(-15, 10)
    mix = 1 / (1 + np.exp(-(el - horizon) / rng.uniform(2, 10)))  # 1 = sky
    img = np.broadcast_to((mix[:, None] * sky + (1 - mix[:, None]) * ground)[:, None, :], (height, width, 3))
    cells = int(rng.integers(3, 9))
    tex = zoom(rng.uniform(-40, 40, (cells, 2 * cells, 3)), (height / cells, width / (2 * cells), 1), order=3,
               mode="grid-wrap")[:height, :width]
    phase = rng.uniform(0, 2 * np.pi)
    ridges = 12 * np.sin(2 * np.pi * int(rng.integers(2, 9)) * np.arange(width) / width + phase)  # periodic: seamless
    grain = zoom(rng.normal(0, 8, (height // 4, width // 4, 3)), (height / (height // 4), width / (width // 4), 1),
                 order=1, mode="grid-wrap")
    img = img + tex + (ridges[None, :, None] * (1 - mix[:, None, None])) + grain
    grey = img.mean(-1, keepdims=True)
    img = 128 + 0.7 * (grey - 128) + 0.5 * (img - grey)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_object(frame, rgb, cover, azimuth_deg, elevation_deg):
    """Paste a sprite (premultiplied rgb (h, w, 3), coverage (h, w, 1)) centred at (azimuth, elevation) into an
    equirectangular frame (H, 2H, 3) in place, wrapping around the seam; returns its box [x0, y0, x1, y1] (x0 in
    [0, W), x1 may exceed W when the box wraps)."""
    height, width = frame.shape[:2]
    h, w = cover.shape[:2]
    x0 = int(math.floor(foa.panorama_column(azimuth_deg, width) - w / 2 + 0.5)) % width
    y0 = int(np.clip(math.floor(foa.panorama_row(elevation_deg, height) - h / 2 + 0.5), 0, height - h))
    cols = (x0 + np.arange(w)) % width
    region = frame[y0:y0 + h, cols].astype(float)
    frame[y0:y0 + h, cols] = np.clip(region * (1 - cover) + rgb, 0, 255).astype(np.uint8)
    return [x0, y0, x0 + w, y0 + h]


def _track(obj, t):
    """(azimuth, elevation) degrees of an object at times t (s): azimuth drifts and wraps, elevation bounces
    between the object's limits."""
    az = foa.wrap_deg(obj["az0"] + obj["az_speed"] * t)
    lo, hi = obj["el_lo"], obj["el_hi"]
    span = max(hi - lo, 1e-9)
    u = (obj["el0"] - lo + obj["el_speed"] * t) % (2 * span)
    return az, lo + span - np.abs(u - span)


# ----------------------------------------------------------------------------------------------------------------------
# Sound

def _diffuse_foa(rng, n):
    """(4, n) isotropic diffuse FOA of independent unit-variance-W noise: X, Y, Z carry a third of W's energy each
    (SN3D), and no direction on average (the intensity vector averages to zero)."""
    scale = np.array([1.0, 1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)])[:, None]
    return rng.standard_normal((4, n)) * scale


def _foa_room(rng, sr, rt60, drr_db):
    """Diffuse reverberation tails (4, L) in FOA: four independent decaying-noise tails from synth.py's room model
    (pre-delay, frequency-dependent decay), W at 10^(-drr/10) of the direct energy, X/Y/Z at a third of that."""
    pairs = [room_tails(rng, sr, rt60, drr_db)[0] for _ in range(2)]  # each (2, L): two rooms' pre-delays differ
    tails = np.zeros((4, max(pair.shape[-1] for pair in pairs)))
    tails[:2, :pairs[0].shape[-1]], tails[2:, :pairs[1].shape[-1]] = pairs
    return tails * np.array([1.0, 1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)])[:, None]


def _reflections(rng, mono, azimuth, elevation, cfg: Synth360Config, sr):
    """Early reflections (4, n) of one source: delayed (2-25 ms), attenuated copies from random directions, one of them
    a floor bounce below the source (a fixed direction each: reflections of moving sources do not move)."""
    n, out = len(mono), np.zeros((4, len(mono)))
    az0, el0 = float(np.atleast_1d(azimuth)[0]), float(np.atleast_1d(elevation)[0])
    for i in range(cfg.reflections):
        delay = int(rng.uniform(0.002, 0.025) * sr)
        gain = 10 ** (rng.uniform(*cfg.reflection_gain_db) / 20)
        az, el = (az0, -abs(el0) - rng.uniform(10, 40)) if i == 0 else (rng.uniform(-180, 180), rng.uniform(-40, 60))
        out[:, delay:] += gain * foa.encode(mono[:n - delay], az, el)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# One clip

def make_clip(out_dir, cfg: Synth360Config, seed: int, scene: int, k: int) -> dict:
    """Write clip k of scene `scene` (webm, flac, json) under out_dir/clips/ and return its manifest row (no split).
    In DOA mode scene i is one clip facing direction i mod cfg.directions."""
    H, W, sr, fps = cfg.height, cfg.width, cfg.sample_rate, cfg.fps
    n, num_frames = round(cfg.duration_s * sr), round(cfg.duration_s * fps)
    scene_id, clip_id = f"p{scene:06d}", f"p{scene:06d}_c{k}"

    srng = np.random.default_rng([seed, scene])
    background = _panorama_background(srng, H)
    n_sounding = 1 if cfg.doa else 2 if srng.random() < cfg.two_source_prob else 1
    classes = list(srng.choice(list(SOUNDING_CLASSES), n_sounding, replace=False))
    weights = 0.5 ** np.arange(cfg.max_distractors + 1)
    for _ in range(srng.choice(cfg.max_distractors + 1, p=weights / weights.sum())):
        kinds = SOUNDING_CLASSES if srng.random() < cfg.lookalike_prob else SILENT_CLASSES
        classes.append(srng.choice(list(kinds)))
    objects = []
    for i, cls in enumerate(classes):
        family, look = {**SOUNDING_CLASSES, **SILENT_CLASSES}[cls]
        w = max(int(srng.uniform(*cfg.object_deg) / 360 * W), 4)
        h = min(max(int(w * srng.uniform(0.8, 1.25)), 4), H // 2)
        rgb, cover = sprite(look, w, h, srng)
        objects.append(dict(id=i, cls=str(cls), family=family, sounding=i < n_sounding, w=w, h=h, rgb=rgb, cover=cover))

    rng = np.random.default_rng([seed, scene, k])
    doa = None
    for obj in objects:
        margin = 90 * obj["h"] / H  # keep the sprite inside the picture vertically
        obj["el_lo"], obj["el_hi"] = max(cfg.elevation_deg[0], -90 + margin), min(cfg.elevation_deg[1], 90 - margin)
        obj["az0"], obj["el0"] = rng.uniform(-180, 180), rng.uniform(obj["el_lo"], obj["el_hi"])
        obj["motion"] = str(rng.choice(MOTIONS, p=np.array(cfg.motion_probs) / sum(cfg.motion_probs)))
        speed = rng.uniform(*cfg.speed_deg_s) * rng.choice([-1, 1])
        obj["az_speed"] = 0.0 if obj["motion"] == "static" else speed
        obj["el_speed"] = abs(speed) * rng.uniform(0.3, 0.7) if obj["motion"] == "wander" else 0.0
    if cfg.doa:  # the sounding object sits on the azimuth grid and stays there
        target = objects[0]
        direction = scene % cfg.directions
        target.update(motion="static", az_speed=0.0, el_speed=0.0, az0=foa.wrap_deg(direction * cfg.doa_step_deg),
                      el0=float(np.clip(rng.uniform(*cfg.doa_elevation_deg), target["el_lo"], target["el_hi"])))
        doa = {"class": int(direction), "step_deg": cfg.doa_step_deg, "azimuth_deg": round(float(target["az0"]), 3),
               "elevation_deg": round(float(target["el0"]), 3)}

    # Audio: each sounding object encoded along its track, then reflections, diffuse tail, noise, level.
    t = np.arange(n) / sr
    audio, dry = np.zeros((4, n)), np.zeros(n)
    render = {"rt60_s": None, "snr_db": None}
    reverb = rng.random() < cfg.reverb_prob
    for obj in objects:
        if obj["sounding"]:
            obj["level_db"] = rng.uniform(*cfg.source_level_db)
            mono = source_signal(obj["family"], n, sr, rng, rng.uniform(*cfg.spectral_tilt_db_per_octave))
            mono *= 10 ** (obj["level_db"] / 20)
            az, el = _track(obj, t)
            audio += foa.encode(mono, az, el)
            if reverb:
                audio += _reflections(rng, mono, az, el, cfg, sr)
            dry += mono
    if reverb:
        rt60, drr = rng.uniform(*cfg.rt60_s), rng.uniform(*cfg.drr_db)
        tails = _foa_room(rng, sr, rt60, drr)
        audio = audio + np.stack([fftconvolve(dry, tail)[:n] for tail in tails])
        render.update(rt60_s=round(rt60, 3), drr_db=round(drr, 2), reflections=cfg.reflections)
    if cfg.noise:
        snr = rng.uniform(*cfg.snr_db)
        noise = _diffuse_foa(rng, n)
        audio = audio + noise * math.sqrt(np.mean(audio[0] ** 2) / np.mean(noise[0] ** 2) * 10 ** (-snr / 10))
        render["snr_db"] = round(snr, 2)
    peak = rng.uniform(*cfg.peak)
    audio *= peak / max(np.abs(audio).max(), 1e-9)  # one gain for all channels: the direction lives in their ratios
    render["peak"] = round(peak, 3)

    # Video: backdrop, then objects from the last to the first, so distractors never hide a sounding object.
    frames = np.repeat(background[None], num_frames, axis=0)
    times = np.arange(num_frames) / fps
    for obj in reversed(objects):
        obj["az"], obj["el"] = _track(obj, times)
        obj["boxes"] = [draw_object(frame, obj["rgb"], obj["cover"], a, e)
                        for frame, a, e in zip(frames, obj["az"], obj["el"])]
    clips_dir = Path(out_dir) / "clips"
    media.write_vp9(clips_dir / f"{clip_id}.webm", frames, fps)
    media.write_flac(clips_dir / f"{clip_id}.flac", audio, sr)

    sidecar = {
        "clip_id": clip_id, "scene_id": scene_id, "source": "synthetic-360", "duration_s": cfg.duration_s,
        "fps": fps, "num_frames": num_frames, "width": W, "height": H, "sample_rate": sr, "channels": 4,
        "conventions": foa.CONVENTIONS,
        "camera": {"projection": "equirectangular", "hfov_deg": 360.0}, "render": render,
        "objects": [{"id": o["id"], "class": o["cls"], "family": o["family"], "sounding": o["sounding"],
                     "motion": o["motion"], "boxes": o["boxes"], "azimuth_deg": np.round(o["az"], 2).tolist(),
                     "elevation_deg": np.round(o["el"], 2).tolist(),
                     "level_db": round(o["level_db"], 2) if o["sounding"] else None} for o in objects],
        "generator": {"seed": seed, "scene": scene, "clip": k, "config": asdict(cfg)},
    }
    if doa is not None:
        sidecar["doa"] = doa
    write_bytes(clips_dir / f"{clip_id}.json", json.dumps(sidecar).encode())
    row = {"clip_id": clip_id, "scene_id": scene_id, "duration_s": cfg.duration_s, "fps": fps,
           "num_frames": num_frames, "sample_rate": sr, "channels": 4, "video": f"clips/{clip_id}.webm",
           "audio": f"clips/{clip_id}.flac", "meta": f"clips/{clip_id}.json"}
    return row | ({"doa_class": doa["class"]} if doa else {})


def _make_clip_task(task):
    return make_clip(*task)


def doa_splits(rows: list[dict], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, str]:
    """Splits of a DOA set stratified by direction: every direction's clips shuffled (seeded) and cut 80/10/10, at
    least one clip per direction in val and test when it has three or more."""
    by_class = collections.defaultdict(list)
    for row in rows:
        by_class[row["doa_class"]].append(row["clip_id"])
    out = {}
    for c, ids in sorted(by_class.items()):
        ids = sorted(ids)
        order = np.random.default_rng([seed, 360, c]).permutation(len(ids))
        n_val, n_test = round(len(ids) * fractions[1]), round(len(ids) * fractions[2])
        if len(ids) >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        for rank, i in enumerate(order):
            out[ids[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def generate(out_dir, clips: int, seed: int = 0, workers: int | None = None, progress: bool = False,
             **options) -> list[dict]:
    """Write `clips` clips and then manifest.jsonl under out_dir; return the manifest rows in clip_id order.
    options are Synth360Config fields (doa=True: one clip per scene, direction = scene mod directions)."""
    cfg = Synth360Config(**options)
    if clips < 1:
        raise UsageError(f"clips must be >= 1, got {clips}")
    per_scene = 1 if cfg.doa else cfg.clips_per_scene
    with manifest_lock(out_dir):  # planned from the manifest, written at the end: alone in out_dir meanwhile
        rows = make_clips(_make_clip_task, out_dir, seed, cfg, clips, per_scene, workers, progress, "synth360")
        if cfg.doa:
            splits = doa_splits(rows, seed)
            for row in rows:
                row["split"] = splits[row["clip_id"]]
        else:
            splits = assign_splits([row["scene_id"] for row in rows], seed=seed)
            for row in rows:
                row["split"] = splits[row["scene_id"]]
        write_manifest(out_dir, rows)
    return rows


def main(argv=None):
    d = Synth360Config()
    p = argparse.ArgumentParser(prog="flipray synth360", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root to write clips/ and manifest.jsonl into")
    p.add_argument("--clips", type=int, default=0, help="number of clips (DOA sets: or --per-direction)")
    p.add_argument("--seed", type=int, required=True, help="same seed, same dataset")
    p.add_argument("--height", type=int, default=d.height, help="panorama height; width = 2 x height")
    p.add_argument("--fps", type=int, choices=(6, 30), default=d.fps)
    p.add_argument("--duration", type=float, default=d.duration_s, help="clip length, seconds")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes")
    p.add_argument("--clips-per-scene", type=int, default=d.clips_per_scene)
    p.add_argument("--reverb-prob", type=float, default=d.reverb_prob, help="probability of room reverberation")
    p.add_argument("--noise", action=argparse.BooleanOptionalAction, default=d.noise, help="diffuse noise")
    p.add_argument("--max-distractors", type=int, default=d.max_distractors)
    p.add_argument("--doa", action="store_true", help="a DOA set: one static source per clip on an azimuth grid")
    p.add_argument("--per-direction", type=int, default=0, help="DOA sets: clips per direction (sets --clips)")
    p.add_argument("--doa-step", type=float, default=d.doa_step_deg, help="DOA grid step, degrees (divides 360)")
    overrides.add_arguments(p, "Synth360Config")
    args = p.parse_args(argv)
    flags = dict(height="height", fps="fps", duration="duration_s", clips_per_scene="clips_per_scene",
                 reverb_prob="reverb_prob", noise="noise", max_distractors="max_distractors", doa="doa",
                 doa_step="doa_step_deg")
    try:
        cfg = overrides.config_from_args(Synth360Config, args, p, flags)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    options = asdict(cfg)
    clips = args.per_direction * cfg.directions if args.doa and args.per_direction else args.clips
    if clips < 1:
        p.error("give --clips N (or, with --doa, --per-direction N)")
    start = time.time()
    rows = generate(args.out, clips, args.seed, workers=args.workers, progress=True, **options)
    splits = collections.Counter(row["split"] for row in rows)
    print(f"wrote {len(rows)} clips ({', '.join(f'{s} {splits[s]}' for s in SPLITS)}) to "
          f"{Path(args.out) / 'manifest.jsonl'} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    with overrides.user_errors("flipray synth360"):
        main()
