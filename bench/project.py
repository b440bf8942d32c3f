"""Wall time and cost of a 7M-sample pretext run (paper preset) on 1, 4, 8 and 32 GPUs, and what bounds each size.

    python -m bench.project --cpu docs/bench-cpu.json                       # assumptions for everything GPU-side
    python -m bench.project --cpu docs/bench-cpu.json --gpu out/gpu.json    # bench/gpu.sh's figures replace them
    python -m bench.project --cpu docs/bench-cpu.json --set price_per_gpu_hour=2.5 --set global_batch=256
    python -m bench.project --cpu docs/bench-cpu.json --cache docs/bench-cache.json --set node_cache_gb=200

Prints a markdown table (and --json-out). Every GPU node is an 8x H100 node; per GPU the run can go no faster than
the slowest of four rates, and the slowest names the bound:
  step       samples/s of forward + backward + optimizer at the per-GPU batch (bench/gpu.sh measures it; else the
             published A100 ResNet-50 rate x an H100 factor, scaled by FLOPs per sample counted with
             torch.utils.flop_counter, and cut in proportion below `full_rate_batch` samples per GPU)
  all-reduce the fp32 gradients (4 bytes x parameters) in a ring, NVLink inside a node, the network across nodes,
             overlapped with the backward pass (2/3 of the step's compute); what is left over lengthens the step
  decode     NVDEC frames/s per GPU / frames decoded per sample (window + the lead-in from the last keyframe),
             capped by the FLAC decode on the GPU's share of CPU threads (the ffmpeg audio floor measured by
             bench.decode, per thread); the CPU-only DALI path is shown beside it (measured per thread, scaled)
  S3         GETs per sample (measured by bench.cache: video + audio object, and none from a node's second pass
             over the set when data.cache_dir holds it; --set node_cache_gb=...) against S3's per-prefix request
             rate, and bytes per sample (clip sizes in --clips-root) against the node's S3 bandwidth
Which numbers are measured and which are assumptions is part of the output; replace the assumptions with
bench/gpu.sh figures (--gpu) as soon as a GPU node has run it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Assumptions:
    total_samples: int = 7_000_000        # the paper's pretext run on YouTube-ASMR
    global_batch: int = 32                # train.batch_size of the paper preset; per GPU = global / GPUs
    per_gpu_batch: int = 0                # > 0: keep this many samples per GPU instead (the global batch grows
                                          # with the GPU count: a change to the optimisation, not only speed)
    price_per_gpu_hour: float = 4.0       # USD per H100-hour: a PARAMETER, not a quote (clouds range ~2-12)
    a100_resnet50_img_s: float = 2470.0   # PUBLISHED: NVIDIA DeepLearningExamples, ResNet-50 v1.5, PyTorch, 1x A100
                                          # 80GB, mixed precision, training images/s (pytorch-21.03 container)
    h100_over_a100: float = 1.7           # ASSUMED: H100 SXM over A100 on mixed-precision convnet training
    flop_efficiency: float = 1.0          # ASSUMED: our FLOP/s relative to ResNet-50's (18 ResNet-18 frames + SE net)
    full_rate_batch: int = 16             # ASSUMED: samples per GPU (x18 frames) for the full step rate; fewer ->
                                          # proportionally slower (launch-bound)
    nvdec_frames_s: float = 30_000.0      # ASSUMED: 256-px VP9 frames/s per H100 (7 NVDEC engines)
    keyframe_interval: int = 6            # the clip format: a keyframe every second at 6 fps
    cpu_threads_per_gpu: int = 24         # ASSUMED: p5.48xlarge, 192 vCPUs / 8 GPUs
    gpus_per_node: int = 8
    nvlink_gb_s: float = 350.0            # ASSUMED: NCCL all-reduce bus bandwidth inside an 8x H100 NVLink node
    internode_gb_s: float = 40.0          # ASSUMED: per-GPU bus bandwidth across nodes (8x 400 Gb/s per node)
    allreduce_latency_ms: float = 0.5     # ASSUMED: per all-reduce latency across nodes (ring steps, launch)
    s3_get_per_s_per_prefix: float = 5500.0  # PUBLISHED (AWS S3 docs): GET/HEAD per second per partitioned prefix
    s3_prefixes: int = 1                  # flipray's layout keeps every object under one clips/ prefix
    s3_gb_s_per_node: float = 5.0         # ASSUMED: sustained S3 reads per node (~40 Gb/s of a 100+ Gb/s NIC)
    s3_price_per_1000_get: float = 0.0004  # PUBLISHED: S3 Standard GET, us-east-1
    dataset_clips: int = 30_000           # the paper's curated YouTube-ASMR (80% train): for the NVMe-cache remedy
    train_fraction: float = 0.8
    s3_gets_per_sample: float = 2.0       # MEASURED (bench.cache, --cache): clip-object GETs per sample per epoch,
                                          # cache off (video + audio)
    cache_gets_per_sample: float = 0.0    # MEASURED (bench.cache, --cache): the same from a node's second pass on,
                                          # data.cache_dir holding the set
    node_cache_gb: float = 0.0            # data.cache_gb on each node (0 = cache off); a random order each epoch
                                          # hits about cache/set of the time when the set does not fit


# ---------------------------------------------------------------------------------------------------------------------
# What can be counted here: FLOPs, parameters, bytes per sample

def model_cost(preset: str = "paper", overrides: list[str] | None = None) -> dict:
    """Parameters, FLOPs per sample (forward; forward + backward) counted on the meta device, fp32 gradient MB."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from flipray.config import load_config
    from flipray.pretext.models import SpatialAlignmentNet, count_parameters
    cfg = load_config(preset, overrides)
    d = cfg.data
    with torch.device("meta"):  # shapes only: counts FLOPs without computing anything
        model = SpatialAlignmentNet(cfg)
        video = torch.randn(1, d.num_frames, 3, d.crop, d.crop)
        audio = torch.randn(1, 2, d.n_mels, cfg.mel_frames)
        target = torch.zeros(1)
    forward, both = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        model(video, audio)
    with both:
        F.binary_cross_entropy_with_logits(model(video, audio), target).backward()
    params = count_parameters(model)
    return {"preset": preset, "parameters": params, "frames_per_sample": d.num_frames, "crop": d.crop,
            "fwd_gflop_per_sample": forward.get_total_flops() / 1e9,
            "fwd_bwd_gflop_per_sample": both.get_total_flops() / 1e9, "gradient_mb_fp32": params * 4 / 1e6}


