"""Ingest from an s3:// prefix of raw videos (flipray/dataset/sources.py) against moto's S3 server, through Ray tasks.

    .venv/bin/python -m pytest tests/test_sources.py -x -q
"""
from __future__ import annotations

import io
import os

import boto3
import numpy as np
import pytest
import soundfile as sf

from flipray.dataset import sources
from flipray.dataset.ingest import Options, folder_sources, main, run_ingest
from flipray.dataset.store import Store

SKIPPED = {"mono audio": "mono.mp4", "no audio stream": "silent.mp4", "unreadable": "corrupt.mp4",
           "empty file": "empty.mkv", "too short": "short.mp4"}


def upload_folder(folder, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(folder).as_posix()}")


@pytest.mark.slow
def test_an_s3_prefix_lists_like_the_folder(source_videos, bucket):
    folder, _ = source_videos
    upload_folder(folder, bucket, "raw/videos/")
    boto3.client("s3").put_object(Bucket=bucket, Key="raw/videos-old/cam_a.mp4", Body=b"not under the prefix")
    local, remote = folder_sources(folder), folder_sources(f"s3://{bucket}/raw/videos")  # no trailing slash
    assert [(s.name, s.scene_id) for s in remote] == [(s.name, s.scene_id) for s in local]
    assert [s.path for s in remote] == [f"s3://{bucket}/raw/videos/{s.name}" for s in local]
    with pytest.raises(FileNotFoundError, match="no videos"):
        folder_sources(f"s3://{bucket}/nothing-here/")


@pytest.mark.slow
def test_fetch_caches_by_etag_and_refetches_a_changed_object(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPRAY_SOURCE_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="raw/a.mp4", Body=b"first version")
    uri = f"s3://{bucket}/raw/a.mp4"
    first = sources.fetch(uri)
    assert open(first, "rb").read() == b"first version" and first.endswith(".mp4")
    os.utime(first, (1, 1))
    assert sources.fetch(uri) == first and os.stat(first).st_mtime == 1  # cached: not downloaded again
    s3.put_object(Bucket=bucket, Key="raw/a.mp4", Body=b"second version")
    second = sources.fetch(uri)
    assert second != first and open(second, "rb").read() == b"second version"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [os.path.basename(first), os.path.basename(second)])  # no partial downloads left behind
    assert sources.localize("/some/local/file.mp4") == "/some/local/file.mp4"
    with pytest.raises(ValueError, match="expected s3://bucket/prefix"):
        sources.split_uri("s3:///no-bucket")


@pytest.mark.slow
def test_ingest_from_an_s3_prefix(source_videos, bucket, ray_local, capsys):
    """The Ray tasks fetch their sources from S3 and make the same clips a folder gives; a re-run resumes."""
    folder, _ = source_videos
    upload_folder(folder, bucket, "raw/")
    out = f"s3://{bucket}/dataset"
    opts = Options(max_clips_per_source=1)
    report = run_ingest(out, videos=f"s3://{bucket}/raw/", opts=opts, progress=False)
    assert report["sources"] == 9 and report["clips_ingested"] == 4 and report["clips_skipped"] == {}
    assert {s["reason"]: s["source"] for s in report["skipped"]} == SKIPPED
    rows = Store(out).read_manifest()
    assert sorted(r["scene_id"] for r in rows) == sorted(s.scene_id for s in folder_sources(folder)
                                                         if s.name not in SKIPPED.values())
    cam = next(r for r in rows if r["scene_id"] == "cam_a")
    assert Store(out).get(cam["meta"]) and b'"file": "cam_a.mp4"' in Store(out).get(cam["meta"])
    audio, sr = sf.read(io.BytesIO(Store(out).get(cam["audio"])))
    assert sr == 16000 and audio.shape[1] == 2
    rms = np.sqrt((audio ** 2).mean(axis=0))
    assert rms[0] > 10 * rms[1]  # channel 0 (left) is still the loud one: nothing swapped on the way

    again = run_ingest(out, videos=f"s3://{bucket}/raw/", opts=opts, progress=False)
    assert again["clips_ingested"] == 0 and again["clips_existing"] == 4

    # the command line: --csv reads a local folder only
    with pytest.raises(ValueError, match="--csv reads the downloaded videos from a local folder"):
        main(["--csv", str(folder / "list.csv"), "--videos", f"s3://{bucket}/raw/", "--out", out])
