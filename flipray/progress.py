"""Progress bars that stay readable inside Ray tasks: tqdm in a plain process, Ray's tqdm_ray in a Ray worker.

    from flipray.progress import tqdm
    for batch in tqdm(range(n), desc="epoch 3", unit="batch", leave=False): ...

Plain tqdm in several Ray workers interleaves carriage returns in the driver's log; tqdm_ray sends each bar's state
to the driver, which draws them one per line. tqdm_ray takes no display options (leave, file, ...): they apply to
plain tqdm only. set_postfix works on both.
"""
from __future__ import annotations

import sys


def in_ray_worker() -> bool:
    """True inside a Ray task or actor (not on a driver, not without Ray)."""
    if "ray" not in sys.modules:
        return False
    from flipray.optional import require
    ray = require("ray")
    if not ray.is_initialized():
        return False
    # The test tqdm_ray itself makes (Ray 2.60 has no public accessor for the process's mode).
    return ray._private.worker.global_worker.mode == ray.WORKER_MODE


def tqdm(iterable=None, desc: str | None = None, total: int | None = None, unit: str | None = None, **options):
    if not in_ray_worker():
        from tqdm import tqdm as plain
        return plain(iterable, desc=desc, total=total, unit=unit or "it", **options)
    from flipray.optional import require
    tqdm_ray = require("ray.experimental.tqdm_ray")

    class RayBar(tqdm_ray.tqdm):
        def set_postfix(self, **values):
            self.set_description(" ".join([desc or ""] + [f"{k}={v}" for k, v in values.items()]).strip())

        def __iter__(self):  # closes when the iterable is exhausted, as tqdm does
            yield from super().__iter__()
            self.close()

    return RayBar(iterable, desc=desc, total=total, unit=unit)