def resnet50_cost() -> dict:
    """torchvision ResNet-50 at 224 px, one image: the published throughput's unit of work."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model, x = torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)
    both = FlopCounterMode(display=False)
    with both:
        model(x).sum().backward()
    return {"fwd_bwd_gflop_per_image": both.get_total_flops() / 1e9}


def clip_bytes(root: str | Path) -> dict:
    """Mean stored bytes per clip (video + audio files) over a local dataset's manifest: what one sample fetches."""
    from flipray.dataset.manifest import read_manifest
    root = Path(root)
    rows = read_manifest(root)
    video = [(root / r["video"]).stat().st_size for r in rows]
    audio = [(root / r["audio"]).stat().st_size for r in rows]
    return {"root": str(root), "clips": len(rows), "video_mb": statistics.mean(video) / 1e6,
            "audio_mb": statistics.mean(audio) / 1e6,
            "sample_mb": (statistics.mean(video) + statistics.mean(audio)) / 1e6}


# ---------------------------------------------------------------------------------------------------------------------
# The projection

LIFTS = {
    "step": "faster step: bf16 + channels_last (+ torch.compile) measured by bench/gpu.sh, then more GPUs",
    "step (small per-GPU batch)": "raise train.batch_size with the GPU count (linear lr scaling + warmup; "
                                  "re-validate flip accuracy against the paper's)",
    "all-reduce": "larger per-GPU batch (fewer all-reduces per sample), bf16 gradient compression hook, "
                  "hierarchical all-reduce",
    "decode": "NVDEC (data.loader=dali on GPU workers); more CPU threads per GPU for FLAC; pre-decoded audio",
    "S3 requests": "data.cache_dir on local NVMe (the set: 30K clips x {mb:.2f} MB = {gb:.0f} GB; "
                   "--set node_cache_gb=...) or spread clip keys over more prefixes (hash prefixes)",
    "S3 bandwidth": "data.cache_dir on local NVMe; smaller audio objects (FLAC dominates the bytes)",
}


