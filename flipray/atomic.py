"""Atomic file output: a result replaces its target by one rename once it is complete, or not at all; and folder locks,
so that one process at a time writes what it read (a dataset's manifest, a training run's folder).

    with atomic_output("fixed.mp4") as tmp:   # write tmp (same folder); on an exception the target is untouched
        run_ffmpeg(..., tmp)

The file gets the mode a plain open() would give (0666 less the umask, usually 0644), not mkstemp's 0600: datasets
and outputs in a shared folder stay readable to the other users of a machine.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
_UMASK = os.umask(0o022)  # read once at import (os.umask is process-wide and not thread-safe to query later)
os.umask(_UMASK)


def file_mode() -> int:
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; when the block succeeds it becomes `path` (os.replace), else it is removed.
    `suffix` defaults to the target's, so tools that pick a format by extension (ffmpeg) see the right one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (complete or not at all), mode as open() would give."""
    with atomic_output(path, suffix=".tmp") as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:  # a full disk: name the file meant, not the temporary one (or none, as write() does)
            raise OSError(e.errno, e.strerror, str(path)) from None


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # flock's answers on a file system that has none
_UNLOCKED: set[str] = set()  # lock files already warned about
_HELD: set[tuple[str, int]] = set()  # (lock file, thread) held: a thread takes a lock once, however nested


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, busy: Callable[[str], None]):
    """Hold an exclusive lock on FOLDER/NAME (flock) for the block. When another process holds it, `busy(its pid)`
    is called first: it raises to refuse, or returns to wait for the lock. The kernel drops a lock with its
    process, so a killed holder leaves none behind. Nested use in one thread is free; another thread of the same
    process waits like another process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = (str((folder / name).resolve()), threading.get_ident())
    if key in _HELD:
        yield
        return
    path = key[0]
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, file_mode()), True
    except PermissionError:  # another user's lock in a shared folder: a read-only descriptor locks as well
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy(os.pread(fd, 64, 0).decode(errors="replace").strip() or "?")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some FUSE mounts): go on unlocked, as before locks
            if e.errno not in _NO_LOCKS:
                raise
            if path not in _UNLOCKED:
                _UNLOCKED.add(path)
                log.warning("%s: this file system has no locks (%s); two runs writing here at once are not kept "
                            "apart", path, e.strerror)
        if writable:  # who holds it, for the next one's message only: a full disk must not fail the lock
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # closing the descriptor releases the lock
