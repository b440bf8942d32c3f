"""Raw videos for ingest that live in object storage: list an s3:// prefix, fetch one object onto the node that cuts it.

    flipray ingest --videos s3://bucket/raw-videos/ --out s3://bucket/my-videos/
    python -m jobs.ingest --videos s3://flipray/raw/ --out s3://flipray/dataset/          # the k8s ingest RayJob

Listing runs on the driver; each Ray task (probe, clip) fetches its source into a node-local cache
($FLIPRAY_SOURCE_CACHE, default <tmp>/flipray-sources) keyed by bucket, key and ETag, written under a temporary
name and renamed when complete, so the clips of one source on one node download it once and a changed object is
fetched again. Credentials and endpoint are boto3's (AWS_* env, instance role, IRSA / workload identity).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

SCHEME = "s3://"


def is_remote(spec: str | os.PathLike) -> bool:
    """True for an s3:// URI (the only remote source scheme; anything else is a local path)."""
    return str(spec).startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key or prefix) of s3://bucket/key."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri}: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


def _client():
    import boto3
    return boto3.client("s3")


def list_videos(prefix: str, extensions: set[str]) -> list[tuple[str, str]]:
    """[(s3://bucket/key, key relative to the prefix)] of every object under `prefix` whose name ends in one of
    `extensions` (lower-cased), sorted by key. A prefix without a trailing slash is taken as a folder."""
    bucket, key_prefix = split_uri(prefix)
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    found = []
    for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if not key.endswith("/") and Path(key).suffix.lower() in extensions:
                found.append((f"{SCHEME}{bucket}/{key}", key[len(key_prefix):]))
    if not found:
        raise FileNotFoundError(f"{prefix}: no videos ({', '.join(sorted(extensions))}) under this prefix")
    return sorted(found)


def cache_dir() -> Path:
    return Path(os.environ.get("FLIPRAY_SOURCE_CACHE") or Path(tempfile.gettempdir()) / "flipray-sources")


def fetch(uri: str) -> str:
    """A local path holding the object `uri`, downloaded into the node's cache unless it is there already (same
    ETag). The file appears only complete (download to a temporary name, then rename)."""
    bucket, key = split_uri(uri)
    s3 = _client()
    etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    digest = hashlib.sha256(f"{bucket}/{key}@{etag}".encode()).hexdigest()[:24]
    path = cache_dir() / f"{digest}{Path(key).suffix.lower()}"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    os.close(fd)
    try:
        s3.download_file(bucket, key, tmp)
        os.replace(tmp, path)  # atomic: a concurrent task on this node sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(path)


def localize(path: str) -> str:
    """`path` itself for a local file, else the cached local copy of the s3:// object."""
    return fetch(path) if is_remote(path) else path
