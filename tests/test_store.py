"""The clip store (flipray/dataset/store.py) against a real S3 endpoint (moto's server): objects and checksums, the manifest
written last, idempotent uploads, an upload killed mid-way that resumes without duplicates, and the torchcodec
dataset reading an s3:// root.

    .venv/bin/python -m pytest tests/test_store.py -x -q
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import boto3
import pytest

from flipray.config import load_config
from flipray.pretext.data import ClipDataset, collate
from flipray.dataset.manifest import MANIFEST_NAME, REQUIRED_FIELDS
from flipray.dataset.store import ChecksumError, Store, sha256, upload_clip, upload_dataset

pytestmark = pytest.mark.slow  # every test uses moto's S3 server


@pytest.fixture(scope="module")
def synth_dataset(tmp_path_factory):
    """Six short synthetic clips (3 scenes) in a local folder: what `flipray synth` writes."""
    from flipray.synth import scenes as synth
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, 6, seed=3, workers=1, duration_s=4.0, size=64)
    return root


def keys(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.mark.parametrize("kind", ["s3", "folder"])
def test_objects_round_trip_with_checksums(kind, bucket, tmp_path):
    store = Store(f"s3://{bucket}/a/b" if kind == "s3" else tmp_path / "ds")
    assert store.checksum("clips/x.webm") is None and not store.exists("clips/x.webm")
    assert store.put_if_changed("clips/x.webm", b"video bytes") is True
    assert store.put_if_changed("clips/x.webm", b"video bytes") is False  # same checksum: not sent again
    assert store.get("clips/x.webm") == b"video bytes"
    assert store.checksum("clips/x.webm") == sha256(b"video bytes")
    assert store.put_if_changed("clips/x.webm", b"new bytes") is True
    assert store.get("clips/x.webm", expect_sha256=sha256(b"new bytes")) == b"new bytes"
    with pytest.raises(ChecksumError, match=r"x\.webm.*does not match"):
        store.get("clips/x.webm", expect_sha256=sha256(b"video bytes"))
    with pytest.raises(FileNotFoundError, match=r"clips/missing\.flac"):
        store.get("clips/missing.flac")
    assert store.list() == ["clips/x.webm"]
    with pytest.raises(FileNotFoundError, match="no manifest"):
        store.read_manifest()
    if kind == "s3":
        assert store.url("clips/x.webm") == f"s3://{bucket}/a/b/clips/x.webm"
        assert keys(bucket) == ["a/b/clips/x.webm"]


def test_manifest_validation_names_the_clip(bucket):
    store = Store(f"s3://{bucket}/ds")
    with pytest.raises(ValueError, match=r"c1.*lacks fields"):
        store.write_manifest([{"clip_id": "c1", "split": "train"}])
    assert not store.has_manifest()
    with pytest.raises(ValueError, match="must look like|s3://bucket"):
        Store("s3:///nobucket")


def test_the_check_before_a_job_names_a_missing_bucket(bucket):
    """Store.check_reachable, which ingest and the training and table jobs run first: a bucket that is there (empty
    here) passes; a missing one is one line naming the option and the endpoint (a dead endpoint: test_reliability)."""
    from flipray.overrides import UsageError
    Store(f"s3://{bucket}/ds").check_reachable("--out")
    Store(f"s3://{bucket}").check_reachable("--out")
    with pytest.raises(UsageError, match=r"^data\.root s3://no-such-flipray-bucket/ds: no bucket "
                                         r"'no-such-flipray-bucket' at http://127\.0\.0\.1:\d+$"):
        Store("s3://no-such-flipray-bucket/ds").check_reachable("data.root")


def test_upload_dataset_writes_checksummed_manifest_last_and_is_idempotent(synth_dataset, bucket):
    root = f"s3://{bucket}/synth"
    res = upload_dataset(synth_dataset, root)
    assert res == {"clips": 6, "clips_sent": 6, "sent": 18, "unchanged": 0, "manifest": f"{root}/{MANIFEST_NAME}"}
    rows = Store(root).read_manifest()
    local = {r["clip_id"]: r for r in map(json.loads, (synth_dataset / MANIFEST_NAME).read_text().splitlines())}
    assert sorted(r["clip_id"] for r in rows) == sorted(local)
    for row in rows:
        assert all(k in row for k in REQUIRED_FIELDS) and row["source"] == "synthetic"
        assert row["split"] == local[row["clip_id"]]["split"]
        video = (synth_dataset / row["video"]).read_bytes()
        assert Store(root).get(row["video"]) == video and row["video_sha256"] == sha256(video)
        assert row["audio_sha256"] == sha256((synth_dataset / row["audio"]).read_bytes())
        sidecar = json.loads(Store(root).get(row["meta"]))
        assert sidecar["video_sha256"] == row["video_sha256"] and sidecar["scene_id"] == row["scene_id"]
    assert len(keys(bucket)) == 3 * 6 + 1
    again = upload_dataset(synth_dataset, root)  # nothing changed: nothing sent
    assert again["sent"] == 0 and again["unchanged"] == 18
    assert Store(root).read_manifest() == rows


def test_killed_upload_resumes_without_duplicates_and_manifest_only_at_the_end(synth_dataset, bucket, tmp_path):
    """SIGKILL the uploading process after its 7th object: no manifest; a re-run sends only the other 11 objects."""
    root = f"s3://{bucket}/killed"
    script = tmp_path / "upload_then_die.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from flipray.dataset import store
        put, sent = store.Store.put, []
        def put_then_die(self, key, data, digest=None):
            if len(sent) == 7:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a crash or a lost node
            put(self, key, data, digest)
            sent.append(key)
        store.Store.put = put_then_die
        store.upload_dataset({str(synth_dataset)!r}, {root!r}, workers=1)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial = keys(bucket)
    assert len(partial) == 7 and f"killed/{MANIFEST_NAME}" not in partial
    with pytest.raises(FileNotFoundError, match="no manifest"):
        Store(root).read_manifest()

    res = upload_dataset(synth_dataset, root)
    assert res["sent"] == 18 - 7 and res["unchanged"] == 7
    final = keys(bucket)
    assert len(final) == len(set(final)) == 3 * 6 + 1 and set(partial) <= set(final)
    rows = Store(root).read_manifest()
    assert len({r["clip_id"] for r in rows}) == len(rows) == 6
    for row in rows:  # every object the manifest names is whole
        assert sha256(Store(root).get(row["video"])) == row["video_sha256"]


def test_runs_merging_into_one_s3_manifest_at_once_keep_every_clip(synth_dataset, bucket):
    """Another run's manifest lands between this run's read of the manifest and its write (two ingests or uploads
    into one root): the conditional PUT fails, this run merges again, and every clip of both stays listed; before,
    the last writer's manifest replaced the other's rows."""
    from flipray.dataset.manifest import read_manifest
    local = read_manifest(synth_dataset)

    class Overtaken(Store):
        """A store whose first manifest write is overtaken by another run's (`other` rows, merged)."""
        other: list = []

        def _put_manifest(self, data, condition):
            if self.other:
                Store(self.root).write_manifest(self.other, merge=True)
                self.other = []
            return super()._put_manifest(data, condition)

    for name, already in (("fresh", 0), ("grown", 1)):  # no manifest yet (IfNoneMatch) / one there (IfMatch)
        root = f"s3://{bucket}/{name}"
        rows = [upload_clip(Store(root), synth_dataset, row)[0] for row in local]  # every clip stored
        if already:
            Store(root).write_manifest(rows[:already])
        store = Overtaken(root)
        store.other = rows[3:]
        assert store.write_manifest(rows[already:3], merge=True) == f"{root}/{MANIFEST_NAME}"
        assert store.other == []  # the other run did write in between
        assert Store(root).read_manifest() == sorted(rows, key=lambda r: r["clip_id"])


