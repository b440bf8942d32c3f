"""Dataset manifests: one JSON line per clip, written last and atomically (see docs/clip-format.md).

A dataset is a root (a folder, or s3://bucket/prefix/ in the clip store) holding `clips/` and `manifest.jsonl`.
Splits are assigned per scene (source video), so no scene appears in two splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.jsonl"
REQUIRED_FIELDS = ("clip_id", "scene_id", "split", "duration_s", "fps", "num_frames", "sample_rate", "channels",
                   "video", "audio", "meta")


def assign_splits(scene_ids, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, str]:
    """Map each distinct scene id to 'train' / 'val' / 'test' in the given proportions.

    The order is a hash of (seed, scene id), so the assignment of a scene does not depend on which other scenes
    exist beyond the rounding of the proportions, and is the same on every machine.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    scenes = sorted(set(scene_ids), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(scenes)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:  # every split gets at least one scene once there are enough scenes
        n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
    out = {}
    for i, s in enumerate(scenes):
        out[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def write_manifest(root: str | os.PathLike, rows: list[dict]) -> Path:
    """Write `root/manifest.jsonl` atomically (temporary file in the same folder, then rename)."""
    root = Path(root)
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"manifest row {i} ({row.get('clip_id', '?')}) lacks fields {missing}")
        if row["split"] not in SPLITS:
            raise ValueError(f"manifest row {i} ({row['clip_id']}): split must be one of {SPLITS}, "
                             f"got {row['split']!r}")
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=root)
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    path = root / MANIFEST_NAME
    os.replace(tmp, path)
    return path


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> list[dict]:
    """Parse manifest text; `source` names the file in error messages."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{source}:{lineno}: clip {row.get('clip_id', '?')!r} lacks fields {missing}")
        rows.append(row)
    return rows


def read_manifest(root: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of a local dataset's manifest, optionally only one split. (S3 roots: `flipray.dataset.store`.)"""
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; a dataset root holds {MANIFEST_NAME} (written last by "
                                f"`flipray synth` or `flipray ingest`)")
    rows = parse_manifest(path.read_text(), str(path))
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rows = [r for r in rows if r["split"] == split]
    return rows
