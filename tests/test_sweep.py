"""tuning/sweep.py on a real local Ray instance and MLflow server: a tiny localization sweep is interrupted (SIGINT to
its driver) and restored; the MLflow server goes away while the restored sweep's trials run and comes back, and they
wait as long as the restoring command's --mlflow-wait-s says; ASHA stops the poor trials early; every trial is one
MLflow run under the sweep's parent run; best.yaml reproduces the best trial's score when run again.

    .venv/bin/python -m pytest tests/test_sweep.py -x -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flipray.tasks import localize
from flipray.config import load_config
from flipray.tasks.base import apply
from flipray.pretext.models import SpatialAlignmentNet

REPO = Path(__file__).resolve().parents[1]

# Eight trials (4 learning rates x 2 samples), two at a time, on 16 synthetic 4-s clips.
DEFINITION = {
    "method": "flip", "preset": "demo", "metric": "iou", "mode": "max", "color_by": "lr",
    "space": {"lr": {"grid": [3e-3, 1e-7, 2e-3, 1e-7]}},
    "fixed": {"epochs": 4, "batch_size": 8, "samples_per_clip": 2, "lr_backbone": 0.0, "threads": 1,
              "eval_split": "val", "figure_clips": 1, "eval_hop_s": 1.0, "ref_min_gap_s": 1.0},
    "asha": {"grace_period": 1, "reduction_factor": 2},
    "max_concurrent": 2, "resources": {"cpu": 1},
}


def _trial_runs(uri: str) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments() if e.name == "flipray-sweeps"]
    return client.search_runs(exps, filter_string="tags.`flipray.trial_id` != ''") if exps else []


def _ray_worker_logs() -> str:
    """What the workers of this process's Ray instance wrote (the session's logs folder: trials log there)."""
    import ray
    folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "".join(p.read_text(errors="replace") for p in folder.glob("worker-*.err"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_asha_mlflow_outage_best_config_and_restore(synth_root, ray_local, mlflow_servers, tmp_path):
    # A flip "pretext" checkpoint of the demo shape (random weights: the sweep's mechanics are under test here).
    pcfg = load_config("demo")
    ckpt = tmp_path / "pretext.pt"
    torch.save({"model": SpatialAlignmentNet(pcfg).state_dict(), "config": pcfg.to_dict()}, ckpt)
    definition = tmp_path / "localize.yaml"
    definition.write_text(yaml.safe_dump(DEFINITION))
    uri = mlflow_servers[0].url
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"  # the server's own store, read while it is away
    args = ["--task", "localize", "--samples", "2", "--definition", str(definition), "--data", str(synth_root),
            "--pretext", f"flip={ckpt}", "--name", "sweep-test", "--storage", str(tmp_path / "tune"),
            "--out", str(tmp_path / "out"), "--tracking-uri", uri]

    # 1. Start the sweep as its own driver (own Ray instance) and interrupt it once a trial has finished.
    env = {**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "sweep.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tuning.sweep", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if any(r.info.status == "FINISHED" for r in _trial_runs(uri)):
                break
            time.sleep(2)
        assert proc.poll() is None, "the sweep ended before it could be interrupted: " + \
            (tmp_path / "sweep.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: Tune saves the experiment state and stops
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    finished_before = {r.data.tags["flipray.trial_id"] for r in _trial_runs(uri) if r.info.status == "FINISHED"}
    assert finished_before

    # 2. Restore in this process (the ray_local instance): finished trials are kept, not run again. Once the restored
    #    sweep has started a trial, the MLflow server goes away for a while (stopped, then started again on its port
    #    and store): the trials that log meanwhile wait for it and go on, none fails.
    import threading

    from cluster import local
    from mlflow import MlflowClient
    before = {r.info.run_id for r in _trial_runs(uri)}

    def outage():
        deadline = time.time() + 300
        while not {r.info.run_id for r in _trial_runs(store)} - before and time.time() < deadline:
            time.sleep(0.2)
        local.stop(mlflow_servers[0])
        time.sleep(5)
        mlflow_servers.append(local.start_mlflow(tmp_path / "mlflow", port=mlflow_servers[0].port))

    away = threading.Thread(target=outage, daemon=True)
    away.start()
    summary = __import__("tuning.sweep", fromlist=["main"]).main([*args, "--restore", "--mlflow-wait-s", "300"])
    away.join(60)
    assert len(mlflow_servers) == 2  # the outage happened while the restored sweep ran
    worker_logs = _ray_worker_logs()
    assert f"MLflow at {uri} is not answering" in worker_logs and f"MLflow at {uri} answers again" in worker_logs
    # every trial waits as long as the restoring command says (300 s), not as the interrupted one did (600 s)
    waits = {line.rsplit("waiting up to ", 1)[1].split()[0] for line in worker_logs.splitlines()
             if f"MLflow at {uri} is not answering" in line}
    assert waits == {"300"}, waits
    assert summary["trials"] == 8 and summary["errors"] == 0
    runs = _trial_runs(uri)
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["flipray.trial_id"], []).append(r)
    assert len(by_trial) == 8
    superseded = {r.data.tags["flipray.trial_id"] for r in runs if r.data.tags.get("flipray.superseded") == "true"}
    for trial_id in finished_before - superseded:
        assert len(by_trial[trial_id]) == 1, f"finished trial {trial_id} ran again after the restore"
    for trial_id, trial_runs in by_trial.items():  # none failed in the outage and ran again under another run
        assert len([r for r in trial_runs if r.info.run_id not in before]) <= 1, trial_id
    for trial_id in superseded:  # ended its run, interrupted before Tune recorded it: run again, under a new run
        earlier, rerun = sorted(by_trial[trial_id], key=lambda r: r.info.start_time)
        assert trial_id in finished_before and "flipray.superseded" not in rerun.data.tags
        assert MlflowClient(uri).get_run(earlier.info.run_id).info.status == "KILLED"

    # 3. ASHA stopped some trials before their 4 epochs; every trial run is under the parent, with its params and
    #    per-epoch metrics, and ended (FINISHED, or KILLED when ASHA stopped it).
    assert summary["stopped_early"] >= 1
    parent = summary["mlflow_parent_run"]
    client = MlflowClient(uri)
    complete = {}
    for trial_runs in by_trial.values():
        run = client.get_run(max(trial_runs, key=lambda r: r.info.start_time).info.run_id)  # a rerun is newest
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert float(run.data.params["lr"]) in (3e-3, 1e-7, 2e-3)
        history = client.get_metric_history(run.info.run_id, "iou")
        assert 1 <= len(history) <= 4 and [m.step for m in history] == list(range(1, len(history) + 1))
        if run.info.status == "FINISHED":
            complete[run.info.run_id] = history[-1].value
            assert len(history) == 4
        else:
            assert run.info.status == "KILLED" and run.data.tags.get("flipray.stopped_early") == "true"
    assert complete and summary["best_metric"] == pytest.approx(max(complete.values()))

    # 4. best.yaml is a full localize config; run again on the val split it gives the best trial's score.
    best_yaml = Path(summary["best_config"])
    best = yaml.safe_load(best_yaml.read_text())
    assert best["lr"] in (3e-3, 1e-7, 2e-3) and best["epochs"] == 4 and best["eval_split"] == "test"
    cfg = apply(localize.Config(), {**best, "eval_split": "val"})
    again = localize.run_trial(cfg)["metrics"]["iou"]
    assert again == pytest.approx(summary["best_metric"], abs=0.5)  # IOU in %: same seed, same data, CPU
    assert Path(summary["trials_png"]).stat().st_size > 10_000
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"best.yaml", "trials.png"} <= artifacts
    json.dumps(summary)


@pytest.mark.slow
def test_a_rerun_trial_supersedes_its_finished_run_and_no_other(tmp_path):
    """The interrupt between a trial ending its run and Tune recording it, played out on a real sqlite store."""
    from mlflow import MlflowClient
    from tuning.sweep import supersede_unrecorded_runs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("sweeps")
    parent, other_parent = (client.create_run(exp).info.run_id for _ in range(2))

    def trial_run(trial_id, status, under=parent):
        run_id = client.create_run(exp, tags={"mlflow.parentRunId": under, "flipray.trial_id": trial_id}).info.run_id
        client.set_terminated(run_id, status=status)
        return run_id
    stale, killed = trial_run("t_00000", "FINISHED"), trial_run("t_00000", "KILLED")
    done, elsewhere = trial_run("t_00001", "FINISHED"), trial_run("t_00000", "FINISHED", under=other_parent)
    assert supersede_unrecorded_runs(client, exp, parent, "t_00000") == 1
    assert client.get_run(stale).info.status == "KILLED" and client.get_run(stale).data.tags["flipray.superseded"]
    for run_id in (killed, done, elsewhere):
        run = client.get_run(run_id)
        assert "flipray.superseded" not in run.data.tags and run.info.status == ("KILLED" if run_id == killed
                                                                                 else "FINISHED")


@pytest.mark.parametrize("task", __import__("tuning.sweep", fromlist=["sweepable"]).sweepable())
def test_every_task_has_a_sweep_definition_that_fits_its_config(task):
    import dataclasses

    from flipray import tasks
    from tuning.sweep import load_definition, search_space
    d = load_definition(task)
    module = tasks.get(task)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    assert set(d["space"]) <= fields and set(d.get("fixed", {})) <= fields
    assert d["method"] in module.METHODS and d.get("preset", "small") in module.PRESETS
    space = search_space(d["space"])
    assert space.keys() == d["space"].keys()
    with pytest.raises(ValueError, match="unknown kind"):
        search_space({"lr": {"gaussian": [0, 1]}})
