"""Dataset manifests: one JSON line per clip, written last and atomically (see docs/clip-format.md).

A dataset is a root (a folder, or s3://bucket/prefix/ in the clip store) holding `clips/` and `manifest.jsonl`.
Splits are assigned per scene (source video), so no scene appears in two splits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import PurePosixPath, Path

from flipray.atomic import folder_lock, write_bytes

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".manifest.lock"  # beside the manifest in a local root: see manifest_lock
REQUIRED_FIELDS = ("clip_id", "scene_id", "split", "duration_s", "fps", "num_frames", "sample_rate", "channels",
                   "video", "audio", "meta")
PATH_FIELDS = ("video", "audio", "meta")
NUMBER_FIELDS = ("duration_s", "fps", "num_frames", "sample_rate", "channels")
CLIP_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def relative_key(key, what: str = "path") -> str:
    """`key` if it is a relative path that stays inside its root (no `..`, not absolute), else ValueError: a path
    from a manifest or CSV must never reach outside the dataset (reading a credentials file into a bucket)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty string, got {key!r}")
    p = PurePosixPath(key)
    if p.is_absolute() or "\\" in key or ".." in p.parts or key.startswith("~") or re.match(r"^[A-Za-z]:", key):
        raise ValueError(f"{what} {key!r} must be a relative path inside the dataset root (no .., not absolute)")
    return key


def check_row(row, where: str) -> dict:
    """ValueError naming `where` (file:line) unless `row` is a well-formed manifest row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a manifest row is a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise ValueError(f"{where}: clip {row.get('clip_id', '?')!r} lacks fields {missing}")
    cid = row["clip_id"]
    if not isinstance(cid, str) or not CLIP_ID_RE.match(cid) or cid in (".", ".."):
        raise ValueError(f"{where}: clip_id must be letters, digits, _ . -, got {cid!r}")
    if not isinstance(row["scene_id"], str) or not row["scene_id"]:
        raise ValueError(f"{where}: clip {cid!r}: scene_id must be a non-empty string, got {row['scene_id']!r}")
    if row["split"] not in SPLITS:
        raise ValueError(f"{where}: clip {cid!r}: split must be one of {SPLITS}, got {row['split']!r}")
    for k in NUMBER_FIELDS:
        v = row[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{where}: clip {cid!r}: {k} must be a positive number, got {v!r}")
    for k in PATH_FIELDS:
        try:
            relative_key(row[k], k)
        except ValueError as e:
            raise ValueError(f"{where}: clip {cid!r}: {e}") from None
    return row


def check_rows(rows: list[dict], source: str, lines: list[int] | None = None) -> list[dict]:
    """check_row for every row, and no clip_id twice; errors name `source`:line (or row number)."""
    seen = {}
    for i, row in enumerate(rows):
        where = f"{source}:{lines[i]}" if lines else f"{source} row {i}"
        check_row(row, where)
        if row["clip_id"] in seen:
            raise ValueError(f"{where}: clip_id {row['clip_id']!r} repeats {seen[row['clip_id']]}")
        seen[row["clip_id"]] = where
    return rows


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """The rows of a dataset after adding `new` to `existing`: every existing clip stays (a source missing on a
    re-run never drops clips), a new row replaces an old one with its clip_id, and a scene keeps its split."""
    scene_split = {r["scene_id"]: r["split"] for r in existing}
    merged = {r["clip_id"]: r for r in existing}
    for r in new:
        merged[r["clip_id"]] = {**r, "split": scene_split.get(r["scene_id"], r["split"])}
    return [merged[k] for k in sorted(merged)]


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
    check_rows(rows, "manifest")
    path = root / MANIFEST_NAME
    write_bytes(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())
    return path


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> list[dict]:
    """Parse and check manifest text (types, paths inside the root, no clip_id twice); errors name `source`:line."""
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        rows.append(row)
        lines.append(lineno)
    return check_rows(rows, source, lines)


def manifest_lock(root: str | os.PathLike):
    """Hold a local dataset root's write lock (`ROOT/.manifest.lock`) for the block (a context manager).

    Every run that writes a manifest after reading it (synth plans from it and writes it at its end; ingest and
    uploads merge into it) does so under this lock, so two runs into one folder cannot drop each other's clips: the
    second waits (one line on stderr says for whom) and then sees the first's manifest. (S3 roots have no lock:
    `flipray.dataset.store.Store.write_manifest` uses conditional writes.)"""
    def wait(holder: str) -> None:
        print(f"{root}: another process is writing this dataset (pid {holder}); waiting for it to finish",
              file=sys.stderr, flush=True)
    return folder_lock(root, LOCK_NAME, busy=wait)


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
