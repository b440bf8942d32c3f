"""The clip store: a dataset on S3 (`s3://bucket/prefix/`) or in a local folder, with the same layout.

    flipray ingest --dataset data/synth --out s3://my-bucket/synth-v1/    # upload a local dataset (resumable)
    python -c "from flipray.dataset.store import Store; print(len(Store('s3://my-bucket/synth-v1').read_manifest()))"

Layout (docs/clip-format.md): one object per file, `clips/<clip_id>.webm|.flac|.json`, and `manifest.jsonl` at the
root, written last. Why one object per file rather than tar shards: a training sample reads one 2.87-s window of one
clip in a new random order every epoch, so it wants random access to single clips; a clip (0.2-0.6 MB of VP9 + FLAC
for 10 s at 256 px, 6 fps) is large enough that two GETs per sample cost little (S3 GETs are $0.0004 per 1,000, so
1M samples = 2M GETs = $0.80) and small enough to fetch whole; and the same keys work as local paths, as `s3://` URLs
for DALI's readers and as bytes for `fn.decoders.*`. Tar shards pay off for many small objects read in sequence;
here they would force shard-level shuffling and reading a whole shard for one window.

Credentials, region and endpoint come from boto3's standard chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... in the
environment, or an instance role); this module names none.

Uploads are idempotent: every object carries its sha256 in its metadata, and an object already there with the same
checksum is not sent again, so re-running an interrupted upload sends only what is missing. A clip's sidecar goes
up after its video and audio, and the manifest after every clip, so a half-finished upload is never read as a
dataset (S3 PUTs are atomic: an object is either whole or absent).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flipray.atomic import write_bytes
from flipray.dataset.manifest import (MANIFEST_NAME, PATH_FIELDS, SPLITS, check_rows, manifest_lock, merge_rows,
                                      parse_manifest, relative_key, write_manifest)

log = logging.getLogger(__name__)
_CLIENT_LOCK = threading.Lock()
_MERGE_TRIES = 8  # conditional manifest writes before giving up (each try follows another run's write)

class ChecksumError(ValueError):
    """An object's bytes do not match the sha256 the manifest recorded for it."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_s3(root: str | os.PathLike) -> bool:
    return str(root).startswith("s3://")


