"""Run one paper table: every method of a downstream task as a Ray task, tracked in MLflow, written as a table.

    python -m jobs.localize   --data data/demo --preset small --pretext flip=models:/flipray-pretext/latest \
        --pretext mismatch=models:/flipray-pretext-mismatch/latest --pretext shift=models:/flipray-pretext-shift/latest
    ray job submit --working-dir . -- python -m jobs.spatialize --data s3://flipray/demo/ --preset small ...

Each `jobs/<task>.py` is `main = table_main(flipray.<task>)`. Options:
    --data ROOT           dataset root (folder or s3://), default $FLIPRAY_DATA or data/demo
    --preset NAME         the task's PRESETS entry (demo | small | paper)
    --pretext TASK=URI    pretext weights per pretext task (flip, mismatch, shift): models:/NAME/VERSION|latest or a
                          checkpoint path; default models:/flipray-pretext[-TASK]/latest from the tracking store
    --methods a,b,c       a subset of the task's METHODS (default: all whose pretext weights are available)
    --config-file F.yaml  task config fields from a YAML file (e.g. a sweep's best.yaml), applied after the preset
    --set key=value       any field of the task's config dataclass (e.g. lr=3e-4, epochs=20), applied last
    --out DIR             table + per-method results + figures land in DIR/<task>/ (default runs/downstream)
    --cpus N              CPUs per method (Ray task resources); --local runs the methods one after another here

Methods whose pretext weights are missing are left out with a warning naming the model to train. The table goes
through `jobs.report.write_table` (markdown + JSON with the paper's numbers and Wilcoxon p-values); MLflow gets a
parent run for the table and one nested run per method (params, per-epoch metrics, final metrics, figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from flipray.tasks.base import apply, write_json
from flipray import tracking

log = logging.getLogger("jobs.downstream")

EXPERIMENT = "flipray-downstream"


def parse_args(task_module, argv):
    name = task_module.TABLE["task"]
    p = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("FLIPRAY_DATA", "data/demo"))
    p.add_argument("--preset", default="small", choices=sorted(task_module.PRESETS))
    p.add_argument("--pretext", action="append", default=[], metavar="TASK=URI")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {list(task_module.METHODS)}")
    p.add_argument("--config-file", default=None, help="YAML of task config fields (e.g. tuning's best.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/downstream")
    p.add_argument("--cpus", type=float, default=1.0)
    p.add_argument("--local", action="store_true", help="run the methods in this process, without Ray")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def resolve_pretext(specs: list[str], needed: set[str], out: Path, tracking_uri: str | None) -> dict[str, str]:
    """{pretext task: local checkpoint.pt} for the pretext tasks the methods need; models:/ URIs are downloaded
    into out/pretext/<task>/ so Ray tasks on any node read a plain file. Missing models are left out."""
    import torch
    given = dict(s.split("=", 1) for s in specs)
    unknown = set(given) - {"flip", "mismatch", "shift", "rotate"}
    if unknown:
        raise ValueError(f"--pretext takes flip=URI, mismatch=URI, shift=URI or rotate=URI, got {sorted(unknown)}")
    paths = {}
    for task in sorted(needed):
        uri = given.get(task, f"models:/{tracking.pretext_model_name(task)}/latest")
        try:
            model, cfg = tracking.load_pretrained(uri, tracking_uri)
        except (ValueError, FileNotFoundError) as e:
            if task in given:
                raise
            log.warning("no %s pretext model (%s): its methods are left out. Train it with `python -m jobs.pretext "
                        "--set train.task=%s`.", task, e, task)
            continue
        path = out / "pretext" / task / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
        paths[task] = str(path)
        log.info("pretext %s: %s", task, uri)
    return paths


# Fields a config file may not carry over from another run: they say which row and weights a trial is.
PER_METHOD = ("method", "pretext", "pretrained", "data_root", "out_dir", "eval_split")


def method_configs(task_module, args, pretext: dict[str, str]) -> dict[str, object]:
    """One config per method: the preset, then --config-file (minus PER_METHOD fields), the method's pretext weights
    (or the flip network's shape with random weights), then --set."""
    from_file = {}
    if args.config_file:
        import yaml
        raw = yaml.safe_load(Path(args.config_file).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{args.config_file}: expected a mapping of {task_module.TABLE['task']} config fields")
        from_file = {k: v for k, v in raw.items() if k not in PER_METHOD}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or list(task_module.METHODS)
    bad = [m for m in methods if m not in task_module.METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad} for {task_module.TABLE['task']}; methods are "
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
        raise ValueError("no method can run: train a pretext model first (`make demo`) or pass --pretext")
    return configs


def run_methods(task_module, configs: dict, cpus: float, local: bool) -> dict[str, dict]:
    """{method: run_trial result}; as Ray tasks unless `local` (progress printed as methods finish)."""
    if local:
        return {m: task_module.run_trial(cfg) for m, cfg in configs.items()}
    import ray
    if not ray.is_initialized():
        from flipray import raylocal
        raylocal.init(log_to_driver=True)  # RAY_ADDRESS (failing fast), else a local instance on 127.0.0.1
    remote = ray.remote(num_cpus=cpus)(_trial)
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
    from jobs.report import PAPER_TABLES
    t = task_module.TABLE
    rows = [{"method": m, "label": task_module.METHODS[m]["label"], "metrics": r["metrics"],
             "per_clip": r.get("per_clip", {}), "clip_ids": r.get("clip_ids", [])} for m, r in results.items()]
    return {**t, "dataset": args.data, "preset": args.preset, "rows": rows,
            "paper": PAPER_TABLES.get(t["task"], {}),
            "config": {m: dataclasses.asdict(c) for m, c in configs.items()}}


def log_mlflow(task_module, args, configs, results, table_files, uri: str) -> str:
    from mlflow import MlflowClient
    task = task_module.TABLE["task"]
    experiment_id = tracking.init_tracking(uri, EXPERIMENT)
    client = MlflowClient(uri)
    parent = client.create_run(experiment_id, run_name=f"{task}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"flipray.task": task, "flipray.table": task_module.TABLE["table"]}).info.run_id
    client.log_param(parent, "data", args.data)
    client.log_param(parent, "preset", args.preset)
    for m, cfg in configs.items():
        child = client.create_run(experiment_id, run_name=f"{task}-{m}",
                                  tags={"mlflow.parentRunId": parent, "flipray.method": m}).info.run_id
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
    return parent


def table_main(task_module):
    """The `main(argv)` of jobs/<task>.py for a task module of flipray/."""
    def main(argv: list[str] | None = None) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from jobs.report import write_table
        args = parse_args(task_module, argv)
        task = task_module.TABLE["task"]
        out = Path(args.out) / task
        uri = None if args.no_mlflow else tracking.tracking_uri(args.tracking_uri)
        needed = {m.get("pretext") for m in task_module.METHODS.values()} - {None}
        pretext = resolve_pretext(args.pretext, needed | {getattr(task_module, "SHAPE_FROM", "flip")}, out, uri)
        configs = method_configs(task_module, args, pretext)
        for m, cfg in configs.items():
            cfg.out_dir = cfg.out_dir or str((out / m).resolve())
        print(f"{task}: {len(configs)} methods ({', '.join(configs)}) on {args.data}, preset {args.preset}",
              flush=True)
        t0 = time.time()
        results = run_methods(task_module, configs, args.cpus, args.local)
        for m, r in results.items():
            write_json(out / m / "result.json", r)
        table = build_table(task_module, args, configs, results)
        files = write_table(table, out)
        summary = {"task": task, "table": str(files[1]), "results": {m: r["metrics"] for m, r in results.items()},
                   "wall_seconds": round(time.time() - t0, 1)}
        if uri:
            summary["mlflow_run_id"] = log_mlflow(task_module, args, configs, results, files, uri)
        print(Path(files[1]).read_text())
        print(f"table: {files[1]} ({summary['wall_seconds']:.0f} s)")
        return summary
    return main


if __name__ == "__main__":
    sys.exit("run a task's job instead: python -m jobs.localize | spatialize | separate | analyze")
