"""S3 request benchmark: GETs per sample per epoch with the node-local clip cache off and on, and loader samples/s
with an injected per-request latency, one request at a time against several in flight.

    python -m bench.cache                                   # 32 synthetic 10-s clips on moto, demo preset, ~5 min
    python -m bench.cache --clips 64 --delay-ms 50 --json-out cache.json

Prints one JSON object (and a markdown table on stderr). Clips are uploaded to a moto S3 server started for the
run; the loaders reach it through bench/s3proxy.py, which counts requests and delays each by --delay-ms, as a real
store's first-byte latency (20-50 ms per GET) would. Parts:
  gets     GETs of clip objects per sample in epochs 0, 1, 2 of each loader (torchcodec ClipDataset in a
           DataLoader; DaliClipLoader on the CPU), data.cache_dir off and on. DALI's pipeline runs ahead into the
           next epoch (PREFETCH batches), so its epoch e counts what was sent between the starts of epochs e and
           e+1: epoch 0 also holds the first batches of epoch 1.
  fetch    the external_source stage alone (ClipSource's callback over epoch 1, no decoding): samples/s at 0 ms
           and --delay-ms with data.fetch_threads 1 and 8, cache off. One request at a time is bound by
           1 / (2 x latency): two GETs per sample.
  loader   the whole loaders (decode, augment, log-mel) the same way, timed over the second epoch (DALI's first
           batches of it were prepared during the first); and with the cache on, where the second epoch reads local
           disk. torchcodec runs --threads DataLoader workers, DALI --threads threads with the callback inline.
This is a benchmark, not a test: rates depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")

from bench.common import machine, synthetic_data
from bench.s3proxy import local_s3, proxy
from flipray.config import load_config
from flipray.dataset.store import Store, upload_dataset


def _cfg(root: str, threads: int, cache_dir: str = "", config: str = "demo"):
    return load_config(config, [f"data.root={root}", "data.cache=false", f"data.fetch_threads={threads}",
                                "train.pair_negatives=false",  # one item per clip: GETs per sample count objects
                                f"data.cache_dir={cache_dir}", "data.cache_gb=10"])


def torchcodec_epochs(cfg, epochs, batch_size: int, workers: int, on_epoch=None) -> list[float]:
    """samples/s of each epoch of ClipDataset in a DataLoader; on_epoch(e) runs before epoch e."""
    from torch.utils.data import DataLoader

    from flipray.pretext.data import ClipDataset, EpochSampler, collate
    ds = ClipDataset(cfg, "train", train=True)
    sampler = EpochSampler(len(ds), cfg.train.seed, 0)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0, multiprocessing_context="spawn" if workers else None)
    rates = []
    for e in epochs:
        if on_epoch:
            on_epoch(e)
        sampler.epoch = e
        t0, n = time.perf_counter(), 0
        for b in loader:
            n += len(b.get("clip_id", []))
        rates.append(n / (time.perf_counter() - t0))
    return rates


def dali_epochs(cfg, epochs, batch_size: int, threads: int, on_epoch=None) -> list[float]:
    from dali_pipelines.pretext import DaliClipLoader
    loader = DaliClipLoader(cfg, "train", train=True, batch_size=batch_size, epoch=epochs[0], num_threads=threads)
    rates = []
    for e in epochs:
        if on_epoch:
            on_epoch(e)
        t0, n = time.perf_counter(), 0
        for b in loader:
            n += len(b.get("clip_id", []))
        rates.append(n / (time.perf_counter() - t0))
    loader.close()
    return rates


def fetch_stage(cfg, clips: list[dict], root: str, batch_size: int) -> float:
    """samples/s of ClipSource's callback over epoch 1, positions in order (DALI's inline external_source), after
    epoch 0 warmed up the S3 client and the thread pool."""
    from dali_pipelines.pretext import ClipSource
    src = ClipSource(cfg, clips, root, cfg.train.seed, True, True, 0, 1, batch_size, 0, 0)
    for epoch in (0, 1):
        total = src.num_batches(epoch) * batch_size
        t0 = time.perf_counter()
        for k in range(total):
            src(SimpleNamespace(epoch_idx=epoch, idx_in_epoch=k, idx_in_batch=k % batch_size,
                                iteration=k // batch_size))
    return len(clips) / (time.perf_counter() - t0)


def run(clips: int = 32, delay_ms: float = 30.0, batch_size: int = 8, threads: int = 2, config: str = "demo",
        root: str | None = None, timed_delays_ms: tuple | None = None, timed_fetch_threads: tuple = (1, 8)) -> dict:
    """The measurements the module docstring lists; the timed parts run at each of `timed_delays_ms` (default 0 and
    delay_ms) x `timed_fetch_threads` (the markdown table needs the defaults; the test times one cell)."""
    source = Store(root or str(synthetic_data(clips, 10.0)))
    rows = source.read_manifest()[:clips]
    result = {"clips": len(rows), "config": config, "delay_ms": delay_ms, "batch_size": batch_size,
              "threads": threads}
    with tempfile.TemporaryDirectory(prefix="flipray-bench-cache-") as tmp, local_s3() as endpoint:
        tmp = Path(tmp)
        sub = tmp / "ds"  # one split holding exactly the timed clips
        (sub / "clips").mkdir(parents=True)
        for row in rows:
            for key in ("video", "audio", "meta"):
                (sub / row[key]).write_bytes(source.get(row[key]))
        (sub / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
        import boto3
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        s3_root = f"s3://{bucket}/ds"
        upload_dataset(sub, s3_root)
        s3_rows = Store(s3_root).read_manifest("train")
        n = len(s3_rows)
        with proxy(endpoint) as px:
            os.environ["AWS_ENDPOINT_URL"] = px.url  # the loaders (and DALI's spawned workers) go through it

            # -- GETs per sample per epoch -----------------------------------------------------------------
            gets = {}
            for loader in ("torchcodec", "dali"):
                for cache in ("off", "on"):
                    cache_dir = str(tmp / f"cache-{loader}") if cache == "on" else ""
                    cfg = _cfg(s3_root, 8, cache_dir, config)
                    marks = []

                    def mark(e):
                        marks.append(px.gets("/clips/"))
                    print(f"gets: {loader}, cache {cache} ...", file=sys.stderr)
                    px.reset()
                    if loader == "torchcodec":
                        torchcodec_epochs(cfg, [0, 1, 2], batch_size, 0, mark)
                    else:
                        dali_epochs(cfg, [0, 1, 2], batch_size, threads, mark)
                    marks.append(px.gets("/clips/"))
                    gets[f"{loader}_cache_{cache}"] = [round((b - a) / n, 3) for a, b in zip(marks, marks[1:])]
            result["gets_per_sample"] = gets  # per epoch 0, 1, 2

            # -- the fetch stage and the loaders, with and without latency -----------------------------------
            fetch, loaders = {}, {}
            for delay in (0.0, delay_ms) if timed_delays_ms is None else timed_delays_ms:
                px.set_delay(delay)
                for ft in timed_fetch_threads:
                    key = f"{delay:g}ms_threads{ft}"
                    print(f"fetch and loaders: {key} ...", file=sys.stderr)
                    cfg = _cfg(s3_root, ft, "", config)
                    fetch[key] = round(fetch_stage(cfg, s3_rows, s3_root, batch_size), 2)
                    loaders[f"dali_{key}"] = round(dali_epochs(cfg, [0, 1], batch_size, threads)[-1], 2)
                    loaders[f"torchcodec_{key}"] = round(torchcodec_epochs(cfg, [0, 1], batch_size, threads)[-1], 2)
                cfg = _cfg(s3_root, 8, str(tmp / f"cache-timed-{delay:g}"), config)  # epoch 0 fills, 1 is timed
                loaders[f"dali_{delay:g}ms_threads8_cached"] = round(
                    dali_epochs(cfg, [0, 1], batch_size, threads)[-1], 2)
                loaders[f"torchcodec_{delay:g}ms_threads8_cached"] = round(
                    torchcodec_epochs(cfg, [0, 1], batch_size, threads)[-1], 2)
            result["fetch_stage_samples_per_s"] = fetch
            result["loader_samples_per_s"] = loaders
            result["serial_bound_samples_per_s"] = round(1000 / (2 * delay_ms), 1) if delay_ms else None
            os.environ["AWS_ENDPOINT_URL"] = endpoint
    return result


def markdown(r: dict) -> str:
    lines = ["| measurement | cache / requests in flight | epoch 0 | epoch 1 | epoch 2 |", "|---|---|---|---|---|"]
    for k, v in r["gets_per_sample"].items():
        loader, cache = k.split("_cache_")
        lines.append(f"| S3 GETs per sample, {loader} | cache {cache} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} |")
    lines += ["", f"| samples/s ({r['clips']} clips, batch {r['batch_size']}, {r['threads']} workers/threads) | "
                  f"0 ms, 1 | 0 ms, 8 | {r['delay_ms']:g} ms, 1 | {r['delay_ms']:g} ms, 8 | "
                  f"{r['delay_ms']:g} ms, 8, cached |", "|---|---|---|---|---|---|"]
    d = f"{r['delay_ms']:g}"
    f = r["fetch_stage_samples_per_s"]
    lines.append(f"| fetch stage (ClipSource, no decode) | {f['0ms_threads1']} | {f['0ms_threads8']} | "
                 f"{f[d + 'ms_threads1']} | {f[d + 'ms_threads8']} | |")
    lo = r["loader_samples_per_s"]
    for name in ("dali", "torchcodec"):
        lines.append(f"| {name} loader | {lo[name + '_0ms_threads1']} | {lo[name + '_0ms_threads8']} | "
                     f"{lo[f'{name}_{d}ms_threads1']} | {lo[f'{name}_{d}ms_threads8']} | "
                     f"{lo[f'{name}_{d}ms_threads8_cached']} |")
    m = r["machine"]
    lines.append(f"\nMachine: {m['cpu']}, {m['cores']} cores; load average {m['load_average_1_5_15']} at the start, "
                 f"{r['load_average_end']} at the end; {r['wall_s'] / 60:.1f} min.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--delay-ms", type=float, default=30.0, help="latency added to every S3 request")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="DALI threads and DataLoader workers")
    p.add_argument("--config", default="demo", help="preset or YAML (frames, sizes, mels of the samples)")
    p.add_argument("--root", default=None, help="source dataset (default: synthetic 10-s clips, cached)")
    p.add_argument("--json-out", default=None, metavar="PATH")
    args = p.parse_args(argv)
    t0 = time.time()
    result = {"machine": machine(), **run(args.clips, args.delay_ms, args.batch_size, args.threads, args.config,
                                          args.root)}
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(markdown(result), file=sys.stderr)
    print(text)
    return result


if __name__ == "__main__":
    main()