class Store:
    """A dataset root: `s3://bucket/prefix` or a local folder. Keys are paths relative to the root (`clips/a.webm`).

    The S3 client is created lazily, so a Store can be pickled into Ray tasks and DALI's spawned workers.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/")
        if is_s3(self.root):
            bucket, _, prefix = self.root[len("s3://"):].partition("/")
            if not bucket:
                raise ValueError(f"{root!r}: an S3 root looks like s3://bucket/prefix")
            self.bucket, self.prefix = bucket, prefix.strip("/")
        else:
            self.bucket = self.prefix = None
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def s3(self) -> bool:
        return self.bucket is not None

    @property
    def client(self):
        with _CLIENT_LOCK:  # boto3 clients are thread-safe once made, their creation is not
            if self._client is None:
                import boto3
                from botocore.config import Config
                # boto3 reads AWS_ENDPOINT_URL / credentials / region from the environment; adaptive retries ride
                # out S3's 503 SlowDown when many workers read at once.
                self._client = boto3.session.Session().client(
                    "s3", config=Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32))
            return self._client

    def check_reachable(self, option: str) -> None:
        """For an S3 root, one short request before a job starts (a listing of the root, as the jobs make: 5-s
        connect time-out, one retry): an endpoint that does not answer, a missing bucket or credentials without
        access are one line, a UsageError naming `option`, instead of every clip failing after minutes of retries.
        A local root has nothing to check."""
        if not self.s3:
            return
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        from flipray.overrides import UsageError
        client = boto3.session.Session().client("s3", config=Config(
            connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 2, "mode": "standard"}))
        where = f"{option} {self.root}"
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("404", "NoSuchBucket"):
                raise UsageError(f"{where}: no bucket {self.bucket!r} at {client.meta.endpoint_url}") from None
            if code in ("403", "AccessDenied"):
                raise UsageError(f"{where}: access to bucket {self.bucket!r} denied at {client.meta.endpoint_url} "
                                 f"(credentials: the AWS_* environment, a profile or an instance role)") from None
            raise
        except NoCredentialsError:
            raise UsageError(f"{where}: no AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile "
                             f"or an instance role)") from None
        except BotoCoreError as e:  # no answer: connection refused, time-out, a name that does not resolve
            raise UsageError(f"{where}: cannot reach S3 at {client.meta.endpoint_url} ({e})") from None

    def _key(self, key: str) -> str:
        if key:  # "" is the root itself (list everything); any other key stays under the root
            relative_key(key, "key")
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        """Where `key` lives: an s3:// URL (DALI readers take these) or a local path."""
        if key:
            relative_key(key, "key")
        return f"s3://{self.bucket}/{self._key(key)}" if self.s3 else str(Path(self.root) / key)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # -- objects --------------------------------------------------------------------------------------------------

    def get(self, key: str, expect_sha256: str | None = None) -> bytes:
        """The bytes of `key`. FileNotFoundError naming its URL when it is absent; ChecksumError when
        `expect_sha256` is given and the bytes do not match it (a corrupt or replaced object)."""
        data = self._get(key)
        if expect_sha256 and sha256(data) != expect_sha256:
            raise ChecksumError(f"{self.url(key)}: sha256 {sha256(data)[:12]}... does not match the manifest's "
                                f"{expect_sha256[:12]}... (corrupt or replaced object)")
        return data

    def _get(self, key: str) -> bytes:
        if not self.s3:
            try:
                return Path(self.url(key)).read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.url(key)}: no such file") from None
        from botocore.exceptions import ClientError
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)}: no such object") from None
            raise

    def checksum(self, key: str) -> str | None:
        """sha256 of the stored object (from its metadata on S3, computed locally), or None when it is absent."""
        if not self.s3:
            path = Path(self.url(key))
            return sha256(path.read_bytes()) if path.is_file() else None
        from botocore.exceptions import ClientError
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return head.get("Metadata", {}).get("sha256", "")  # "" = present but uploaded without a checksum

    def exists(self, key: str) -> bool:
        return self.checksum(key) is not None

    def put(self, key: str, data: bytes, digest: str | None = None) -> None:
        """Write `key` atomically (S3 PUT; local: temporary file + rename), its sha256 kept in S3 metadata."""
        digest = digest or sha256(data)
        if self.s3:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": digest})
            return
        path = Path(self.url(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)  # complete or absent, and readable by others as a plain open() would make it

    def put_if_changed(self, key: str, data: bytes) -> bool:
        """Upload unless an object with the same sha256 is already there; True when it was sent."""
        digest = sha256(data)
        if self.checksum(key) == digest:
            return False
        self.put(key, data, digest)
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, relative to the root, sorted."""
        if not self.s3:
            base = Path(self.root)
            return sorted(str(p.relative_to(base)) for p in (base / prefix).rglob("*") if p.is_file()) \
                if (base / prefix).exists() else []
        keys, full = [], self._key(prefix)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                keys.append(obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"])
        return sorted(keys)

    def delete(self, key: str) -> None:
        if self.s3:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        else:
            Path(self.url(key)).unlink(missing_ok=True)

    # -- manifest -------------------------------------------------------------------------------------------------

    def has_manifest(self) -> bool:
        return self.exists(MANIFEST_NAME)

    def read_manifest(self, split: str | None = None) -> list[dict]:
        """Rows of the dataset's manifest (optionally one split); FileNotFoundError when there is none yet."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        try:
            text = self.get(MANIFEST_NAME).decode()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(MANIFEST_NAME)}: no manifest; a dataset is complete only once "
                                    f"`flipray ingest` (or `flipray synth`) has written it last") from None
        rows = parse_manifest(text, self.url(MANIFEST_NAME))
        return rows if split is None else [r for r in rows if r["split"] == split]

    def write_manifest(self, rows: list[dict], merge: bool = False) -> str:
        """Validate and write the manifest (the last write of an upload); returns its URL. With `merge`, the rows of
        the manifest already there whose clips are still stored are kept (manifest.merge_rows): a dataset only grows,
        also when two runs write into it at once: a local root merges under its lock (manifest.manifest_lock), an S3
        root by a conditional PUT that only replaces the manifest it merged with, merging again if another run's
        came in between."""
        check_rows(rows, f"{self.root}: new manifest")
        if not self.s3:
            with manifest_lock(self.root):
                if merge and self.has_manifest():
                    rows = self._merged(self.read_manifest(), rows)
                return str(write_manifest(self.root, rows))
        for _ in range(_MERGE_TRIES):
            text, condition = None, {}
            if merge:  # replace only the manifest merged with (or create it, if there was none)
                text, etag = self._get_manifest_text()
                condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            merged = self._merged(parse_manifest(text, self.url(MANIFEST_NAME)), rows) if text else rows
            with tempfile.TemporaryDirectory() as tmp:  # flipray.dataset.manifest validates and serialises
                data = write_manifest(tmp, merged).read_bytes()
            if self._put_manifest(data, condition):
                return self.url(MANIFEST_NAME)
            log.info("%s: another run wrote the manifest meanwhile; merging with it again", self.url(MANIFEST_NAME))
        raise RuntimeError(f"{self.url(MANIFEST_NAME)}: another writer replaced the manifest {_MERGE_TRIES} times "
                           f"while this run merged into it; nothing lost, run this again to list its clips")

    def _merged(self, existing: list[dict], rows: list[dict]) -> list[dict]:
        """`rows` merged into the `existing` manifest's rows whose clip files are all still stored."""
        stored = set(self.list("clips/"))
        old = [r for r in existing if all(r[k] in stored for k in PATH_FIELDS)]
        if len(existing) > len(old):
            log.warning("%s: %d manifest rows dropped: their clip files are no longer stored", self.root,
                        len(existing) - len(old))
        return merge_rows(old, rows)

    def _get_manifest_text(self) -> tuple[str | None, str | None]:
        """(text, ETag) of the S3 manifest, (None, None) when there is none."""
        from botocore.exceptions import ClientError
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(MANIFEST_NAME))
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None, None
            raise
        return obj["Body"].read().decode(), obj["ETag"]

    def _put_manifest(self, data: bytes, condition: dict) -> bool:
        """PUT the S3 manifest under `condition` (IfMatch / IfNoneMatch, or none); False when another writer got
        there first (412 / 409)."""
        from botocore.exceptions import ClientError
        args = dict(Bucket=self.bucket, Key=self._key(MANIFEST_NAME), Body=data, Metadata={"sha256": sha256(data)})
        try:
            self.client.put_object(**args, **condition)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code != "NotImplemented" or not condition:
                raise
            # an S3-compatible store without conditional writes (S3 itself has them since 2024-11)
            log.warning("%s: this store has no conditional writes; two runs merging at once could drop each "
                        "other's rows", self.url(MANIFEST_NAME))
            self.client.put_object(**args)
        return True


