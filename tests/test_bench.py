"""The benchmarks run end to end on tiny settings and report well-formed, self-consistent figures (no timing checks).

    .venv/bin/python -m pytest tests/test_bench.py -x -q
"""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import all as bench_all
from bench.project import Assumptions, project
from flipray.config import load_config
from flipray.pretext.models import SpatialAlignmentNet, count_parameters

REPO = Path(__file__).resolve().parents[1]
TINY = {"decode": {"clips": 2, "batch_size": 2},
        "demo": {"overrides": ["train.batch_size=4"], "samples": 4, "repeats": 1, "warmup": 1},
        "paper": {"overrides": ["train.batch_size=1"], "samples": 1, "repeats": 1, "warmup": 1}}


@pytest.mark.slow
def test_bench_all_reports_positive_figures_with_ratios_to_the_same_run(synth_root):
    report = bench_all.run(quick=True, data=str(synth_root), threads=1, modes=("plain",), settings=TINY,
                           clips_root=str(synth_root), skip=("cache",))  # test_bench_cache_* runs that part
    report = json.loads(json.dumps(report))  # one JSON document: everything serialises

    machine = report["machine"]
    assert machine["cores"] == os.cpu_count() and machine["cpu"] and machine["versions"]["torch"]
    assert len(report["load_average_1_5_15"]["start"]) == 3 and len(report["load_average_1_5_15"]["end"]) == 3

    # model cost: counted, not copied; the paper preset's parameters are the real model's
    paper = report["model"]["paper"]
    assert paper["parameters"] == count_parameters(SpatialAlignmentNet(load_config("paper")))
    assert paper["fwd_bwd_gflop_per_sample"] > 2 * paper["fwd_gflop_per_sample"] > 0
    assert paper["fwd_gflop_per_sample"] > 50 * report["model"]["demo"]["fwd_gflop_per_sample"]
    assert 0 < report["clip_bytes"]["sample_mb"] < 5

    # decode: every rate positive, every ratio the rate over the floor of this run
    d = report["decode"]
    floor = d["clips_per_s"]["ffmpeg_decode_only"]
    for name, rate in d["clips_per_s"].items():
        assert rate > 0, name
        assert d["ratio_to_floor"][name] == pytest.approx(rate / floor, rel=0.01, abs=0.001)
    # the floor decodes video and audio; each alone is faster than both
    assert d["clips_per_s"]["ffmpeg_video_only"] > floor and d["clips_per_s"]["ffmpeg_audio_only"] > floor

    for preset, batch in (("demo", 4), ("paper", 1)):
        r = report[f"train_{preset}"]
        assert r["setup"]["batch_size"] == batch and r["setup"]["config"] == preset
        plain = r["modes"]["plain"]
        assert plain["samples_per_s"]["median"] > 0 and len(plain["samples_per_s"]["runs"]) == 1
        assert 0 <= plain["data_wait_fraction"] < 1
        gflop = report["model"][preset]["fwd_bwd_gflop_per_sample"]
        assert plain["achieved_gflop_per_s"] == pytest.approx(plain["samples_per_s"]["median"] * gflop)

    # the audio front end's cost per sample, for every front end (channels as the model expects them)
    fe = {(r["preset"], r["front_end"]): r for r in report["front_end"] if r["device"] == "cpu"}
    assert {k[1]: r["channels"] for k, r in fe.items() if k[0] == "demo"} == {"logmel": 2, "ipd": 4, "ipd-gcc": 7, "ild-ipd-gcc": 7}
    assert all(r["ms_per_sample"] > 0 for r in fe.values())

    table = bench_all.markdown(report)
    assert "audio front end per sample" in table
    assert table.splitlines()[0].startswith("| benchmark | variant | rate | ratio |")
    assert "ffmpeg decode only (floor)" in table and "| 1.00 | floor |" in table
    assert table.count("plain PyTorch") == 2 and machine["cpu"] in table

    # the projection from this report: wall time and cost follow from the rates; more GPUs are never slower
    a = Assumptions()
    proj = project(report, None, a)
    rows = proj["rows"]
    assert [r["gpus"] for r in rows] == [1, 4, 8, 32]
    for r in rows:
        assert r["hours"] == pytest.approx(a.total_samples / r["samples_per_s"] / 3600)
        s3 = a.total_samples * 2 * a.s3_price_per_1000_get / 1000
        assert r["cost_usd"] == pytest.approx(r["gpu_hours"] * a.price_per_gpu_hour + s3)
        assert r["bound"] in ("step", "step (small per-GPU batch)", "all-reduce", "decode", "S3 requests",
                              "S3 bandwidth")
        assert r["samples_per_s_per_gpu"] <= r["step_samples_per_s"] and math.isfinite(r["samples_per_s"])
    assert all(b["samples_per_s"] >= a_["samples_per_s"] for a_, b in itertools.pairwise(rows))
    # 32 GPUs, one prefix: two GETs per sample cannot exceed S3's per-prefix request rate
    assert rows[-1]["samples_per_s"] <= a.s3_get_per_s_per_prefix / 2 + 1e-6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_sh_dry_run_writes_its_json(synth_root, tmp_path):
    # the script makes its own clips; hand it four of the fixture's so the test does not wait for synthesis
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    rows = [json.loads(line) for line in (synth_root / "manifest.jsonl").read_text().splitlines()][:4]
    for row in rows:
        for key in ("video", "audio", "meta"):
            shutil.copy(synth_root / row[key], data / row[key])
    (data / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    out = tmp_path / "out"
    proc = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--dry-run", str(out), "--data-dir", str(data)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=540,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["dry_run"] is True and report["errors"] == {}
    assert (out / "gpu.log").read_text().count("done in") >= 5
    steps = {r["variant"]: r for r in report["step"]}
    assert {"fp32, eager", "bf16, eager", "bf16 + channels_last, eager"} <= set(steps)
    # on the CPU the GPU variants run without bf16 autocast and channels_last (bench/gpu.py): each row says so
    assert [(r["amp_bf16"], r["channels_last"]) for r in report["step"]] == [(False, False)] * len(report["step"])
    for r in report["step"]:  # batch x 1000 ms: a rate and a step time measured over the same steps
        assert r["batch"] == 2 and r["samples_per_s"] * r["ms_per_step"] == pytest.approx(2 * 1000, rel=1e-6)
    compiled = report["compile"]
    assert compiled["compiled"] == "aot_eager" and compiled["speedup_over_eager"] == pytest.approx(
        compiled["samples_per_s"] / steps["bf16 + channels_last, eager"]["samples_per_s"])
    loader = report["decode"]["dali_cpu"]
    assert loader["samples_per_s"] > 0 and loader["samples"] == 2 * 2 * len(rows)  # two timed epochs of every clip, in pairs
    keeps = report["keeps_up"]
    assert keeps["loader_over_step"] == pytest.approx(keeps["loader_samples_per_s"] / keeps["step_samples_per_s"])
    assert 0 <= report["end_to_end"]["data_wait_fraction"] < 1 and report["end_to_end"]["samples"] > 0
    assert report["gpu_check"]["returncode"] == 2  # no GPU here: gpu_check says so instead of failing


def test_projection_takes_the_measured_gets_per_sample_and_the_node_cache(tmp_path):
    from bench.project import main as project_main
    cpu = json.loads((REPO / "docs" / "bench-cpu.json").read_text())
    clips = cpu["clip_bytes"]
    set_clips = 30_000 * 0.8
    set_gb = set_clips * clips["sample_mb"] / 1e3
    base = project(cpu, None, Assumptions(per_gpu_batch=32))["rows"]
    fits = project(cpu, None, Assumptions(per_gpu_batch=32, node_cache_gb=2 * set_gb))["rows"]
    half = project(cpu, None, Assumptions(per_gpu_batch=32, node_cache_gb=set_gb / 2))["rows"]
    for b, f, h in zip(base, fits, half):
        n, nodes = b["gpus"], math.ceil(b["gpus"] / 8)
        once = nodes * set_clips / 7_000_000  # each node fetches each object once, then reads its disk
        assert b["s3_gets_per_sample"] == 2 and f["s3_gets_per_sample"] == pytest.approx(2 * once)
        assert h["s3_gets_per_sample"] == pytest.approx(2 * (0.5 + 0.5 * once))
        assert f["s3_request_cap_per_gpu"] == pytest.approx(5500 / f["s3_gets_per_sample"] / n)
        assert f["samples_per_s"] >= h["samples_per_s"] >= b["samples_per_s"]
        assert f["cost_usd"] < b["cost_usd"]  # fewer GETs billed
    assert base[2]["bound"] == "S3 requests" and fits[2]["bound"] != "S3 requests"  # 8 GPUs

    # --cache reads bench.cache's JSON: its steady-state epochs replace the assumed figures
    measured = {"gets_per_sample": {"torchcodec_cache_off": [2.0, 2.5, 2.5], "torchcodec_cache_on": [2.0, 0.25, 0.0]}}
    (tmp_path / "cache.json").write_text(json.dumps(measured))
    out = project_main(["--cpu", str(REPO / "docs" / "bench-cpu.json"), "--cache", str(tmp_path / "cache.json"),
                        "--gpus", "1"])
    assert out["assumptions"]["s3_gets_per_sample"] == 2.5 and out["assumptions"]["cache_gets_per_sample"] == 0.25
    assert out["rows"][0]["s3_gets_per_sample"] == 2.5
    assert "measured by bench.cache" in out["sources"]["S3 GETs per sample"]


@pytest.mark.slow
def test_bench_cache_counts_no_gets_from_the_second_epoch_with_the_cache(synth_root):
    from bench import cache
    r = cache.run(clips=4, delay_ms=30.0, batch_size=2, threads=1, root=str(synth_root), timed_delays_ms=(30.0,),
                  timed_fetch_threads=(8,))  # one cell of the timed grid: its rates are the benchmark's business
    g = r["gets_per_sample"]  # epochs 0, 1, 2: two objects per sample, none once the node has them
    assert g["torchcodec_cache_off"] == [2.0, 2.0, 2.0] and g["torchcodec_cache_on"] == [2.0, 0.0, 0.0]
    # DALI's epoch e holds its run-ahead into e+1 (here the whole of it: 2 batches ahead, 2 per epoch)
    assert g["dali_cache_off"] == [4.0, 2.0, 2.0] and g["dali_cache_on"] == [2.0, 0.0, 0.0]
    rates = {**r["fetch_stage_samples_per_s"], **r["loader_samples_per_s"]}
    assert set(rates) == {"30ms_threads8", "dali_30ms_threads8", "torchcodec_30ms_threads8",
                          "dali_30ms_threads8_cached", "torchcodec_30ms_threads8_cached"}
    assert all(v > 0 for v in rates.values())
    assert r["serial_bound_samples_per_s"] == pytest.approx(1000 / 60, abs=0.1)
