"""The device paths CPU tests can only approximate, run for real on a GPU (a part of bench/gpu.sh):

    python -m bench.gpu_paths                 # CUDA when visible, else CPU; prints a JSON report

  check        `flipray check`'s scoring with AudioFeatures and the model on the GPU (CPU waveforms in): runs, and
               gives the CPU's scores (max difference)
  variants     every model.variant prepared as a GPU worker prepares it (prepare_model: channels_last, 3-D convs
               channels_last_3d) and trained 2 steps with bf16 autocast
  accumulation 2 DDP ranks (gloo, tensors on the device) over 5 micro-batches at 2 per step: parameters identical
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from flipray.config import VARIANTS, load_config
from flipray.pretext.models import SpatialAlignmentNet
from flipray.pretext.train import make_optimizer, new_state, prepare_model, train_one_epoch

TINY = ["data.num_frames=3", "data.resize=40", "data.crop=32", "data.n_mels=32", "model.visual_width=8",
        "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32", "train.batch_size=8"]


def batches(cfg, n: int, seed: int, device, size: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"skipped": 0, "video": torch.randn(size, cfg.data.num_frames, 3, cfg.data.crop, cfg.data.crop,
                                                generator=g).to(device),
             # waveforms, as both loaders hand them: the model's front end makes the features on `device`
             "audio": torch.randn(size, cfg.data.audio_channels, cfg.window_samples, generator=g).to(device),
             "label": torch.randint(0, 2, (size,), generator=g).float().to(device)} for _ in range(n)]


def check_on_device(device) -> dict:
    from flipray import check
    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    model = SpatialAlignmentNet(cfg).eval()
    n = cfg.window_frames + 6
    g = torch.Generator().manual_seed(1)
    media = check.Media(frames=torch.randint(0, 255, (n, 40, 40, 3), dtype=torch.uint8, generator=g),
                        frame_pos={i: i for i in range(n)}, starts=[0, 6], duration_s=n / cfg.data.fps,
                        wave=torch.randn(2, round(n / cfg.data.fps * cfg.data.sample_rate), generator=g),
                        grid_frames=n)
    cpu = check.score_windows(model, cfg, media, [0, 6], check.CheckOptions(device="cpu"))
    on = check.score_windows(model.to(device), cfg, media, [0, 6], check.CheckOptions(device=str(device)))
    return {"device": str(device), "max_abs_diff": max(abs(a - b) for a, b in zip(cpu, on))}


def variants(device) -> dict:
    out = {}
    for variant in VARIANTS:
        # the Table-2 gcc-phat ablation is defined on the paper's log-mel input
        cfg = load_config("demo", TINY + [f"model.variant={variant}"] + ["model.front_end=logmel"] * (variant == "gcc-phat"))
        model = prepare_model(SpatialAlignmentNet(cfg), cfg, device)
        state = new_state()
        stats = train_one_epoch(model, batches(cfg, 2, 0, device, 8), make_optimizer(model, cfg), cfg, device, state)
        out[variant] = {"steps": state["step"], "loss": stats["loss"],
                        "channels_last": any(p.dim() >= 4 and not p.is_contiguous() for p in model.parameters())}
    return out


def accumulation(device) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu_paths", "--rank", str(r), str(port), tmp,
                                   str(device)], env={**os.environ, "TQDM_DISABLE": "1"}) for r in range(2)]
        codes = [p.wait(timeout=300) for p in procs]
        if codes != [0, 0]:
            raise RuntimeError(f"DDP ranks exited {codes}")
        p0, p1 = (torch.load(Path(tmp) / f"params-{r}.pt", weights_only=True) for r in range(2))
        return {"identical": bool(torch.equal(p0, p1)), "max_abs_diff": float((p0 - p1).abs().max())}


def _rank(rank: str, port: str, out: str, device: str):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=2)
    device = torch.device(device)
    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(prepare_model(SpatialAlignmentNet(cfg), cfg, device))
    train_one_epoch(model, batches(cfg, 5, 100 + int(rank), device), make_optimizer(model, cfg), cfg, device,
                    new_state(), world_size=2, accum_steps=2)
    torch.save(torch.cat([p.detach().flatten().cpu() for p in model.module.parameters()]),
               Path(out) / f"params-{rank}.pt")
    dist.destroy_process_group()


def main() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {}
    for name, fn in (("check", check_on_device), ("variants", variants), ("accumulation", accumulation)):
        try:
            report[name] = fn(device)
        except Exception as e:  # noqa: BLE001 - each path reports on its own
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        _rank(*sys.argv[2:6])
    else:
        print(json.dumps(main(), indent=2))
