"""jobs.pretext on a real local Ray cluster (ray start --head, token auth), a moto S3 endpoint and an MLflow server:
`ray job submit` -> 2 DDP workers reading their shards through DALI (CPU) -> rank 1 killed before the first checkpoint
(the run restarts from nothing) and again mid-run (it resumes from its last checkpoint in S3), while the MLflow server
is away for part of the run -> the run finishes -> MLflow holds params, every step's metrics and the registered model,
which loads.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
import yaml

from cluster import local
from flipray.dataset.store import upload_dataset

pytestmark = pytest.mark.slow  # starts moto, MLflow and a Ray head

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.num_frames=3", "data.eval_windows=1", "data.resize=40", "data.crop=32", "data.n_mels=32",
        "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32", "train.log_every=1"]


@pytest.fixture(scope="module")
def cluster_services(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    services = local.up(state, ray_cpus=4)
    yield services
    local.down(state)
    ray_temp = local.ray_temp_dir(state)  # the pytest folder's path is too long for Ray's sockets: Ray's logs went to
    if state not in ray_temp.parents:     # a short folder in the system temp dir, which pytest does not clean
        shutil.rmtree(ray_temp, ignore_errors=True)


def _submit_command(args: list[str], env_vars: dict[str, str]) -> list[str]:
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] = env_vars
    return [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "jobs.pretext", *args]


def test_ray_job_survives_lost_workers_and_an_mlflow_outage_and_registers_the_model(cluster_services, synth_root,
                                                                                    monkeypatch, tmp_path):
    services = cluster_services
    for k, v in services.env.items():
        monkeypatch.setenv(k, v)
    upload_dataset(synth_root, "s3://flipray/tiny/")
    run = "fault-drill"
    # 12 train clips, global batch 4 = 2 workers x 2: 3 steps per epoch; checkpoints every 8 samples (2 steps);
    # rank 1 dies at step 1, before any checkpoint (every restart passes step 1 again: the drill must fire once, not
    # on every attempt until max_failures ends the run), then at step 5, after the checkpoint of step 4.
    sets = FAST + ["data.root=s3://flipray/tiny/", "data.loader=dali", "data.cache=false", "train.batch_size=4",
                   "train.total_samples=40", "train.checkpoint_every_samples=8", "train.eval_every_samples=12",
                   "cluster.workers=2", "cluster.storage_path=s3://flipray/ray-results", "cluster.max_failures=3",
                   "cluster.keep_checkpoints=2"]  # two drilled failures and one to spare
    cmd = _submit_command(["--config", "demo", "--run-name", run, *sum((["--set", s] for s in sets), [])],
                          # RAY_DEDUP_LOGS=0: the two ranks' near-identical "resumed at" lines must both reach the log
                          {"FLIPRAY_FAULT_AT_STEP": "1,5", "FLIPRAY_FAULT_RANK": "1", "RAY_DEDUP_LOGS": "0"})
    log = tmp_path / "job.log"
    from mlflow import MlflowClient
    client = MlflowClient(services.mlflow.url)

    with open(log, "w") as out_file:
        job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **services.env, "PYTHONUNBUFFERED": "1"},
                               stdout=out_file, stderr=subprocess.STDOUT, text=True)
        try:
            # The MLflow server goes away once the last attempt (after the fault at step 5) has resumed, and comes back
            # (same port and store) once its rank 0 has said it is not answering: training goes on meanwhile, its
            # metrics held (a held metric going through a checkpoint: tests/test_pretext_resume.py)
            assert local._eventually(lambda: "rank 0 resumed at step" in log.read_text(), 300), \
                f"no resume after step 5 within 300 s\n{log.read_text()[-6000:]}"
            local.down(services.state_dir, names=["mlflow"])
            assert local._eventually(lambda: "is not answering" in log.read_text(), 300), \
                f"rank 0 did not notice the outage within 300 s\n{log.read_text()[-6000:]}"
            local.up(services.state_dir, s3=False, ray=False, mlflow_port=services.mlflow.port)
            job.wait(timeout=900)
        finally:
            job.kill()
    out = log.read_text()
    assert job.returncode == 0, out[-6000:]
    for step in (1, 5):
        assert out.count(f"fault drill: rank 1 exits at step {step}") == 1, out[-6000:]
    assert "flip accuracy: test" in out and "registered model: models:/flipray-pretext/" in out, out[-6000:]
    back = re.search(r"answers again after \d+ s: (\d+) held metrics sent", out)
    assert back and int(back.group(1)) > 0, out[-6000:]

    # MLflow: one run with the config as params and a continuous step axis across the restarts and the outage
    exp = client.get_experiment_by_name("flipray-pretext")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`flipray.run_name` = '{run}'")
    assert len(runs) == 1
    r = runs[0]
    assert r.data.params["train.total_samples"] == "40" and r.data.params["data.loader"] == "dali"
    history = client.get_metric_history(r.info.run_id, "samples_seen")
    by_step = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert sorted(by_step) == list(range(1, 11))                 # steps 1..10, none missing
    assert all(len(v) == 1 for v in by_step.values())            # a re-run step saw the same samples as before
    assert by_step[10] == {40.0}
    # The restart after step 1 began from nothing (no resumed_from_step); the one after step 5 resumed from a
    # checkpoint (step 2 or 4, depending on whether the step-4 checkpoint was registered before rank 1 died)
    resumed = client.get_metric_history(r.info.run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].value in (2.0, 4.0), resumed
    assert "data_wait_fraction" in r.data.metrics
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"curves.png", "model"} <= artifacts

    # The registered model loads back as flipray's class with the final weights
    from flipray.tracking import load_pretrained
    versions = client.search_model_versions("name = 'flipray-pretext'")
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.run_id == r.info.run_id and "config" in newest.tags
    model, cfg = load_pretrained("models:/flipray-pretext/latest", services.mlflow.url)
    assert type(model).__name__ == "SpatialAlignmentNet" and cfg.data.crop == 32 and cfg.data.loader == "dali"
    video = torch.zeros(1, 3, 3, 32, 32)
    audio = torch.zeros(1, 2, cfg.window_samples)  # the waveform, as the loaders hand it: the front end is in the model
    assert model(video, audio).shape == (1,)
    # ... and the final test accuracy in MLflow is that model's: scoring the test split here gives the same fraction
    # (one sample's logit at 0 may land on the other side with another thread count: a tolerance of one sample)
    from flipray.pretext.train import evaluate_splits
    again = evaluate_splits(model, cfg, "cpu", splits=("test",))["test"]
    assert again["samples"] > 0 and again["clips_skipped"] == 0
    assert r.data.metrics["final_test_flip_acc"] == pytest.approx(again["acc"], abs=1.01 / again["samples"])

    # Checkpoints landed in the moto bucket and were pruned (6 were reported): the newest two, plus at most the one the
    # restart resumed from, which Ray's checkpoint manager keeps past the restart
    s3 = boto3.client("s3", endpoint_url=services.env["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flipray", Prefix=f"ray-results/{run}/")["Contents"]]
    checkpoints = {k.split("/")[2] for k in keys
                   if k.split("/")[2].startswith("checkpoint_") and not k.endswith(".json")}
    assert 2 <= len(checkpoints) <= 3, checkpoints
    assert any(k.endswith("checkpoint.pt") for k in keys)

    # Sample accounting: the killed worker's run trained on exactly the planned samples (per-epoch digests of the
    # (epoch, item) pairs, all ranks and attempts together), none repeated or skipped across the restart
    from flipray.config import load_config
    from flipray.pretext.data import num_items
    from flipray.pretext.train import digest_mismatch, load_checkpoint, planned_digests
    from flipray.dataset.store import Store
    newest = max((k for k in keys if k.endswith("checkpoint.pt")), key=lambda k: k.split("/")[2])
    s3.download_file("flipray", newest, str(tmp_path / "checkpoint.pt"))
    state = load_checkpoint(tmp_path / "checkpoint.pt")["state"]
    n = len(Store("s3://flipray/tiny/").read_manifest("train"))
    assert state["samples_seen"] == 40
    cfg = load_config("demo", sets)
    assert digest_mismatch(state["sample_digests"], planned_digests(cfg, num_items(n, cfg, train=True))) == []

