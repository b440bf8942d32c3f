"""The Kubernetes retry path, exercised locally: the pretext RayJob's driver fails mid-run, the job is submitted again
with the same --run-name (what `backoffLimit`, a re-apply or a lost head pod does), and the run continues from its
last checkpoint in the same Ray Train run and the same MLflow run; when the MLflow server is away at its end, the job
says so and the same command again, once it answers, logs what was held and registers the model; applied once more
after it finished, it trains and registers nothing.

    .venv/bin/python -m pytest tests/test_pretext_resume.py -x -q
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from flipray.overrides import UsageError
from flipray.pretext.train import load_checkpoint
from jobs import pretext

FAST = ["data.num_frames=3", "data.eval_windows=1", "data.resize=40", "data.crop=32", "data.n_mels=32",
        "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32", "train.log_every=1"]


@pytest.mark.slow
def test_resubmitting_with_the_same_run_name_continues_from_the_checkpoint(synth_root, ray_local, mlflow_servers,
                                                                           tmp_path, monkeypatch):
    import threading

    from mlflow import MlflowClient

    from cluster import local

    server = mlflow_servers[0]
    uri = server.url
    # 12 train clips, batch 4: a checkpoint every 2 steps (8 samples); the first attempt dies at step 5, after the
    # checkpoints of steps 2 and 4 (the step-4 one may not have reached Ray Train's controller yet: its reports are
    # collected asynchronously). max_failures=0: the failure ends the job, as a lost head pod would.
    sets = FAST + [f"data.root={synth_root}", "train.batch_size=4", "train.total_samples=24",
                   "train.checkpoint_every_samples=8", "train.eval_every_samples=12", "cluster.workers=1",
                   f"cluster.storage_path={tmp_path / 'ray-results'}", "cluster.max_failures=0",
                   "cluster.keep_checkpoints=2"]
    argv = ["--config", "demo", "--run-name", "flipray-pretext", "--tracking-uri", uri,
            *sum((["--set", s] for s in sets), [])]
    monkeypatch.setenv("FLIPRAY_FAULT_AT_STEP", "5")
    monkeypatch.setenv("FLIPRAY_FAULT_RANK", "0")
    with pytest.raises(Exception):  # attempt 1: the driver fails (Ray Train gives up after max_failures)
        pretext.main(argv)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("flipray-pretext")
    first = client.search_runs([exp.experiment_id])
    assert len(first) == 1 and first[0].info.status == "RUNNING"
    assert max(m.value for m in client.get_metric_history(first[0].info.run_id, "samples_seen")) == 16.0  # died at step 5, before logging it
    assert (tmp_path / "ray-results" / "flipray-pretext").is_dir()

    # what a node lost mid-copy leaves: a checkpoint folder Ray Train never registered, its checkpoint.pt cut off
    run_dir = tmp_path / "ray-results" / "flipray-pretext"
    written = sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))
    assert written
    cut_off = run_dir / "checkpoint_2099-01-01_00-00-00.000000" / "checkpoint.pt"
    cut_off.parent.mkdir()
    cut_off.write_bytes(written[-1].read_bytes()[:4096])

    # the same run name with another network: refused before Ray restores a checkpoint it cannot load
    monkeypatch.delenv("FLIPRAY_FAULT_AT_STEP")
    with pytest.raises(UsageError, match=r"continues MLflow run .*: the run's network cannot change "
                                         r"\(model.front_end ild-ipd-gcc -> logmel\)"):
        pretext.main([*argv, "--set", "model.front_end=logmel"])

    # attempt 2: the same command; the MLflow server goes away once the attempt has logged its restart, so the run
    # trains to its end with its metrics held, waits cluster.mlflow_wait_s for the server, and says what to do
    def stop_server_once_resumed():
        deadline = time.time() + 300
        while not client.get_metric_history(first[0].info.run_id, "resumed_from_step") and time.time() < deadline:
            time.sleep(0.1)
        local.stop(server)

    watcher = threading.Thread(target=stop_server_once_resumed, daemon=True)
    watcher.start()
    with pytest.raises(SystemExit) as away:
        pretext.main([*argv, "--set", "cluster.mlflow_wait_s=2"])
    watcher.join(60)
    assert "run flipray-pretext is trained (checkpoint " in str(away.value) and \
        f"no MLflow server answers at {uri}" in str(away.value) and "run the same command again" in str(away.value)
    assert not cut_off.parent.exists()  # removed (with attempt 1's step-4 copy when it never reached the controller)

    # attempt 3: the same command, the server back on its port and store: the final checkpoint's held metrics are
    # sent, and the model registered
    mlflow_servers.append(local.start_mlflow(tmp_path / "mlflow", port=server.port))
    assert client.get_run(first[0].info.run_id).info.status == "RUNNING"  # attempt 2 finished nothing
    assert not client.search_registered_models()
    summary = pretext.main(argv)
    kept = sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))
    assert len(kept) == 2 and str(summary["checkpoint"]) in {str(p.parent) for p in kept}  # keep_checkpoints=2
    assert [load_checkpoint(p)["state"]["samples_seen"] for p in kept] == [24, 24]  # step 6, then the final one
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and summary["run_id"] == first[0].info.run_id  # the same MLflow run
    run_id = summary["run_id"]
    resumed = sorted(m.value for m in client.get_metric_history(run_id, "resumed_from_step"))
    assert len(resumed) == 2 and resumed[0] in (2.0, 4.0), resumed  # from a checkpoint, not from sample 0
    assert resumed[1] == 6.0  # attempt 3 restored the final checkpoint: nothing to train, only to log and register
    by_step = {}
    for m in client.get_metric_history(run_id, "samples_seen"):
        by_step.setdefault(m.step, set()).add(m.value)
    assert sorted(by_step) == list(range(1, 7)) and all(len(v) == 1 for v in by_step.values())
    assert by_step[6] == {24.0} and summary["metrics"]["samples_seen"] == 24  # those logged while it was away too
    assert "final_test_flip_acc" in client.get_run(run_id).data.metrics
    assert summary["model_version"] == 1 and str(tmp_path / "ray-results" / "flipray-pretext") in \
        str(summary["checkpoint"])
    assert client.get_run(run_id).info.status == "FINISHED"

    # applied once more (a finished RayJob deleted and re-applied): nothing trained, nothing registered
    again = pretext.main(argv)
    assert again["already_finished"] is True and again["run_id"] == run_id and again["samples_seen"] == 24
    assert len(client.search_model_versions("name = 'flipray-pretext'")) == 1
    assert len(client.search_runs([exp.experiment_id])) == 1


# A second driver on the session's Ray instance that holds a run name, as a running `python -m jobs.pretext` does.
_RUN_HOLDER = """
import sys, time
import ray
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
from jobs.pretext import run_lease
with run_lease(sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_job_with_the_run_name_of_a_running_one_is_refused_and_a_dead_ones_is_taken_over(synth_root, ray_local,
                                                                                            tmp_path, monkeypatch):
    """`ray job submit` of the same pretext job twice (the client lost its connection and the user sent it again):
    while the first job's driver runs, the second is refused with one line naming it, before it writes anything to
    MLflow; once that driver is gone (killed here), its claim goes with it and the run name can be taken."""
    import os
    import signal
    import subprocess
    import sys

    from flipray import tracking
    holder = subprocess.Popen([sys.executable, "-c", _RUN_HOLDER, ray_local.get_runtime_context().gcs_address,
                               "twice"], stdout=subprocess.PIPE, text=True, cwd=str(tmp_path),
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(pretext, "LEASE_WAIT_S", 2.0)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        argv = ["--config", "demo", "--run-name", "twice", "--tracking-uri", uri, "--set", f"data.root={synth_root}"]
        with pytest.raises(UsageError) as refused:
            pretext.main(argv)
        assert str(refused.value).startswith("--run-name twice: another job is training this run on this Ray "
                                             "cluster (job ")
        assert f"driver pid {holder.pid} on " in str(refused.value)
        experiment = tracking.init_tracking(uri, "flipray-pretext")
        assert tracking.find_run(experiment, "twice") is None  # refused before any MLflow run was made
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the driver dies without cleaning up
        holder.wait()
    with pretext.run_lease("twice", wait_s=30):  # Ray clears a dead driver's actors: the name is free again
        pass
