"""`make demo`: the whole flipray path on the embedded default, on this machine.

    .venv/bin/python -m cluster.demo [--clips 600] [--data data/demo] [--workers 2] [--keep-services]

1. synthesize `--clips` spatial audio-visual clips into `--data` (skipped when its manifest exists);
2. start the local services (moto S3, MLflow server, Ray head; cluster/local.py), reusing any that already run;
3. upload the dataset to s3://flipray/demo/ (idempotent: unchanged objects are not sent again);
4. `ray job submit` the pretext job (jobs/pretext.py) with `--workers` Ray Train workers, checkpoints in S3;
5. print the final flip accuracy, the MLflow run URL and the registered model version;
6. stop the services it started (not those it found running), unless --keep-services.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--data", default="data/demo", help="local folder for the synthetic set")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--state-dir", default=str(local.DEFAULT_STATE_DIR))
    p.add_argument("--keep-services", action="store_true", help="leave S3, MLflow and Ray running afterwards")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args(argv)
    data = Path(args.data)

    if not (data / "manifest.jsonl").exists():
        print(f"[1/5] synthesizing {args.clips} clips into {data}", flush=True)
        from flipray.synth import generate
        generate(data, clips=args.clips, seed=0, progress=True)
    else:
        print(f"[1/5] using the synthetic set in {data}", flush=True)

    before = {name for name, svc in local.load(args.state_dir).services.items() if local.healthy(svc)}
    print("[2/5] local services: " + ("reusing " + ", ".join(sorted(before)) if before else "starting") +
          " (moto S3, MLflow, Ray head)", flush=True)
    # MLflow artifacts in a folder, not on the in-memory moto endpoint: the registered model outlives the demo.
    services = local.up(args.state_dir, artifacts=str(Path(args.state_dir).resolve() / "mlartifacts"))
    started = [name for name in services.services if name not in before and services.services[name].owned]
    env = {**os.environ, **services.env}
    try:
        print("[3/5] uploading the set to s3://flipray/demo/", flush=True)
        os.environ.update(services.env)
        from flipray.store import upload_dataset
        upload_dataset(data, "s3://flipray/demo/")

        run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"[4/5] ray job submit: jobs.pretext, {args.workers} workers, run {run_name}", flush=True)
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO),
               "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
               "python", "-m", "jobs.pretext", "--config", "demo", "--run-name", run_name,
               "--set", "data.root=s3://flipray/demo/", "--set", f"cluster.workers={args.workers}",
               "--set", "cluster.storage_path=s3://flipray/ray-results"]
        for item in args.set:
            cmd += ["--set", item]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        if proc.wait() != 0:
            print(f"\nthe pretext job failed (exit {proc.returncode}); its log is above", file=sys.stderr)
            return 1
        summary = SUMMARY.findall("".join(lines))
        print("\n[5/5] done\n" + "\n".join(f"  {s}" for s in summary))
        print(f"  MLflow UI: {services.mlflow.url}" + ("" if args.keep_services or "mlflow" not in started else
              f"  (stopped now; reopen with `{sys.executable} -m cluster.local up --mlflow`)"))
        print(f"  Ray dashboard: {services.ray.url}")
        return 0
    finally:
        if started and not args.keep_services:
            local.down(args.state_dir, names=started)
            print(f"  stopped what the demo started: {', '.join(started)}")


if __name__ == "__main__":
    sys.exit(main())
