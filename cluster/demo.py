"""`make demo`: the whole flipray path on the embedded default, on this machine.

    .venv/bin/python -m cluster.demo [--clips 600] [--data data/demo] [--workers 2] [--keep-services]
                                     [--downstream quick|full|none]

1. synthesize `--clips` spatial audio-visual clips into `--data` (skipped when its manifest exists);
2. start the local services (moto S3, MLflow server, Ray head; cluster/local.py), reusing any that already run;
3. upload the dataset to s3://flipray/demo/ (idempotent: unchanged objects are not sent again);
4. `ray job submit` the pretext job (jobs/pretext.py) with `--workers` Ray Train workers, checkpoints in S3;
   with `--downstream full` also the mismatch and shift baseline pretext jobs;
5. `ray job submit` the downstream tables (jobs.downstream, every task of flipray.tasks that starts from the flip
   model: analyze, localize, spatialize, separate; `demo` presets) from the registered models, then jobs.report:
   `quick` runs the flip and no-pretraining rows of each table, `full` every row (the baselines included), `none`
   skips this step;
6. print the flip accuracy, the MLflow run URL, the registered model version and where the report is;
7. stop the services it started (not those it found running), unless --keep-services.

The MLflow store (sqlite + artifacts folder under .flipray/local/) outlives the services, so the registered model
stays loadable by `models:/flipray-pretext/latest` and the runs can be browsed again with
`python -m cluster.local up --mlflow`.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from cluster import local

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(flip accuracy: .*|MLflow run: .*|registered model: .*)$", re.M)
QUICK_METHODS = "flip,scratch"  # `--downstream quick`: the flip and no-pretraining rows of every table


def downstream() -> list[str]:
    """The registered tasks that run on the demo's stereo set from its flip (and baseline) pretext models."""
    from flipray import tasks
    return tasks.starting_from("flip")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--data", default="data/demo", help="local folder for the synthetic set")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--state-dir", default=str(local.DEFAULT_STATE_DIR))
    p.add_argument("--keep-services", action="store_true", help="leave S3, MLflow and Ray running afterwards")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--downstream", choices=("quick", "full", "none"), default="quick",
                   help="downstream tables after pretraining (default: quick = flip vs no pretraining)")
    args = p.parse_args(argv)
    data = Path(args.data)

    if not (data / "manifest.jsonl").exists():
        print(f"[1/6] synthesizing {args.clips} clips into {data}", flush=True)
        from flipray.synth.scenes import generate
        generate(data, clips=args.clips, seed=0, progress=True)
    else:
        print(f"[1/6] using the synthetic set in {data}", flush=True)

    before = {name for name, svc in local.load(args.state_dir).services.items() if local.healthy(svc)}
    print("[2/6] local services: " + ("reusing " + ", ".join(sorted(before)) if before else "starting") +
          " (moto S3, MLflow, Ray head)", flush=True)
    # MLflow artifacts in a folder, not on the in-memory moto endpoint: the registered model outlives the demo.
    services = local.up(args.state_dir, artifacts=str(Path(args.state_dir).resolve() / "mlartifacts"))
    started = [name for name in services.services if name not in before and services.services[name].owned]
    env = {**os.environ, **services.env}
    try:
        print("[3/6] uploading the set to s3://flipray/demo/", flush=True)
        os.environ.update(services.env)
        from flipray.dataset.store import upload_dataset
        upload_dataset(data, "s3://flipray/demo/")

        stamp = time.strftime('%Y%m%d-%H%M%S')
        run_name = f"demo-{stamp}"
        tasks = ["flip"] + (["mismatch", "shift"] if args.downstream == "full" else [])
        print(f"[4/6] ray job submit: jobs.pretext ({', '.join(tasks)}), {args.workers} workers, run {run_name}",
              flush=True)
        summary = []
        for task in tasks:
            name = run_name if task == "flip" else f"demo-{task}-{stamp}"
            overrides = ["data.root=s3://flipray/demo/", f"cluster.workers={args.workers}",
                         "cluster.storage_path=s3://flipray/ray-results", f"train.task={task}", *args.set]
            ok, lines = submit(env, ["jobs.pretext", "--config", "demo", "--run-name", name,
                                     *[a for o in overrides for a in ("--set", o)]])
            if not ok:
                print(f"\nthe {task} pretext job failed; its log is above", file=sys.stderr)
                return 1
            if task == "flip":
                summary = SUMMARY.findall("".join(lines))
        report = None
        if args.downstream != "none":
            jobs = downstream()
            print(f"[5/6] downstream tables ({args.downstream}): {', '.join(jobs)}, then jobs.report", flush=True)
            for job in jobs:
                methods = ["--methods", QUICK_METHODS] if args.downstream == "quick" else []
                ok, _ = submit(env, ["jobs.downstream", "--task", job, "--data", "s3://flipray/demo/", "--preset", "demo",
                                     "--out", "runs/demo-downstream", *methods])
                if not ok:
                    print(f"\nthe {job} job failed; its log is above", file=sys.stderr)
                    return 1
            ok, lines = submit(env, ["jobs.report", "--from-mlflow", "--runs", "runs/demo-report"])
            report = "MLflow experiment flipray-report (report.md)" if ok else None
        print("\n[6/6] done\n" + "\n".join(f"  {s}" for s in summary))
        if report:
            print(f"  downstream report: {report}; tables in experiment flipray-downstream")
        print(f"  MLflow UI: {services.mlflow.url}" + ("" if args.keep_services or "mlflow" not in started else
              f"  (stopped now; reopen with `{sys.executable} -m cluster.local up --mlflow`)"))
        print(f"  Ray dashboard: {services.ray.url}")
        return 0
    finally:
        if started and not args.keep_services:
            local.down(args.state_dir, names=started)
            print(f"  stopped what the demo started: {', '.join(started)}")


def submit(env: dict, module_args: list[str]) -> tuple[bool, list[str]]:
    """`ray job submit` `python -m <module_args>` with this checkout as the working dir; streams and returns its log."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", "python", "-m", *module_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    return proc.wait() == 0, lines


if __name__ == "__main__":
    sys.exit(main())
