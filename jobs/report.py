"""The paper's tables from flipray's downstream runs, in one report (the table format: flipray/tasks/tables.py).

    python -m jobs.report --runs runs/downstream [--out runs/downstream] [--tracking-uri sqlite:///.flipray/local/mlflow.db]
    python -m jobs.report --from-mlflow --runs runs/report      # the newest table of every task, from MLflow

collects every table JSON under --runs into `report.md` (the paper's order: pretext Table 2, Sec. 5.1, Tables 3-6)
and logs it and the tables to MLflow (experiment `flipray-report`) when --tracking-uri or MLFLOW_TRACKING_URI is set.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from flipray.overrides import UsageError, user_errors
from flipray.tasks.tables import (best_method, build_report, load_tables, markdown, paired_tests,  # noqa: F401
                                  paper_info, paper_tables, report_order, validate, write_table, finite)
from flipray.tracking import init_tracking

log = logging.getLogger("jobs.report")

EXPERIMENT = "flipray-report"


def log_to_mlflow(uri: str, report: Path, tables: list[tuple[Path, dict]], run_name: str) -> str:
    """One run in experiment flipray-report: report.md, every table's JSON and markdown, and each table's numbers as
    metrics `<task>/<method>/<metric>`; returns the run id."""
    import mlflow
    init_tracking(uri, EXPERIMENT)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_artifact(str(report))
        mlflow.set_tag("flipray.tables", ",".join(t["task"] for _, t in tables))
        for path, table in tables:
            mlflow.log_artifact(str(path), artifact_path="tables")
            md = path.with_suffix(".md")
            if md.exists():
                mlflow.log_artifact(str(md), artifact_path="tables")
            for row in table["rows"]:
                for name, value in row["metrics"].items():
                    if finite(value):
                        key = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"{table['task']}/{row['method']}/{name}")
                        mlflow.log_metric(key, float(value))
        return run.info.run_id


def fetch_tables(uri: str | None, dest: Path) -> list[Path]:
    """Download the `<task>.json` table of the newest finished parent run of every task in experiment
    flipray-downstream (jobs/downstream.py logs them there) into dest/<task>/."""
    from mlflow import MlflowClient

    from flipray import tracking
    client = MlflowClient(tracking.tracking_uri(uri))
    exp = client.get_experiment_by_name("flipray-downstream")
    if exp is None:
        raise SystemExit(f"no experiment flipray-downstream in {client.tracking_uri}: run a downstream job first")
    fetched, seen = [], set()
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"]):
        task = run.data.tags.get("flipray.task")
        if not task or task in seen or "mlflow.parentRunId" in run.data.tags:
            continue
        seen.add(task)
        (dest / task).mkdir(parents=True, exist_ok=True)
        fetched.append(Path(client.download_artifacts(run.info.run_id, f"{task}.json", str(dest / task))))
    return fetched


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="folder searched (recursively) for table JSONs")
    p.add_argument("--from-mlflow", action="store_true", help="first download the newest table of every task from "
                   "the MLflow experiment flipray-downstream into --runs (e.g. on Kubernetes, where the jobs' "
                   "folders are gone)")
    p.add_argument("--out", default=None, help="where report.md goes (default: --runs)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI; unset = none)")
    p.add_argument("--run-name", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_mlflow:
        args.runs = args.runs or "runs/report-tables"
        fetched = fetch_tables(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), Path(args.runs))
        logging.info("fetched %d tables from MLflow into %s", len(fetched), args.runs)
    if not args.runs:
        raise UsageError("give --runs DIR (tables written by the downstream jobs) or --from-mlflow")
    if not Path(args.runs).is_dir():
        raise UsageError(f"--runs {args.runs}: " + ("not a folder" if Path(args.runs).exists() else "no such folder"))
    tables = load_tables(args.runs)
    if not tables:
        raise UsageError(f"no table JSONs under {args.runs} (files with 'task' and 'rows', as "
                         "flipray.tasks.tables.write_table writes them); run a downstream job first, e.g. python -m "
                         "jobs.localize")
    out = Path(args.out or args.runs)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text(build_report(tables))
    summary = {"report": str(report), "tables": [str(path) for path, _ in tables]}
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        summary["mlflow_run_id"] = log_to_mlflow(uri, report, tables,
                                                 args.run_name or f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    print(report.read_text())
    print(f"report: {report} ({len(tables)} tables)" + (f", MLflow run {summary['mlflow_run_id']}" if uri else ""))
    return summary


if __name__ == "__main__":
    with user_errors("python -m jobs.report"):
        main(sys.argv[1:])
