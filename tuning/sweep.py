"""Ray Tune sweep of one downstream task's hyperparameters, every trial an MLflow run under the sweep's run.

    ray job submit --working-dir . -- python -m tuning.sweep --task localize --samples 16
    python -m tuning.sweep --task spatialize --samples 8 --data data/demo --preset demo --max-concurrent 2
    python -m tuning.sweep --task localize --name sweep-localize-1 --restore     # continue an interrupted sweep

The sweep definition is `tuning/<task>.yaml`: the metric and mode, the search space (`loguniform: [lo, hi]`,
`uniform`, `choice`, `randint`, or a plain value), ASHA's grace period and reduction factor, the trials run at once
and each trial's CPUs/GPUs (FLIPRAY_TASK_CPUS / FLIPRAY_TASK_GPUS override them). Each trial is a function
trainable that runs the task's `run_trial` (flipray.tasks) on the train split and reports the validation split after
every epoch, so ASHA can stop poor trials early. Trial checkpoints (the finished trial's history and config) live under
`--storage/<name>/` (a folder or s3://).

MLflow: the driver initialises the store (a fresh sqlite store must be created once, before trials touch it) and
opens the sweep's parent run; every trial logs its params and per-epoch metrics into its own run, nested under
it, and ends that run itself. At the end the sweep writes `<out>/best.yaml` (the best trial's full task config:
pass it back with `python -m jobs.<task> --config-file best.yaml`) and `<out>/trials.png` (metric against epoch,
one line per trial, coloured by the learning rate), and logs both to the parent run. A tracking server that stops
answering pauses the trials that log to it and the sweep's end for up to --mlflow-wait-s (600 s), then goes on
where it stopped (flipray.tracking.PatientClient); still away at the end: best.yaml and trials.png are on disk, the
sweep exits 1 saying so, and `--restore` once it answers logs them.

`--restore` (or a rerun with the same --name) restores with `Tuner.restore`: finished trials are kept, not rerun;
unfinished ones start again under a new run (the earlier one KILLED, tagged flipray.stopped_early, or
flipray.superseded if it had ended just before Tune recorded its last result).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from flipray.atomic import folder_lock
from flipray.overrides import UsageError, apply, user_errors
from flipray import tasks, tracking
from flipray.dataset.store import dataset_rows, require_splits, storage_location
from flipray.tracking import resolve_pretext
from jobs.downstream import task_resources

log = logging.getLogger("tuning.sweep")

HERE = Path(__file__).resolve().parent


def sweepable() -> list[str]:
    """The registered tasks that have a sweep definition (tuning/<task>.yaml)."""
    return [name for name in tasks.registry() if (HERE / f"{name}.yaml").exists()]

EXPERIMENT = "flipray-sweeps"
MLFLOW_WAIT_S = 600.0  # how long a trial, or the sweep's end, waits for a tracking server that stopped answering


def load_definition(task: str, path: str | None = None) -> dict:
    """The sweep definition of `task` (tuning/<task>.yaml unless `path`), checked."""
    path = Path(path) if path else HERE / f"{task}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no sweep definition for task {task!r}")
    d = yaml.safe_load(path.read_text())
    for key in ("metric", "mode", "space", "method"):
        if key not in d:
            raise ValueError(f"{path}: missing {key!r}")
    if d["mode"] not in ("min", "max"):
        raise ValueError(f"{path}: mode must be min or max, got {d['mode']!r}")
    return d


def search_space(space: dict) -> dict:
    """YAML search space -> Ray Tune sampling objects."""
    from ray import tune
    kinds = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
             "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            (kind, args), = spec.items()
            if kind not in kinds:
                raise ValueError(f"search space {key}: unknown kind {kind!r}; kinds are {sorted(kinds)}")
            out[key] = kinds[kind](args) if kind in ("choice", "grid") else kinds[kind](*args)
        else:
            out[key] = spec
    return out


def trial_resources(definition: dict, env=None) -> dict:
    """Ray resources of one trial: the definition's `resources`, overridden by FLIPRAY_TASK_CPUS / FLIPRAY_TASK_GPUS
    where the cluster's config sets them (the flipray-env ConfigMap on Kubernetes: one GPU per trial in overlays/gpu)."""
    env = os.environ if env is None else env
    resources = definition.get("resources", {})
    cpus, gpus = task_resources(env)
    return {"cpu": cpus if env.get("FLIPRAY_TASK_CPUS") else resources.get("cpu", 1),
            "gpu": gpus if env.get("FLIPRAY_TASK_GPUS") else resources.get("gpu", 0)}


