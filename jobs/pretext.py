"""Distributed pretext training on Ray Train, tracked in MLflow, registered as `flipray-pretext`.

    python -m cluster.local up && eval "$(python -m cluster.local env)"
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.pretext --config demo --set data.root=s3://flipray/demo/ --set cluster.workers=2

Every Ray Train worker runs `flipray.pretext.train.fit`, the loop `flipray train-pretext` runs locally, on its shard of each
epoch (DDP over gloo on CPU, NCCL on GPU), reading with the loader `data.loader` names (DALI's GPU decoder on GPU
workers). The global batch stays `train.batch_size` whatever the worker count (gradient accumulation when
`train.micro_batch_size` is smaller), and the learning rate follows samples seen. Checkpoints go to
`cluster.storage_path/<run name>` (a folder or s3://) every `train.checkpoint_every_samples`; a failed worker group
restarts from the newest one (`cluster.max_failures`), and running the same command with the same `--run-name`
continues a stopped run (the k8s RayJob passes a fixed one, so its retries and re-applies do); a finished run is not
trained or registered again. Rank 0 logs params, metrics, the learning curve and the final model to MLflow.

With `--set cluster.min_workers=M` (< cluster.workers) the run is elastic: it starts on what the cluster has, goes on
with fewer workers after a node loss and grows when nodes return, with the same batch, schedule and samples
(docs/cluster.md, "Failures and scaling"). Every rank evaluates its shard of val/test.

Test-only drills: FLIPRAY_FAULT_AT_STEP=K FLIPRAY_FAULT_RANK=1 makes rank 1 exit at step K once per
run (also when K precedes the first checkpoint, so every restart passes step K again; K1,K2 for one fault at each);
FLIPRAY_FAULT_SAMPLER=skip|repeat makes a resumed attempt start one sample late or early; FLIPRAY_HOLD_DIR (and
FLIPRAY_HOLD_S) makes every attempt note its start and wait after its first checkpoint until DIR/release exists.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from flipray.config import config_from_dict, load_config
from flipray.overrides import UsageError, user_errors
from flipray.pretext.data import ClipDataset, EpochSampler, check_data_root, num_items, train_sampler
from flipray.pretext.models import SpatialAlignmentNet, count_parameters
from flipray.pretext.train import (calibrate, evaluate, evaluate_splits, fit, load_checkpoint, make_loader,
                                  make_optimizer, new_state, plot_curves, prepare_model, resume_conflict,
                                  save_checkpoint, split_batch, upgrade_state)
from flipray import tracking
from flipray.dataset.store import storage_location

log = logging.getLogger("jobs.pretext")

# Non-secret environment the workers need; credentials come from the nodes' own environment (k8s Secret, IAM role).
# Set on the MLflow run when training and registration are done: a rerun with the same --run-name stops there.
COMPLETED_TAG = "flipray.completed_samples"
LEASE_NAMESPACE = "flipray-runs"  # the Ray namespace of the named actors that hold run names (run_lease)
LEASE_WAIT_S = 20.0  # how long a job waits for a run name still held before it refuses (run_lease)
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "FLIPRAY_FAULT_AT_STEP", "FLIPRAY_FAULT_RANK",
               "FLIPRAY_FAULT_SAMPLER", "FLIPRAY_HOLD_DIR", "FLIPRAY_HOLD_S")


# ---------------------------------------------------------------------------------------------------------------------
# On each Ray Train worker

def fault_fires_once(run_id: str, step: int = 0) -> bool:
    """True the first time a run's fault drill asks at this step, False after: the mark lives in the cluster's GCS
    key-value store, which outlives the worker groups Ray Train restarts (a restart from no checkpoint replays step
    K)."""
    from ray.experimental.internal_kv import _internal_kv_put
    return not _internal_kv_put(f"fault-drill:{run_id}:{step}", b"fired", overwrite=False, namespace="flipray")


def train_worker(config: dict):
    import ray.train
    import ray.train.torch

    os.environ.update(config["env"])
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    micro, accum = split_batch(cfg.train.batch_size, world, cfg.train.micro_batch_size)

    model = prepare_model(SpatialAlignmentNet(cfg), cfg, device)  # channels_last on GPU workers
    model = ray.train.torch.prepare_model(model)  # DDP, on this worker's device
    module = getattr(model, "module", model)
    optimizer = make_optimizer(model, cfg)
    state, restored = new_state(), ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            payload = load_checkpoint(Path(d) / "checkpoint.pt")
        module.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        state = upgrade_state(payload["state"], payload["config"]["cluster"]["workers"])
        torch.set_rng_state(payload["rng"])
        log.info("rank %d resumed at step %d, %d samples (epoch %d, position %d) on %d workers (was %d)", rank,
                 state["step"], state["samples_seen"], state["epoch"], state["epoch_pos"], world,
                 state.get("world_size", world))
    state["world_size"] = world
    shift, fault_sampler = 0, os.environ.get("FLIPRAY_FAULT_SAMPLER", "")
    if restored is not None and fault_sampler:  # test-only: a resume that skips or repeats one sample
        shift = {"skip": 1, "repeat": -1}[fault_sampler]
        log.error("sampler fault drill: resuming at position %d instead of %d", state["epoch_pos"] + shift,
                  state["epoch_pos"])

    epoch_items, train_loader = _train_loader(cfg, rank, world, micro, device, shift)
    val_set = ClipDataset(cfg, "val", train=False)  # every rank scores its shard; the sums are all-reduced
    val = make_loader(val_set, cfg, EpochSampler(len(val_set), cfg.train.seed, shuffle=False, rank=rank,
                                                 world=world), micro)
    if rank == 0:
        log.info("%d workers x micro-batch %d x %d accumulation = batch %d; %.2fM parameters; %d train items "
                 "per epoch", world, micro, accum, cfg.train.batch_size, count_parameters(module) / 1e6, epoch_items)
    hold_dir, hold_s = os.environ.get("FLIPRAY_HOLD_DIR"), float(os.environ.get("FLIPRAY_HOLD_S", "0"))
    attempt = {"held": False}
    if hold_dir and rank == 0:
        _hold_note(hold_dir, "start", world=world, restored_step=state["step"] if restored is not None else None)

    # rank 0 logs; an MLflow server that stops answering holds nothing up (tracking.MetricLog)
    held = state.pop("mlflow_held", ())  # what the server had not taken when the checkpoint was written
    mlflow_log = tracking.MetricLog(config["tracking_uri"], config["run_id"], held) if rank == 0 else None
    if mlflow_log is not None and restored is not None:  # restarts stay visible in the MLflow run
        mlflow_log.log(state["step"], resumed_from_step=state["step"])
    fault_steps = {int(k) for k in os.environ.get("FLIPRAY_FAULT_AT_STEP", "").split(",") if k.strip()}
    fault_rank = int(os.environ.get("FLIPRAY_FAULT_RANK", "1"))

    def on_metrics(kind, state, m):
        if (kind == "train" and rank == fault_rank and state["step"] in fault_steps
                and fault_fires_once(config["run_id"], state["step"])):
            log.error("fault drill: rank %d exits at step %d", rank, state["step"])
            if mlflow_log is not None:  # what it logged reaches MLflow first, so a test knows what to expect
                mlflow_log.close(30)
            os._exit(1)
        if mlflow_log is None:
            return
        step = state["step"]
        if kind == "train" and step % cfg.train.log_every == 0:
            mlflow_log.log(step, loss=m["loss"], flip_acc=m["acc"], lr=m["lr"], samples_per_s=m["samples_per_s"],
                           samples_seen=state["samples_seen"])
        elif kind == "val":
            mlflow_log.log(step, val_loss=m["loss"], val_flip_acc=m["acc"])
        elif kind == "epoch":
            mlflow_log.log(step, epoch_loss=m["loss"], epoch_flip_acc=m["acc"],
                           epoch_samples_per_s=m["samples_per_s"], data_wait_fraction=m["data_wait_fraction"],
                           epoch=state["epoch"], clips_skipped=m["skipped"])

    def save(state, final_metrics: dict | None = None):
        """Every rank reports (Ray Train's barrier); rank 0 attaches the checkpoint."""
        metrics = {"samples_seen": state["samples_seen"], "step": state["step"], "world_size": world,
                   **(final_metrics or {})}
        val_hist = [h for h in state["history"] if h["kind"] == "val"]
        if val_hist:
            metrics["val_flip_acc"] = val_hist[-1]["acc"]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state["mlflow_held"] = mlflow_log.held()  # a restart from this checkpoint sends them
                save_checkpoint(Path(tmp) / "checkpoint.pt", module, optimizer, state, cfg)
                (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if hold_dir and not attempt["held"] and state["samples_seen"] < cfg.train.total_samples:
            _hold(hold_dir, hold_s, rank, world, state["step"])  # test-only: time to lose or add a node
            attempt["held"] = True

    fit(cfg, model, optimizer, device, state, epoch_items, train_loader,
        validate=lambda: evaluate(module, val, device, world_size=world),
        save=save, world_size=world, accum_steps=accum, on_metrics=on_metrics)

    state["calibration"] = calibrate(module, val, device, world)  # the same temperature on every rank
    accuracy = evaluate_splits(module, cfg, device, rank=rank, world_size=world, batch_size=micro)
    final = {}
    if rank == 0:
        final = {"calibration_temperature": state["calibration"]["temperature"]}
        final.update({f"{split}_flip_acc": r["acc"] for split, r in accuracy.items()})
        final.update({f"{split}_flip_acc_{group}": g["acc"] for split, r in accuracy.items()
                      for group, g in r.get("acc_by_capture", {}).items()})
        mlflow_log.log(state["step"], **{f"final_{k}": v for k, v in final.items()})
        if not mlflow_log.close(cfg.cluster.mlflow_wait_s):  # the unsent stay held: the final checkpoint has them
            with tempfile.TemporaryDirectory() as tmp:
                plot_curves(state["history"], Path(tmp) / "curves.png",
                            f"flip pretext on {world} Ray workers, {cfg.preset} preset")
                mlflow_log.artifact(Path(tmp) / "curves.png")
    save(state, final)


def _train_loader(cfg, rank: int, world: int, micro: int, device, shift: int = 0):
    """(items per epoch, loader(epoch, start)) for this rank's shard, from the loader data.loader names: steps of
    train.batch_size positions, so the shard follows the world size from any checkpointed position.
    (`shift` moves the first start by that many positions: the sampler fault drill.)"""
    shifts = [shift]
    fix = lambda epoch, start: max(start + (shifts.pop() if shifts else 0), 0)
    B = cfg.train.batch_size
    if cfg.data.loader == "dali":
        from dali_pipelines.pretext import DaliClipLoader
        loader = DaliClipLoader(cfg, "train", train=True, batch_size=micro, shard_id=rank, num_shards=world,
                                device="gpu" if device.type == "cuda" else "cpu",
                                device_id=device.index or 0, step_size=B)

        def for_epoch(epoch, start):
            loader.set_epoch(epoch, fix(epoch, start))
            return loader
        return num_items(len(loader.clips), cfg, train=True), for_epoch
    ds = ClipDataset(cfg, "train", train=True)
    return len(ds), lambda epoch, start: make_loader(
        ds, cfg, train_sampler(cfg, len(ds), epoch, fix(epoch, start), rank, world), micro)


def _hold_note(folder: str, kind: str, **fields):
    """Test-only: a timestamped note per attempt (the restart time in docs/cluster.md comes from these)."""
    import json
    Path(folder).mkdir(parents=True, exist_ok=True)
    n = len(list(Path(folder).glob(f"{kind}-*.json")))
    (Path(folder) / f"{kind}-{n}.json").write_text(json.dumps({"time": time.time(), **fields}))


def _hold(folder: str, seconds: float, rank: int, world: int, step: int):
    """Test-only (FLIPRAY_HOLD_DIR): after an attempt's first checkpoint, wait up to `seconds` (until the test
    writes `release`), so a test can remove or add a node at a known point."""
    if rank == 0:
        _hold_note(folder, "hold", world=world, step=step)
    deadline = time.time() + seconds
    while time.time() < deadline and not (Path(folder) / "release").exists():
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------------------
# On the driver

def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens the run: FLIPRAY_MLFLOW_UI (on Kubernetes the port-forward or Ingress address, not the
    in-cluster service name the job talks to), else the tracking server itself."""
    ui = os.environ.get("FLIPRAY_MLFLOW_UI") or (uri if uri.startswith("http") else "")
    if ui:
        return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  ->  experiment {experiment_id}, run {run_id}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.pretext", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="preset (demo, small, paper) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. cluster.workers=4 or train.total_samples=7000000")
    p.add_argument("--run-name", default=None, help="Ray run / MLflow run name; an existing one is continued")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                        "else sqlite:///./mlflow.db)")
    return p.parse_args(argv)


def ray_train_env(c) -> dict[str, str]:
    """Ray Train's own settings that flipray's cluster config sets (Train V2 reads them from the driver's environment
    and passes them to its controller and workers)."""
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(float(c.worker_start_timeout_s))}


def remove_unregistered_checkpoints(result) -> list[str]:
    """Delete the run's checkpoint_* folders Ray Train never registered and return their paths. A node lost while its
    worker copied a checkpoint into storage leaves a folder with a cut-off checkpoint.pt: Ray never restores from it,
    but it reads as the newest checkpoint to anyone who lists the folder (or syncs it elsewhere)."""
    import pyarrow.fs
    fs = result.filesystem
    kept = {checkpoint.path.rstrip("/") for checkpoint, _ in result.best_checkpoints or []}
    if result.checkpoint is not None:
        kept.add(result.checkpoint.path.rstrip("/"))
    removed = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(result.path.rstrip("/"), allow_not_found=True)):
        if (info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
                and info.path.rstrip("/") not in kept):
            fs.delete_dir(info.path)
            removed.append(info.path)
    return removed


@contextlib.contextmanager
def run_lease(run_name: str, wait_s: float = LEASE_WAIT_S):
    """Hold `run_name` on this Ray cluster for the block: a second job with the same --run-name (a `ray job submit`
    sent again while the first still runs, e.g. after the client lost its connection) is refused instead of training
    into the same Ray Train run and MLflow run. The claim is a named actor owned by this driver, so it ends with the
    driver however that ends; a name still held is waited for up to `wait_s` (a driver that just died is cleared
    by Ray within seconds) and then refused, naming the job that holds it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class RunLease:
        def __init__(self, holder: str):
            self.holder = holder

        def who(self) -> str:
            return self.holder

    context = ray.get_runtime_context()
    holder = f"job {context.get_job_id()}, driver pid {os.getpid()} on {socket.gethostname()}"
    name = f"run:{run_name}"
    # beside the driver (node affinity): losing another node does not end the claim while the job goes on
    options = dict(name=name, namespace=LEASE_NAMESPACE, num_cpus=0, max_restarts=0,
                   scheduling_strategy=NodeAffinitySchedulingStrategy(context.get_node_id(), soft=True))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lease = ray.remote(RunLease).options(**options).remote(holder)
            break
        except ValueError:  # the name is taken
            try:
                other = ray.get(ray.get_actor(name, namespace=LEASE_NAMESPACE).who.remote(), timeout=10)
            except (ValueError, ray.exceptions.RayError):
                other = "its driver has ended"  # being cleared
            if time.monotonic() > deadline:
                raise UsageError(f"--run-name {run_name}: another job is training this run on this Ray cluster "
                                 f"({other}); wait for it to end, or give another --run-name") from None
            time.sleep(1.0)
    try:
        ray.get(lease.who.remote())  # placed and answering before anything is written
        yield
    finally:
        ray.kill(lease)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    cfg = load_config(args.config, args.set)
    check_data_root(cfg)  # a wrong data.root is one line here, not a traceback from every worker
    c = cfg.cluster
    if c.register_as == tracking.PRETEXT_MODEL:  # baselines register beside the flip model, not over it
        c.register_as = tracking.pretext_model_name(cfg.train.task)
    run_name = args.run_name or f"pretext-{cfg.preset}-{cfg.train.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.tracking_uri(args.tracking_uri)
    experiment_id = tracking.init_tracking(uri, c.experiment)
    if not ray.is_initialized():
        from flipray import raylocal
        raylocal.init()  # RAY_ADDRESS (failing fast when it does not answer), else a local instance on 127.0.0.1
    with run_lease(run_name, LEASE_WAIT_S):
        return train_run(cfg, run_name, uri, experiment_id)


def train_run(cfg, run_name: str, uri: str, experiment_id: str) -> dict:
    """main's second half, while this job holds the run name: continue or start the MLflow run, train with Ray
    Train (restoring the run's newest checkpoint), register the model; returns the summary main prints."""
    from mlflow import MlflowClient
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = cfg.cluster
    client = MlflowClient(uri)
    previous = tracking.find_run(experiment_id, run_name)
    done = int((previous.data.tags if previous else {}).get(COMPLETED_TAG, -1))
    if done >= cfg.train.total_samples:  # e.g. a finished RayJob applied again: nothing to train, nothing to register
        print(f"run {run_name} already finished ({done} samples, MLflow run {previous.info.run_id}); "
              f"pass another --run-name to train a new model, or a larger train.total_samples to continue it")
        print(f"MLflow run: {run_url(uri, experiment_id, previous.info.run_id)}")
        return {"run_name": run_name, "run_id": previous.info.run_id, "experiment_id": experiment_id,
                "tracking_uri": uri, "already_finished": True, "samples_seen": done}
    if previous is not None:  # its checkpoints are restored: the network they hold must be the one configured
        resume_conflict(previous.data.params, cfg, f"--run-name {run_name} continues MLflow run {previous.info.run_id}")
        run_id = previous.info.run_id
        log.info("continuing MLflow run %s (%s)", run_id, run_name)
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={"flipray.run_name": run_name}).info.run_id
        for k, v in cfg.flat().items():
            client.log_param(run_id, k, v)

    storage_path, filesystem = storage_location(c.storage_path)
    os.environ.update(ray_train_env(c))  # read by TorchTrainer.fit, which hands it to the controller
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id,
                           "env": {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}},
        # min_workers < workers: elastic (Train V2): start with what the cluster has, continue on fewer workers
        # after a loss, grow when capacity returns; each resize restarts the group from the newest checkpoint
        scaling_config=ScalingConfig(num_workers=cfg.worker_range if cfg.worker_range[0] < c.workers
                                     else c.workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker} | ({"GPU": 1} if c.use_gpu
                                                                                        else {}),
                                     elastic_resize_monitor_interval_s=c.resize_check_s),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=c.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=c.max_failures)))
    t0 = time.time()
    result = trainer.fit()
    metrics = result.metrics
    scheme = "s3://" if c.storage_path.startswith("s3://") else ""  # pyarrow's paths on S3 are bucket/key
    removed = [scheme + path for path in remove_unregistered_checkpoints(result)]
    for path in removed:
        print(f"removed {path}: a checkpoint copy Ray Train never registered (cut off by a lost node)")
    try:  # the workers have waited cluster.mlflow_wait_s for a server that stopped answering: no second wait
        tracking.check_store(uri)
    except tracking.StoreError as e:
        raise SystemExit(f"python -m jobs.pretext: run {run_name} is trained (checkpoint "
                         f"{scheme}{result.checkpoint.path}) but {e}; run the same command again once it answers: it "
                         f"logs what is missing and registers the model") from None
    version = None
    if c.register_as:
        with result.checkpoint.as_directory() as d:
            tags = {"config": yaml.safe_dump(cfg.to_dict(), sort_keys=False), "run_name": run_name,
                    "task": cfg.train.task,
                    **{k: f"{v:.4f}" for k, v in metrics.items() if k.endswith("flip_acc")}}
            version = tracking.register_checkpoint(run_id, d, c.register_as, tags)
    client.set_tag(run_id, COMPLETED_TAG, str(metrics["samples_seen"]))
    client.set_terminated(run_id)
    summary = {"run_name": run_name, "run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri,
               "metrics": metrics, "model": c.register_as, "model_version": version,
               "checkpoint": result.checkpoint.path, "removed_checkpoints": removed,
               "wall_seconds": round(time.time() - t0, 1)}
    print(f"\nflip accuracy: test {metrics.get('test_flip_acc', float('nan')):.3f}, "
          f"val {metrics.get('val_flip_acc', float('nan')):.3f} after {metrics['samples_seen']} samples "
          f"({metrics['step']} steps) on {metrics.get('world_size', c.workers)} workers")
    print(f"MLflow run: {run_url(uri, experiment_id, run_id)}")
    print(f"checkpoint: {scheme}{result.checkpoint.path}")
    if version is not None:
        print(f"registered model: models:/{c.register_as}/{version}")
    return summary


if __name__ == "__main__":
    with user_errors("python -m jobs.pretext"):
        sys.exit(0 if main() else 1)
