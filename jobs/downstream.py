"""Run one paper table: every method of a downstream task as a Ray task, tracked in MLflow, written as a table.

    python -m jobs.downstream --task localize --data data/demo --preset small \
        --pretext flip=models:/flipray-pretext/latest --pretext mismatch=models:/flipray-pretext-mismatch/latest
    ray job submit --working-dir . -- python -m jobs.spatialize --data s3://flipray/demo/ --preset small ...

Any task of flipray.tasks.registry() runs with `--task NAME`; `python -m jobs.<task>` (jobs/localize.py, ...) is the
same job for the tasks that have one. Options:
    --data ROOT           dataset root (folder or s3://), default $FLIPRAY_DATA or data/demo
    --preset NAME         the task's PRESETS entry (demo | small | paper)
    --pretext TASK=URI    pretext weights per pretext task (flip, mismatch, shift): models:/NAME/VERSION|latest or a
                          checkpoint path; default models:/flipray-pretext[-TASK]/latest from the tracking store
    --methods a,b,c       a subset of the task's METHODS (default: all whose pretext weights are available)
    --config-file F.yaml  task config fields from a YAML file (e.g. a sweep's best.yaml), applied after the preset
    --set key=value       any field of the task's config dataclass (e.g. lr=3e-4, epochs=20), applied last
    --out DIR             table + per-method results + figures land in DIR/<task>/ (default runs/downstream)
    --cpus N, --gpus N    Ray resources per method (default $FLIPRAY_TASK_CPUS / $FLIPRAY_TASK_GPUS, else 1 CPU, no
                          GPU; on Kubernetes the flipray-env ConfigMap sets them); --local runs the methods one after
                          another here

Methods whose pretext weights are missing are left out with a warning naming the model to train. The table goes
through `flipray.tasks.tables.write_table` (markdown + JSON with the paper's numbers and Wilcoxon p-values); MLflow
gets a parent run for the table and one nested run per method (params, per-epoch metrics, final metrics, figures).
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

from flipray import overrides, tasks, tracking
from flipray.atomic import folder_lock, write_bytes
from flipray.dataset.store import dataset_rows, require_splits
from flipray.overrides import UsageError, apply, read_yaml
from flipray.tasks.base import write_json
from flipray.tasks.tables import paper_tables, write_table
from flipray.tracking import resolve_pretext

log = logging.getLogger("jobs.downstream")

EXPERIMENT = "flipray-downstream"


def parse_args(task_module, argv):
    name = task_module.TABLE["task"]
    p = argparse.ArgumentParser(prog=f"python -m jobs.downstream --task {name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("FLIPRAY_DATA", "data/demo"))
    p.add_argument("--preset", default="small", choices=sorted(task_module.PRESETS))
    p.add_argument("--pretext", action="append", default=[], metavar="TASK=URI")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {list(task_module.METHODS)}")
    overrides.add_arguments(p, "task config")  # --config-file (e.g. tuning's best.yaml), --set
    p.add_argument("--out", default="runs/downstream")
    cpus, gpus = task_resources()
    p.add_argument("--cpus", type=float, default=cpus, help="CPUs per method (default $FLIPRAY_TASK_CPUS, else 1)")
    p.add_argument("--gpus", type=float, default=gpus, help="GPUs per method (default $FLIPRAY_TASK_GPUS, else 0)")
    p.add_argument("--local", action="store_true", help="run the methods in this process, without Ray")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--mlflow-wait-s", type=float, default=600.0,
                   help="seconds the job's end waits for an MLflow server that stopped answering (default %(default)s)")
    args = p.parse_args(argv)
    if args.mlflow_wait_s < 0:
        raise UsageError(f"--mlflow-wait-s {args.mlflow_wait_s:g}: expected seconds >= 0")
    return args


def task_resources(env=None) -> tuple[float, float]:
    """(CPUs, GPUs) a downstream method or sweep trial asks Ray for: FLIPRAY_TASK_CPUS / FLIPRAY_TASK_GPUS (the
    cluster's config, e.g. the flipray-env ConfigMap on Kubernetes), else (1, 0)."""
    env = os.environ if env is None else env
    values = []
    for key, default in (("FLIPRAY_TASK_CPUS", 1.0), ("FLIPRAY_TASK_GPUS", 0.0)):
        raw = env.get(key, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected a number of {key.split('_')[-1]}") from None
        if value < 0:
            raise ValueError(f"{key}={raw!r}: expected a number >= 0")
        values.append(value)
    return values[0], values[1]


# Fields a config file may not carry over from another run: they say which row and weights a trial is.
PER_METHOD = ("method", "pretext", "pretrained", "data_root", "out_dir", "eval_split")


def method_configs(task_module, args, pretext: dict[str, str]) -> dict[str, object]:
    """One config per method: the preset, then --config-file (minus PER_METHOD fields), the method's pretext weights
    (or the flip network's shape with random weights), then --set."""
    from_file = {}
    for path in args.config_file:
        from_file |= {k: v for k, v in read_yaml(path).items() if k not in PER_METHOD}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or list(task_module.METHODS)
    bad = [m for m in methods if m not in task_module.METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {bad} for {task_module.TABLE['task']}; methods are "
                         f"{list(task_module.METHODS)}")
    # the network shape of "no pretraining" rows: the flip network's, or the task's SHAPE_FROM (doa: rotate, FOA)
    shape_from = pretext.get(getattr(task_module, "SHAPE_FROM", "flip")) or next(iter(pretext.values()), "")
    configs = {}
    for m in methods:
        needs = task_module.METHODS[m].get("pretext")
        if needs is not None and needs not in pretext:
            log.warning("method %s left out: no %s pretext model", m, needs)
            continue
        cfg = task_module.Config(data_root=args.data, method=m)
        apply(cfg, task_module.PRESETS[args.preset])
        apply(cfg, from_file)
        cfg.pretext = pretext[needs] if needs else shape_from
        cfg.pretrained = needs is not None
        apply(cfg, args.set)
        configs[m] = cfg
    if not configs:
        raise UsageError("no method can run: train a pretext model first (`make demo`) or pass --pretext")
    return configs


def run_methods(task_module, configs: dict, cpus: float, local: bool, gpus: float = 0.0) -> dict[str, dict]:
    """{method: run_trial result}; as Ray tasks unless `local` (progress printed as methods finish)."""
    if local:
        return {m: task_module.run_trial(cfg) for m, cfg in configs.items()}
    import ray
    if not ray.is_initialized():
        from flipray import raylocal
        raylocal.init(log_to_driver=True)  # RAY_ADDRESS (failing fast), else a local instance on 127.0.0.1
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(_trial)
    # The pretext checkpoints travel through the object store and the figures come back as bytes: a task may run
    # on a node that does not share this driver's disk.
    blobs = {path: ray.put(Path(path).read_bytes()) for path in {c.pretext for c in configs.values() if c.pretext}}
    pending = {remote.remote(task_module.__name__, cfg, blobs.get(cfg.pretext)): m for m, cfg in configs.items()}
    results = {}
    while pending:
        done, _ = ray.wait(list(pending))
        m = pending.pop(done[0])
        results[m] = ray.get(done[0])
        figures = results[m].pop("figure_bytes", {})
        for name, data in figures.items():  # the task ran on another node: keep its figures here too
            path = Path(results[m]["figures"][name])
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        print(f"  {m}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[m]["metrics"].items()), flush=True)
    return {m: results[m] for m in configs}


def _trial(module_name: str, cfg, pretext_bytes: bytes | None):
    import importlib
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        if pretext_bytes is not None and not Path(cfg.pretext).exists():
            cfg.pretext = str(Path(tmp) / "checkpoint.pt")
            Path(cfg.pretext).write_bytes(pretext_bytes)
        result = importlib.import_module(module_name).run_trial(cfg)
        result["figure_bytes"] = {k: Path(v).read_bytes() for k, v in result.get("figures", {}).items()
                                  if Path(v).exists()}
    return result


def build_table(task_module, args, configs: dict, results: dict) -> dict:
    t = task_module.TABLE
    rows = [{"method": m, "label": task_module.METHODS[m]["label"], "metrics": r["metrics"],
             "per_clip": r.get("per_clip", {}), "clip_ids": r.get("clip_ids", [])} for m, r in results.items()]
    return {**t, "dataset": args.data, "preset": args.preset, "rows": rows,
            "paper": paper_tables().get(t["task"], {}),
            "config": {m: dataclasses.asdict(c) for m, c in configs.items()}}


# Beside the table while its MLflow runs are being logged: {"tracking_uri", "runs": [run ids created so far]}. A job
# whose server stopped answering for good leaves it there, and the next job with the same --out ends those runs.
UNFINISHED = "mlflow-unfinished.json"


def _note_unfinished(out: Path, uri: str, runs: list[str]) -> None:
    write_bytes(out / UNFINISHED, json.dumps({"tracking_uri": uri, "runs": runs}).encode())


def close_unfinished(out: Path, uri: str, wait_s: float) -> int:
    """Ends (KILLED, tag flipray.unfinished) the runs an earlier job with this --out began logging to `uri` and could
    not end because the server stopped answering; says so in one line; returns how many it ended."""
    path = out / UNFINISHED
    if not path.is_file():
        return 0
    note = json.loads(path.read_text())
    if note.get("tracking_uri") != uri:  # another store's runs: for a job that logs there
        return 0
    from mlflow.exceptions import MlflowException
    client = tracking.PatientClient(uri, wait_s=wait_s)
    ended = 0
    for run_id in note.get("runs", []):
        try:
            info = client.get_run(run_id).info
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue  # a run the store no longer has: nothing to end
        if info.status == "RUNNING" and info.lifecycle_stage == "active":  # a run deleted in the UI stays as it is
            client.set_tag(run_id, "flipray.unfinished", "true")
            client.set_terminated(run_id, status="KILLED")
            ended += 1
    path.unlink()
    if ended:
        print(f"{out}: ended {ended} MLflow run(s) an earlier job began logging to {uri} and could not finish "
              f"(KILLED, tagged flipray.unfinished)", flush=True)
    return ended


def log_mlflow(task_module, args, configs, results, table_files, uri: str, experiment_id: str) -> str:
    """The table's parent run and one nested run per method; waits up to --mlflow-wait-s for a server that stopped
    answering (tracking.PatientClient). Until the parent run has ended, UNFINISHED beside the table lists the runs
    made so far."""
    task = task_module.TABLE["task"]
    out = Path(table_files[0]).parent
    client = tracking.PatientClient(uri, wait_s=args.mlflow_wait_s)
    made: list[str] = []
    _note_unfinished(out, uri, made)
    parent = client.create_run(experiment_id, run_name=f"{task}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"flipray.task": task, "flipray.table": task_module.TABLE["table"]}).info.run_id
    made.append(parent)
    _note_unfinished(out, uri, made)
    client.log_param(parent, "data", args.data)
    client.log_param(parent, "preset", args.preset)
    for m, cfg in configs.items():
        child = client.create_run(experiment_id, run_name=f"{task}-{m}",
                                  tags={"mlflow.parentRunId": parent, "flipray.method": m}).info.run_id
        made.append(child)
        _note_unfinished(out, uri, made)
        for k, v in dataclasses.asdict(cfg).items():
            client.log_param(child, k, v)
        for h in results[m].get("history", []):
            for k, v in h.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    client.log_metric(child, k, v, step=int(h["epoch"]))
        for k, v in results[m]["metrics"].items():
            client.log_metric(child, f"final_{k}", v)
            client.log_metric(parent, f"{m}_{k}", v)
        for png in results[m].get("figures", {}).values():
            client.log_artifact(child, png)
        client.set_terminated(child)
    for f in table_files:
        client.log_artifact(parent, str(f))
    client.set_terminated(parent)
    (out / UNFINISHED).unlink()
    return parent


def table_main(task_module):
    """The `main(argv)` of one task's table job (a module of flipray.tasks)."""
    def main(argv: list[str] | None = None) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        args = parse_args(task_module, argv)
        listed = dataset_rows(args.data, "--data")  # a wrong --data is one line, not a traceback from every method
        task = task_module.TABLE["task"]
        out = Path(args.out) / task
        uri = None if args.no_mlflow else tracking.tracking_uri(args.tracking_uri)

        def refuse(holder: str) -> None:  # two jobs in one folder: one would end the other's MLflow runs as KILLED
            raise UsageError(f"--out {args.out}: another {task} table job is writing into {out} (pid {holder}); wait "
                             f"for it to end, or give another --out")
        with folder_lock(out, ".table.lock", busy=refuse):
            # the table is logged at the end: a store that cannot take it is said now, not after the training
            experiment_id = tracking.init_tracking(uri, EXPERIMENT) if uri else None
            if uri:
                close_unfinished(out, uri, args.mlflow_wait_s)
            needed = {m.get("pretext") for m in task_module.METHODS.values()} - {None}
            pretext = resolve_pretext(args.pretext, needed | {getattr(task_module, "SHAPE_FROM", "flip")}, out, uri)
            configs = method_configs(task_module, args, pretext)
            first = next(iter(configs.values()))
            require_splits(listed, {s for cfg in configs.values() for s in (cfg.train_split, cfg.eval_split)},
                           "--data", args.data,
                           f"the {task} table trains on {first.train_split!r} and scores {first.eval_split!r}")
            for m, cfg in configs.items():
                cfg.out_dir = cfg.out_dir or str((out / m).resolve())
            print(f"{task}: {len(configs)} methods ({', '.join(configs)}) on {args.data}, preset {args.preset}",
                  flush=True)
            t0 = time.time()
            results = run_methods(task_module, configs, args.cpus, args.local, args.gpus)
            for m, r in results.items():
                write_json(out / m / "result.json", r)
            table = build_table(task_module, args, configs, results)
            files = write_table(table, out)
            summary = {"task": task, "table": str(files[1]), "results": {m: r["metrics"] for m, r in results.items()},
                       "wall_seconds": round(time.time() - t0, 1)}
            print(Path(files[1]).read_text())
            print(f"table: {files[1]} ({summary['wall_seconds']:.0f} s)", flush=True)
            if uri:
                try:
                    summary["mlflow_run_id"] = log_mlflow(task_module, args, configs, results, files, uri,
                                                          experiment_id)
                except Exception as e:
                    if not tracking.server_away(e):
                        raise
                    raise SystemExit(f"{task} table written ({files[1]}, results in {out}) but "
                                     f"MLflow at {uri} did not answer within {args.mlflow_wait_s:g} s, so it is not "
                                     f"logged there; `python -m jobs.report --runs {args.out}` assembles the tables "
                                     f"without MLflow") from None
            return summary
    return main


def entrypoint(module_file: str):
    """`main` of a thin jobs/<task>.py: the table job of the task named like the file (README's commands)."""
    return table_main(tasks.get(Path(module_file).stem))


def main(argv: list[str] | None = None) -> dict:
    """`python -m jobs.downstream --task NAME [the task's options]`: any registered task."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--task" not in argv or argv.index("--task") + 1 >= len(argv):
        raise UsageError(f"usage: python -m jobs.downstream --task {{{','.join(tasks.registry())}}} [options] "
                         f"(--task NAME --help for a task's options)")
    i = argv.index("--task")
    return table_main(tasks.get(argv[i + 1]))(argv[:i] + argv[i + 2:])


if __name__ == "__main__":
    with overrides.user_errors("python -m jobs.downstream"):
        main()