def gets_per_sample(a: Assumptions, nodes: int, clips: dict | None) -> float:
    """S3 GETs per sample averaged over the run. With a node cache each node fetches each object of the set once
    and reads the rest from disk; the share of the set that does not fit misses as without a cache."""
    if a.node_cache_gb <= 0:
        return a.s3_gets_per_sample
    set_clips = a.dataset_clips * a.train_fraction
    set_gb = set_clips * (clips["sample_mb"] if clips else 1.0) / 1e3
    hit = min(1.0, a.node_cache_gb / set_gb)
    fetch_once = min(1.0, nodes * set_clips / a.total_samples)
    return a.s3_gets_per_sample * ((1 - hit) + hit * fetch_once) + hit * (1 - fetch_once) * a.cache_gets_per_sample


def project(cpu: dict, gpu: dict | None, a: Assumptions, gpus=(1, 4, 8, 32), cost: dict | None = None,
            clips: dict | None = None) -> dict:
    """Per GPU count: the four rates, the bound, wall time and cost. `cpu`: bench.all's JSON; `gpu`: bench/gpu.sh's."""
    cost = cost or cpu.get("model", {}).get("paper") or model_cost("paper")
    ref = cpu.get("model", {}).get("resnet50") or resnet50_cost()
    clips = clips or cpu.get("clip_bytes")
    sources = {}

    # step rate per GPU at full batch (and, from bench/gpu.sh, at several batches)
    curve = {}
    measured = [r for r in (gpu or {}).get("step", []) if "samples_per_s" in r]
    if measured:
        best = max(measured, key=lambda r: r["samples_per_s"])
        full_rate = best["samples_per_s"]
        # the batch curve is measured eager (bf16 + channels_last); the best variant's gain at its batch carries over
        curve = {r["batch"]: r["samples_per_s"] for r in measured if r["variant"] == "bf16 + channels_last, eager"}
        gain = full_rate / curve[best["batch"]] if best["batch"] in curve else 1.0
        curve = {b: v * gain for b, v in curve.items()} or {best["batch"]: full_rate}
        sources["step"] = (f"measured by bench/gpu.sh on {gpu['machine'].get('gpu')} ({best['variant']}, "
                           f"batch {best['batch']})")
    else:
        h100_resnet50 = a.a100_resnet50_img_s * a.h100_over_a100
        full_rate = h100_resnet50 * ref["fwd_bwd_gflop_per_image"] / cost["fwd_bwd_gflop_per_sample"] \
            * a.flop_efficiency
        sources["step"] = (f"assumed: {a.a100_resnet50_img_s:.0f} img/s (A100, ResNet-50, published) x "
                           f"{a.h100_over_a100} (H100) x {ref['fwd_bwd_gflop_per_image']:.1f} / "
                           f"{cost['fwd_bwd_gflop_per_sample']:.1f} GFLOP")

    def step_rate(batch: float) -> float:
        if curve:  # measured: the nearest measured batch at or below, else scale the smallest one down
            below = [b for b in curve if b <= batch]
            return curve[max(below)] if below else curve[min(curve)] * batch / min(curve)
        return full_rate * min(1.0, batch / a.full_rate_batch)

    # decode per GPU
    frames_per_sample = cost["frames_per_sample"] + (a.keyframe_interval - 1) / 2
    dec = cpu["decode"]
    per_thread = {k: v / dec["threads"] for k, v in dec["clips_per_s"].items()}
    flac_rate = per_thread["ffmpeg_audio_only"] * a.cpu_threads_per_gpu
    cpu_loader = max(("dali_cpu", "torchcodec"), key=lambda k: per_thread.get(k, 0.0))  # the faster CPU loader
    cpu_path = per_thread[cpu_loader] * a.cpu_threads_per_gpu
    if gpu and gpu.get("decode", {}).get("dali_gpu_samples_per_s"):
        nvdec = gpu["decode"]["dali_gpu_samples_per_s"]
        sources["decode"] = "measured: DALI mixed-backend loader samples/s, bench/gpu.sh"
    else:
        nvdec = a.nvdec_frames_s / frames_per_sample
        sources["decode"] = (f"assumed: {a.nvdec_frames_s:.0f} NVDEC frames/s / {frames_per_sample:.1f} frames per "
                             f"sample; FLAC on {a.cpu_threads_per_gpu} threads at the measured ffmpeg audio floor "
                             f"({per_thread['ffmpeg_audio_only']:.1f} clips/s per thread)")
    decode_rate = min(nvdec, flac_rate)
    sources["cpu decode"] = (f"measured: {cpu_loader} {per_thread[cpu_loader]:.2f} clips/s per thread here x "
                             f"{a.cpu_threads_per_gpu} threads per GPU (the path without NVDEC)")

    rows = []
    grad_bytes = cost["gradient_mb_fp32"] * 1e6
    for n in gpus:
        batch = a.per_gpu_batch or a.global_batch / n
        rate = step_rate(batch)
        compute_s = batch / rate
        if n == 1:
            allreduce_s = 0.0
        else:
            bw = a.nvlink_gb_s if n <= a.gpus_per_node else a.internode_gb_s
            allreduce_s = 2 * (n - 1) / n * grad_bytes / (bw * 1e9) + \
                (a.allreduce_latency_ms / 1e3 if n > a.gpus_per_node else 0.0)
        exposed = max(0.0, allreduce_s - 2 / 3 * compute_s)
        step_with_ar = batch / (compute_s + exposed)
        nodes = math.ceil(n / a.gpus_per_node)
        gets = gets_per_sample(a, nodes, clips)
        s3_requests = a.s3_get_per_s_per_prefix * a.s3_prefixes / gets / n if gets else math.inf  # samples/s/GPU
        s3_mb = clips["sample_mb"] * gets / a.s3_gets_per_sample if clips else 0.0  # from S3, per sample
        s3_bytes = nodes * a.s3_gb_s_per_node * 1e3 / s3_mb / n if s3_mb else math.inf
        rates = {"step": rate, "all-reduce": step_with_ar if exposed > 0 else math.inf, "decode": decode_rate,
                 "S3 requests": s3_requests, "S3 bandwidth": s3_bytes}
        ranked = sorted(rates, key=rates.get)
        bound, per_gpu = ranked[0], rates[ranked[0]]
        then = ranked[1]  # what bounds the run once this bound is lifted
        if bound == "step" and batch < a.full_rate_batch and not curve:
            bound = "step (small per-GPU batch)"
        total_rate = per_gpu * n
        hours = a.total_samples / total_rate / 3600
        s3_cost = a.total_samples * gets * a.s3_price_per_1000_get / 1000
        rows.append({"gpus": n, "per_gpu_batch": batch, "step_samples_per_s": rate, "compute_ms": compute_s * 1e3,
                     "allreduce_ms": allreduce_s * 1e3, "exposed_allreduce_ms": exposed * 1e3,
                     "decode_samples_per_s": decode_rate, "cpu_decode_samples_per_s": cpu_path,
                     "s3_gets_per_sample": gets,
                     "s3_request_cap_per_gpu": s3_requests, "s3_bandwidth_cap_per_gpu": s3_bytes,
                     "samples_per_s_per_gpu": per_gpu, "samples_per_s": total_rate, "hours": hours,
                     "gpu_hours": hours * n, "cost_usd": hours * n * a.price_per_gpu_hour + s3_cost,
                     "bound": bound, "next_bound": then, "next_samples_per_s": rates[then] * n})
    return {"assumptions": dataclasses.asdict(a), "sources": sources, "model": cost, "resnet50": ref,
            "clip_bytes": clips, "frames_decoded_per_sample": frames_per_sample, "full_step_rate": full_rate,
            "flac_cap_per_gpu": flac_rate, "nvdec_cap_per_gpu": nvdec, "rows": rows}


