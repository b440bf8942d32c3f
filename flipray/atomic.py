"""Atomic file output: a result replaces its target by one rename once it is complete, or not at all.

    with atomic_output("fixed.mp4") as tmp:   # write tmp (same folder); on an exception the target is untouched
        run_ffmpeg(..., tmp)

The file gets the mode a plain open() would give (0666 less the umask, usually 0644), not mkstemp's 0600: datasets
and outputs in a shared folder stay readable to the other users of a machine.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

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
        tmp.write_bytes(data)