def read_manifest(root: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Manifest rows of a dataset root, local or s3://."""
    return Store(root).read_manifest(split)


def dataset_rows(root: str | os.PathLike, option: str) -> list[dict]:
    """Manifest rows of the dataset root a command's option names (`--data`, `data.root`), or a UsageError
    `OPTION: why` (no manifest there, or one that does not parse): one line before a job starts anything."""
    from flipray.overrides import UsageError
    store = Store(root)
    store.check_reachable(option)
    try:
        return store.read_manifest()
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{option}: {e}") from None


def require_splits(rows: list[dict], splits, option: str, root, purpose: str) -> None:
    """A UsageError `OPTION: ROOT has no clips in split 'test' ({'train': 7}); PURPOSE` unless every split in
    `splits` has rows (dataset_rows' rows)."""
    from flipray.overrides import UsageError
    counts = collections.Counter(row["split"] for row in rows)
    for split in sorted(set(splits)):
        if not counts[split]:
            raise UsageError(f"{option}: {root} has no clips in split {split!r} ({dict(counts) or 'none'}); {purpose}")


# ---------------------------------------------------------------------------------------------------------------------
# Uploading clips

def upload_clip(store: Store, local_root: str | os.PathLike, row: dict) -> tuple[dict, int]:
    """Upload one clip of a local dataset (video, audio, then sidecar); return (manifest row, objects sent).

    The row gains `video_sha256`, `audio_sha256` and `source` (from the sidecar); the sidecar gains the two
    checksums, so a later run can rebuild the row from the sidecar alone. Objects already stored with the same
    checksum are not sent again. Raises FileNotFoundError naming a missing local file.
    """
    local_root = Path(local_root)
    data = {}
    for field in PATH_FIELDS:
        path = local_root / relative_key(row[field], field)
        if not path.resolve().is_relative_to(local_root.resolve()):
            raise ValueError(f"{path}: clip {row['clip_id']}'s {field} file leads outside {local_root} (a link)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: clip {row['clip_id']} lists it as its {field} file, it does not exist")
        data[field] = path.read_bytes()
    try:
        sidecar = json.loads(data["meta"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{local_root / row['meta']}: sidecar is not valid JSON ({e.msg})") from None
    sums = {"video_sha256": sha256(data["video"]), "audio_sha256": sha256(data["audio"])}
    sidecar.update(sums)
    data["meta"] = json.dumps(sidecar, sort_keys=True).encode()
    sent = sum(store.put_if_changed(row[field], data[field]) for field in ("video", "audio", "meta"))
    return {**row, **sums, "source": sidecar.get("source", row.get("source", "unknown"))}, sent


def upload_dataset(local_root: str | os.PathLike, dest: str | Store, workers: int = 8,
                   progress: bool = False) -> dict:
    """Upload a local dataset (e.g. `flipray synth` output) to `dest`; manifest last. Safe to re-run.

    Returns {"clips": n, "clips_sent": clips with an object sent, "sent": objects sent, "unchanged": objects
    already there, "manifest": url}.
    """
    from tqdm import tqdm
    store = dest if isinstance(dest, Store) else Store(dest)
    manifest = Path(local_root) / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest; --dataset takes a clip-format dataset "
                                f"(`flipray synth` output)")
    # every row is checked (types, paths inside the root, no clip_id twice) before the first object goes up
    rows = [dict(r) for r in parse_manifest(manifest.read_text(encoding="utf-8-sig"), str(manifest))]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # I/O bound: threads share one thread-safe client
        results = list(tqdm(pool.map(lambda r: upload_clip(store, local_root, r), rows), total=len(rows),
                            unit="clip", desc=f"upload to {store.root}", disable=not progress))
    out_rows = [r for r, _ in results]
    sent = sum(n for _, n in results)
    url = store.write_manifest(out_rows, merge=True)  # clips uploaded earlier into the same root stay listed
    log.info("%s: %d clips, %d objects sent, manifest written last", store.root, len(out_rows), sent)
    return {"clips": len(out_rows), "clips_sent": sum(n > 0 for _, n in results), "sent": sent,
            "unchanged": 3 * len(out_rows) - sent, "manifest": url}


def storage_location(path: str):
    """(storage_path, pyarrow filesystem or None) for RunConfig: s3:// paths honour AWS_ENDPOINT_URL (MinIO, moto)."""
    if not path.startswith("s3://"):
        return str(Path(path).resolve()), None
    import pyarrow.fs
    from urllib.parse import urlparse
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return path[len("s3://"):].rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)