def markdown(p: dict) -> str:
    a, clips = p["assumptions"], p["clip_bytes"] or {"sample_mb": float("nan")}
    header = (f"| GPUs | batch per GPU | step samples/s per GPU | all-reduce ms (exposed) | decode cap per GPU: "
              f"NVDEC (CPU only) | "
              f"S3 GETs per sample | S3 GET cap per GPU | samples/s | wall time | GPU-hours | "
              f"cost at ${a['price_per_gpu_hour']:.2f}/GPU-h "
              f"| bound | what would lift it | then |")
    lines = [header, "|" + "---|" * 14]
    for r in p["rows"]:
        lift = LIFTS[r["bound"]].format(mb=clips["sample_mb"], gb=a["dataset_clips"] * clips["sample_mb"] / 1e3)
        lines.append(
            f"| {r['gpus']} | {r['per_gpu_batch']:g} | {r['step_samples_per_s']:.0f} | {r['allreduce_ms']:.2f} "
            f"({r['exposed_allreduce_ms']:.2f}) | {r['decode_samples_per_s']:.0f} "
            f"({r['cpu_decode_samples_per_s']:.0f}) | "
            f"{r['s3_gets_per_sample']:.3g} | {r['s3_request_cap_per_gpu']:.0f} "
            f"| {r['samples_per_s']:.0f} | {r['hours']:.1f} h | {r['gpu_hours']:.1f} | ${r['cost_usd']:.0f} "
            f"| {r['bound']} | {lift} | {r['next_samples_per_s']:.0f} samples/s, {r['next_bound']}-bound |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.project", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", default="docs/bench-cpu.json", help="python -m bench.all's JSON")
    p.add_argument("--gpu", default=None, help="bench/gpu.sh's gpu.json (replaces the GPU-side assumptions)")
    p.add_argument("--cache", default=None, help="python -m bench.cache's JSON: measured GETs per sample")
    p.add_argument("--clips-root", default=None, help="dataset whose clip sizes give bytes per sample "
                   "(default: the figure in --cpu, else data/demo)")
    p.add_argument("--gpus", default="1,4,8,32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an assumption")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    a = Assumptions()
    fields = {f.name: f.type for f in dataclasses.fields(a)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"unknown assumption {key!r}; assumptions are {sorted(fields)}")
        setattr(a, key, type(getattr(a, key))(float(value)) if isinstance(getattr(a, key), int) else float(value))
    cpu = json.loads(Path(args.cpu).read_text())
    gpu = json.loads(Path(args.gpu).read_text()) if args.gpu else None
    if gpu and gpu.get("dry_run"):
        raise ValueError(f"{args.gpu} comes from bench/gpu.sh --dry-run (CPU toy settings); project from a real run")
    clips = clip_bytes(args.clips_root) if args.clips_root else None
    if args.cache:  # steady-state epochs of the torchcodec loader (DALI's epochs blur by its run-ahead)
        measured = json.loads(Path(args.cache).read_text())["gets_per_sample"]
        a.s3_gets_per_sample = measured["torchcodec_cache_off"][1]
        a.cache_gets_per_sample = measured["torchcodec_cache_on"][1]
    result = project(cpu, gpu, a, tuple(int(g) for g in args.gpus.split(",")), clips=clips)
    result["sources"]["S3 GETs per sample"] = (
        f"{'measured by bench.cache' if args.cache else 'assumed'}: {a.s3_gets_per_sample:g} per sample per epoch "
        f"without the cache, {a.cache_gets_per_sample:g} from a node's second pass with it; node cache "
        f"{a.node_cache_gb:g} GB" + (" (off)" if a.node_cache_gb <= 0 else ""))
    print(markdown(result))
    for k, v in result["sources"].items():
        print(f"- {k}: {v}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
