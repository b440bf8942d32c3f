"""What every benchmark records: the machine, its load, and a cached synthetic dataset to run on."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    match = re.search(r"model name\s*:\s*(.+)", info.read_text()) if info.exists() else None
    return match.group(1).strip() if match else platform.processor() or "unknown"


def versions() -> dict:
    """Versions of what the figures depend on; a package that is not installed is left out."""
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "torchaudio", "torchcodec", "ray", "nvidia-dali-cuda130", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if shutil.which("ffmpeg"):
        version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=False)
        first = version.stdout.splitlines()
        out["ffmpeg"] = first[0].split()[2] if first else "unknown"
    return out


def machine() -> dict:
    """CPU model, cores, memory, GPU (if any), library versions, load average: the `machine` block of every JSON."""
    import torch
    mem = Path("/proc/meminfo")
    total = re.search(r"MemTotal:\s+(\d+) kB", mem.read_text()) if mem.exists() else None
    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "memory_gb": round(int(total.group(1)) / 2**20, 1) if total else None,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "platform": platform.platform(), "versions": versions(),
           "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    return out


def synthetic_data(clips: int, duration_s: float, seed: int = 0, cache: str | Path | None = None) -> Path:
    """A synthetic dataset (flipray.synth.scenes), generated on first use and kept under the checkout's data/bench (or
    `cache`): nothing outside the repository is read or written."""
    from flipray.synth.scenes import generate
    base = Path(cache) if cache else Path(__file__).resolve().parents[1] / "data" / "bench"
    root = base / f"bench-synth-{clips}x{duration_s:g}s-seed{seed}"
    if not (root / "manifest.jsonl").exists():
        print(f"generating {clips} synthetic {duration_s:g}-s clips into {root}", file=sys.stderr)
        generate(root, clips=clips, seed=seed, duration_s=duration_s)
    return root
