"""Node-local clip cache: objects fetched once from the store are read from local disk in later epochs.

    python -m jobs.pretext --config paper --set data.root=s3://bucket/ds --set data.cache_dir=/mnt/nvme/flipray-cache \
        --set data.cache_gb=200
    python -c "from flipray.dataset.cache import open_store; s = open_store('s3://b/ds', '/tmp/c', 1.0); \
        r = s.read_manifest()[0]; print(len(s.get(r['video'], r['video_sha256'])))"   # twice: the 2nd from disk

Why: every epoch reads every clip again, and one S3 prefix serves ~5,500 GET/s (docs/performance.md), which bounds
a run from 8 GPUs. A curated set (30K clips, ~17 GB) fits a node's NVMe, so from the second epoch on no GET is sent.

Entries are content-addressed by the manifest's sha256 (`<dir>/objects/ab/abcd...`), so a hit is verified by
hashing what was read: a torn, truncated or bit-rotted entry is dropped and fetched again. Objects without a
checksum pass through uncached. Ranks and loader processes of a node share the directory without locks for
reading and filling: each writer writes its own temporary file and renames it into place (atomic on POSIX), so a
reader sees a whole file or none. Only eviction (least recently used first: a hit refreshes the entry's mtime)
takes a file lock, so one process trims at a time; each process rescans the directory after writing a twentieth of
the bound, so the size can overshoot the bound by about that much per filling process.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from flipray.atomic import folder_lock
from flipray.dataset.store import Store

log = logging.getLogger(__name__)

LOW_WATER = 0.9          # eviction trims to this fraction of the bound, so it does not run on every write
RESCAN_FRACTION = 0.05   # a process rescans the directory after writing this fraction of the bound
STALE_TMP_S = 3600.0     # temporary files older than this were left by a killed writer; eviction removes them


class ClipCache:
    """A bounded directory of verified objects keyed by sha256, shared by every process of a node."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"data.cache_gb must be > 0 when data.cache_dir is set, got {max_bytes / 1e9:g} GB")
        self.dir, self.max_bytes = Path(directory), int(max_bytes)
        self.objects = self.dir / "objects"
        self._lock = threading.Lock()
        self._written = 0              # bytes this process wrote since its last scan
        self._size: int | None = None  # directory size at the last scan (None: not scanned yet)
        self.hits = self.misses = self.dropped = 0

    def __getstate__(self):
        state = {**self.__dict__, "_written": 0, "_size": None}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")  # also keeps paths inside the cache
        return self.objects / digest[:2] / digest

    def read(self, digest: str) -> bytes | None:
        """The cached bytes of `digest`, or None (absent, or corrupt and now dropped)."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except OSError:  # absent (or unreadable): a miss
            with self._lock:
                self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("%s: cached object does not match its sha256; dropped, fetching it again", path)
            path.unlink(missing_ok=True)
            with self._lock:
                self.dropped += 1
                self.misses += 1
            return None
        try:
            os.utime(path)  # recently used: eviction goes by mtime, which noatime mounts keep honest
        except FileNotFoundError:
            pass  # evicted by another process since we opened it; the bytes we read are whole
        with self._lock:
            self.hits += 1
        return data

    def write(self, digest: str, data: bytes) -> None:
        """Store verified `data` under `digest`: a temporary file renamed into place (mode 0666 & ~umask)."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # no fsync: a torn entry after a crash fails its checksum and is re-fetched
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._written += len(data)
            due = self._size is None or self._size + self._written > self.max_bytes \
                or self._written > RESCAN_FRACTION * self.max_bytes
        if due:
            self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every entry and temporary file."""
        out = []
        if not self.objects.is_dir():
            return out
        for sub in os.scandir(self.objects):
            if not sub.is_dir():
                continue
            for e in os.scandir(sub.path):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, Path(e.path)))
        return out

    def evict(self) -> int:
        """Trim the directory to LOW_WATER of the bound, least recently used first; returns its size after."""
        # one trimmer at a time (a second one waits); readers and writers never take this lock
        with folder_lock(self.dir, ".lock", busy=lambda holder: None):
            now, size, live = time.time(), 0, []
            for mtime, nbytes, path in self.entries():
                if path.name.endswith(".tmp"):
                    if now - mtime > STALE_TMP_S:
                        path.unlink(missing_ok=True)
                    continue
                size += nbytes
                live.append((mtime, nbytes, path))
            if size > self.max_bytes:
                for mtime, nbytes, path in sorted(live):
                    if size <= LOW_WATER * self.max_bytes:
                        break
                    path.unlink(missing_ok=True)
                    size -= nbytes
        with self._lock:
            self._size, self._written = size, 0
        return size


class CachedStore(Store):
    """A Store whose checksummed reads go through a node-local ClipCache; everything else is the Store's."""

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike, max_bytes: int):
        super().__init__(root)
        self.cache = ClipCache(cache_dir, max_bytes)
        self._write_failed = False

    def get(self, key: str, expect_sha256: str | None = None) -> bytes:
        if not expect_sha256:  # nothing to verify a cached copy against: read the store
            return super().get(key)
        data = self.cache.read(expect_sha256)
        if data is None:
            data = super().get(key, expect_sha256)  # raises on a missing or corrupt object: nothing is cached
            try:
                self.cache.write(expect_sha256, data)
            except OSError as e:  # a full or unwritable disk costs the cache, never the sample
                if not self._write_failed:
                    log.warning("%s: cannot write the clip cache (%s); reading from the store", self.cache.dir, e)
                self._write_failed = True
        return data

    def __repr__(self) -> str:
        return f"CachedStore({self.root!r}, cache={str(self.cache.dir)!r})"


def open_store(root: str | os.PathLike, cache_dir: str = "", cache_gb: float = 0.0) -> Store:
    """The store both loaders read clips through: Store(root), or with `cache_dir` set a CachedStore bounded to
    `cache_gb` GB (data.cache_dir / data.cache_gb)."""
    if not cache_dir:
        return Store(root)
    return CachedStore(root, cache_dir, int(cache_gb * 1e9))