def trainable(config: dict, mlflow_wait_s: float = MLFLOW_WAIT_S):
    """One trial: the task config from the base + sampled values, run_trial reporting to Tune and MLflow (a tracking
    server that stops answering pauses the trial, for up to `mlflow_wait_s`, instead of failing it). The wait comes
    from the command that runs the trial (tune.with_parameters), not from its stored config, so that `--restore
    --mlflow-wait-s N` applies to the restored trials too."""
    from mlflow.entities import Metric, Param
    from ray import tune

    task = tasks.get(config["task"])
    cfg = task.Config(**config["base"])
    apply(cfg, {k: v for k, v in config.items() if k not in ("task", "base", "mlflow")})
    ctx = tune.get_context()
    cfg.out_dir = str(Path(cfg.out_dir or "runs/sweeps") / ctx.get_trial_name())
    m = config["mlflow"]
    client = tracking.PatientClient(m["uri"], wait_s=mlflow_wait_s)
    supersede_unrecorded_runs(client, m["experiment_id"], m["parent"], ctx.get_trial_id())
    run_id = client.create_run(m["experiment_id"], run_name=ctx.get_trial_name(),
                               tags={"mlflow.parentRunId": m["parent"], "flipray.trial_id": ctx.get_trial_id()}
                               ).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in dataclasses.asdict(cfg).items()])
    history = []

    def report(epoch: int, metrics: dict):
        history.append({"epoch": epoch, **metrics})
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
        if epoch < cfg.epochs:
            tune.report({**metrics, "epoch": epoch})
            return
        # Every epoch is in: the run is complete. End it now, as Tune may end this process as soon as it has the
        # last result (max_t reached), before run_trial returns and the `finally` below runs.
        client.set_terminated(run_id, status="FINISHED")
        # The trial's checkpoint is its finished history: run_trial does not resume mid-way, so a trial interrupted
        # before its end has no checkpoint and a restored sweep runs it again from its first epoch.
        with _checkpoint_dir({"history.json": history, "config.json": dataclasses.asdict(cfg)}) as d:
            tune.report({**metrics, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        result = task.run_trial(cfg, report=report)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"final_{k}", float(v), now, 0)
                                          for k, v in result["metrics"].items()])
    finally:
        # End the run explicitly (the trial's process may be reused). ASHA stops a trial by raising out of
        # tune.report, also at its last epoch (max_t), so completion is judged by the epochs reported.
        if len(history) < cfg.epochs:
            client.set_tag(run_id, "flipray.stopped_early", "true")
        client.set_terminated(run_id, status="FINISHED" if len(history) == cfg.epochs else "KILLED")


class _checkpoint_dir:
    """A temporary folder holding JSON files, for tune.Checkpoint.from_directory."""

    def __init__(self, files: dict):
        self.files = files

    def __enter__(self) -> str:
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        for name, obj in self.files.items():
            Path(self.tmp.name, name).write_text(json.dumps(obj))
        return self.tmp.name

    def __exit__(self, *exc):
        self.tmp.cleanup()