def test_clip_dataset_reads_s3_root_and_skips_corrupt_objects(synth_dataset, bucket):
    root = f"s3://{bucket}/ds"
    upload_dataset(synth_dataset, root)
    cfg = load_config("demo", [f"data.root={root}", "data.cache=false", "train.pair_negatives=false"])  # item = clip
    train = Store(root).read_manifest("train")
    ds = ClipDataset(cfg, "train", train=True)
    assert [c["clip_id"] for c in ds.clips] == [c["clip_id"] for c in train]
    batch = collate([ds[(0, i)] for i in range(len(ds))])
    assert batch["skipped"] == 0
    crop = cfg.data.crop
    assert batch["video"].shape == (len(train), 6, 3, crop, crop) and batch["audio"].shape == (len(train), 2, 45920)
    assert batch["clip_id"] == [c["clip_id"] for c in train]

    # Replace one clip's video with other bytes: its checksum no longer matches, the clip is skipped and named.
    bad = train[0]
    Store(root).put(bad["video"], (synth_dataset / train[1]["video"]).read_bytes())
    batch = collate([ds[(0, i)] for i in range(len(ds))])
    assert batch["skipped"] == 1 and bad["clip_id"] not in batch["clip_id"]
    assert "does not match" in ds.skipped[bad["clip_id"]] and bad["video"] in ds.skipped[bad["clip_id"]]