def _kill_runs(client, experiment_id: str, parent: str, where: str, tag: str) -> int:
    """Mark the parent's trial runs matching `where` (an MLflow filter) KILLED and tagged `tag`; return how many."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and {where}")
    for run in runs:
        client.set_tag(run.info.run_id, tag, "true")
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(runs)


def supersede_unrecorded_runs(client, experiment_id: str, parent: str, trial_id: str) -> int:
    """Before a trial (re)starts: end its earlier FINISHED runs as superseded. A trial ends its run at its last
    epoch, before Tune has recorded that result (Tune may end the process right after it); an interrupt in between
    leaves a FINISHED run for a trial Tune never saw finish, which a restored sweep runs again. The old run is marked
    KILLED and tagged flipray.superseded, so every trial has one current run."""
    return _kill_runs(client, experiment_id, parent, f"tags.`flipray.trial_id` = '{trial_id}' and "
                                                     "attributes.status = 'FINISHED'", "flipray.superseded")


def close_stopped_trials(client, experiment_id: str, parent: str) -> int:
    """End the MLflow runs of trials that ASHA or an interrupt stopped: their process was ended mid-trial, before it
    could end its run. They are marked KILLED and tagged flipray.stopped_early (a restored sweep reruns the
    interrupted ones under a new run)."""
    return _kill_runs(client, experiment_id, parent, "attributes.status = 'RUNNING'", "flipray.stopped_early")


def plot_trials(df_by_trial: dict, metric: str, color_by: str, path: Path) -> Path:
    """metric vs epoch, one line per trial, coloured by `color_by` (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [t["config"].get(color_by) for t in df_by_trial.values() if t["config"].get(color_by)]
    lo, hi = (min(values), max(values)) if values else (1, 1)
    cmap = plt.get_cmap("viridis")
    for name, t in sorted(df_by_trial.items()):
        v = t["config"].get(color_by)
        c = cmap(0.5 if not v or hi == lo else (np.log(v) - np.log(lo)) / (np.log(hi) - np.log(lo)))
        ax.plot(t["epochs"], t["values"], "o-", color=c, ms=3, lw=1.2, alpha=0.9)
    if values and hi > lo:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.LogNorm(lo, hi))
        fig.colorbar(sm, ax=ax, label=color_by)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"{len(df_by_trial)} trials (ASHA stops the short lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tuning.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sweepable())
    p.add_argument("--samples", type=int, default=16, help="trials to sample")
    p.add_argument("--definition", default=None, help="sweep YAML (default tuning/<task>.yaml)")
    p.add_argument("--data", default=os.environ.get("FLIPRAY_DATA", "data/demo"))
    p.add_argument("--preset", default=None, help="the task's preset (default: the definition's)")
    p.add_argument("--pretext", action="append", default=[], metavar="TASK=URI")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed task config fields")
    p.add_argument("--name", default=None, help="sweep name (default sweep-<task>-<time>); reuse it to restore")
    storage = os.environ.get("FLIPRAY_STORAGE", "runs").rstrip("/") + "/sweeps"
    p.add_argument("--storage", default=storage, help="Tune storage path: a folder or s3://bucket/prefix (default "
                   "$FLIPRAY_STORAGE/sweeps, else runs/sweeps)")
    p.add_argument("--out", default=None, help="best.yaml and trials.png (default <storage>/<name>/ locally, "
                                               "else runs/sweeps/<name>)")
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--restore", action="store_true", help="restore the sweep --name (required to exist)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--mlflow-wait-s", type=float, default=MLFLOW_WAIT_S,
                   help="seconds a trial (paused) or the sweep's end waits for an MLflow server that stopped "
                        "answering (default %(default)s)")
    args = p.parse_args(argv)
    if args.mlflow_wait_s < 0:
        raise UsageError(f"--mlflow-wait-s {args.mlflow_wait_s:g}: expected seconds >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    listed = dataset_rows(args.data, "--data")  # a wrong --data is one line, not an error in every trial
    d = load_definition(args.task, args.definition)
    task = tasks.get(args.task)
    name = args.name or f"sweep-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path, filesystem = storage_location(args.storage)
    exp_dir = f"{storage_path.rstrip('/')}/{name}"
    out = Path(args.out or (exp_dir if filesystem is None else Path("runs/sweeps") / name))
    out.mkdir(parents=True, exist_ok=True)

    def refuse(holder: str) -> None:  # two drivers of one sweep would run its trials twice into one experiment
        raise UsageError(f"--name {name}: another sweep of this name is running from {out} (pid {holder}); wait for "
                         f"it to end (then --restore continues it), or give another --name")
    with folder_lock(out, ".sweep.lock", busy=refuse):
        restoring = tune.Tuner.can_restore(exp_dir, storage_filesystem=filesystem)
        if args.restore and not restoring:
            raise UsageError(f"--restore: no Tune experiment at {exp_dir}")

        # The base task config every trial starts from: preset, method, data, pretext weights (downloaded once here).
        method = task.METHODS[d["method"]]
        base = task.Config(data_root=args.data, method=d["method"], eval_split="val")
        apply(base, task.PRESETS[args.preset or d.get("preset", "small")])
        needs = method.get("pretext")
        pretext = resolve_pretext(args.pretext, {needs or "flip"}, out, tracking.tracking_uri(args.tracking_uri))
        base.pretext = pretext.get(needs or "flip", "")
        base.pretrained = needs is not None
        if needs and not base.pretext:
            raise UsageError(f"method {d['method']} needs a {needs} pretext model: pass --pretext {needs}=URI")
        apply(base, d.get("fixed", {}))
        apply(base, args.set)
        require_splits(listed, (base.train_split, base.eval_split), "--data", args.data,
                       f"the sweep trains on {base.train_split!r} and scores {base.eval_split!r}")
        base.out_dir = str(out / "trials")

        # MLflow: the driver creates the store and the parent run before any trial starts.
        uri = tracking.tracking_uri(args.tracking_uri)
        experiment_id = tracking.init_tracking(uri, EXPERIMENT)
        client = tracking.PatientClient(uri, wait_s=args.mlflow_wait_s)
        previous = tracking.find_run(experiment_id, name)
        parent = previous.info.run_id if previous else client.create_run(
            experiment_id, run_name=name, tags={"flipray.run_name": name, "flipray.task": args.task}).info.run_id
        if not previous:
            client.log_param(parent, "task", args.task)
            client.log_param(parent, "samples", args.samples)
            client.log_param(parent, "space", json.dumps(d["space"]))

        param_space = {**search_space(d["space"]), "task": args.task, "base": dataclasses.asdict(base),
                       "mlflow": {"uri": uri, "experiment_id": experiment_id, "parent": parent}}
        trainable_with_resources = tune.with_resources(
            tune.with_parameters(trainable, mlflow_wait_s=args.mlflow_wait_s), trial_resources(d))
        if not ray.is_initialized():
            from flipray import raylocal
            raylocal.init()  # RAY_ADDRESS (failing fast when it does not answer), else a local instance on 127.0.0.1
        if restoring:
            print(f"restoring sweep {name} from {exp_dir}", flush=True)
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable_with_resources, resume_unfinished=True,
                                       restart_errored=True, storage_filesystem=filesystem)
        else:
            asha = d.get("asha", {})
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs,
                                      grace_period=asha.get("grace_period", 1),
                                      reduction_factor=asha.get("reduction_factor", 2))
            tuner = tune.Tuner(
                trainable_with_resources, param_space=param_space,
                tune_config=tune.TuneConfig(metric=d["metric"], mode=d["mode"], scheduler=scheduler,
                                            num_samples=args.samples,
                                            max_concurrent_trials=args.max_concurrent or d.get("max_concurrent", 2)),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=1)))
        grid = tuner.fit()

        trials = {}
        for r in grid:
            if r.metrics_dataframe is None or d["metric"] not in r.metrics_dataframe:
                continue
            df = r.metrics_dataframe
            trials[Path(r.path).name] = {"config": {k: v for k, v in r.config.items() if k in d["space"]},
                                         "epochs": df["training_iteration"].tolist(),
                                         "values": df[d["metric"]].tolist()}
        # The best trial among those ASHA let run to the end, so that best.yaml (which trains for `epochs`) reproduces
        # its score; a trial stopped early was scored after fewer epochs.
        scored = [r for r in grid if r.error is None and r.metrics and d["metric"] in r.metrics]
        complete = [r for r in scored if r.metrics.get("training_iteration") == base.epochs] or scored
        if not complete:
            raise RuntimeError(f"sweep {name}: no trial reported {d['metric']}; errors: {grid.errors}")
        pick = max if d["mode"] == "max" else min
        best = pick(complete, key=lambda r: r.metrics[d["metric"]])
        best_cfg = task.Config(**best.config["base"])
        apply(best_cfg, {k: v for k, v in best.config.items() if k in d["space"]})
        best_cfg.eval_split, best_cfg.out_dir = "test", ""
        best_path = out / "best.yaml"
        header = (f"# best of sweep {name}: {d['metric']} = {best.metrics[d['metric']]:.6g} on the val split "
                  f"(trial {Path(best.path).name})\n")
        best_path.write_text(header + yaml.safe_dump(dataclasses.asdict(best_cfg), sort_keys=False))
        png = plot_trials(trials, d["metric"], d.get("color_by", "lr"), out / "trials.png")
        stopped = sum(1 for t in trials.values() if max(t["epochs"]) < base.epochs)
        try:  # the files are on disk first: a tracking server still away after --mlflow-wait-s costs only their logging
            close_stopped_trials(client, experiment_id, parent)
            client.log_artifact(parent, str(best_path))
            client.log_artifact(parent, str(png))
            client.log_metric(parent, f"best_{d['metric']}", float(best.metrics[d["metric"]]))
            client.set_terminated(parent)
        except Exception as e:
            if not tracking.server_away(e):
                raise
            raise SystemExit(f"python -m tuning.sweep: sweep {name} finished ({best_path}, {png}) but MLflow at {uri} "
                             f"did not answer within {args.mlflow_wait_s:g} s; run the same command with --restore "
                             f"once it answers: it trains nothing and logs them") from None
        summary = {"name": name, "experiment_path": exp_dir, "trials": len(grid), "stopped_early": stopped,
                   "best_metric": float(best.metrics[d["metric"]]), "best_config": str(best_path),
                   "best_trial": Path(best.path).name, "trials_png": str(png), "mlflow_parent_run": parent,
                   "errors": len(grid.errors)}
        print(json.dumps(summary, indent=2))
        return summary


if __name__ == "__main__":
    with user_errors("python -m tuning.sweep"):
        sys.exit(0 if main() else 1)
