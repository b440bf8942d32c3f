"""The paper's tables from flipray's downstream runs: one table format every job writes, and the report over them.

    python -m jobs.report --runs runs/downstream [--out runs/downstream] [--tracking-uri sqlite:///.flipray/local/mlflow.db]

collects every table JSON under --runs into `report.md` (tables in the paper's order: pretext Table 2, the Sec. 5.1
correlations, Tables 3-6), and logs it and the tables to MLflow (experiment `flipray-report`) when --tracking-uri
or MLFLOW_TRACKING_URI is set.

The table format. A downstream job (jobs/<task>.py through jobs.downstream) calls `write_table(table, out_dir)`,
which writes `<out_dir>/<task>.json` and `<out_dir>/<task>.md` from a dict

    {"task": "localize",                # analyze | localize | spatialize | separate | doa | pretext
     "table": "Table 3",                # the paper's table it mirrors
     "dataset": "data/demo", "preset": "small",
     "metrics": ["ap50", "iou", "x_err", "y_err"],           # columns, in order
     "higher_is_better": {"ap50": true, "iou": true, "x_err": false, "y_err": false},   # every metric
     "primary": "ap50",                 # picks the best method
     "paired_metric": "iou",            # optional: the per-clip metric of the Wilcoxon tests (default: primary
                                        # if the rows have it per clip, else the first metric in "metrics" that
                                        # they have per clip: a set-level primary such as AP has no per-clip values)
     "rows": [{"method": "flip", "label": "Flip (ours)",
               "metrics": {"ap50": 0.61, "iou": 0.52, ...},             # the table's numbers (means over clips)
               "per_clip": {"iou": [0.4, 0.7, ...], ...},               # optional: one value per clip id
               "clip_ids": ["s0001-c0", ...]}, ...],                    # identifies per_clip entries for pairing
     "paper": {"flip": {"ap50": 43.4, ...}, ...},   # optional: defaults to PAPER_TABLES[task]
     "notes": "..."}                    # optional free text; other keys (e.g. "config") are kept as they are

and adds "wilcoxon": {"best": method, "metric": paired metric, "vs": {method: {"p_value", "statistic", "n",
"median_diff"} or {"p_value": null, "reason": ...}}}: a two-sided Wilcoxon signed-rank test (flipray.tasks.metrics.wilcoxon,
as the paper tests Tables 4-5) of the best method by `primary` against every other method on the per-clip values,
paired by clip id (clips missing from either side, or with NaN / inf values, are left out of that pair). Non-finite
numbers are written as null (JSON has no NaN).

Method names, shared by all tables so rows mean the same thing everywhere: `flip` (weights from the flip pretext
task, the paper's "ours"), `mismatch`, `shift` (the other pretext tasks, Table 4-5 baselines), `scratch` (the same
network with random weights: "no pretraining", "- pretext"), `no-visual` (no visual features), `supervised`
(ImageNet ResNet-18), `flip+supervised`; Table 3's input ablations `mono-audio`, `stereo-audio`, `visual-context`,
and its frozen-feature rows `frozen-scratch` / `frozen-flip`; Table 2's pretext variants `base` (= flip with the
base model), `imagenet`, `motion`, `mono`, `gcc-phat`; Table 6's `rotate` (the 360 rotate task), `svm-random` /
`svm-rotate` one-shot SVMs and `intensity`.
PAPER_INFO[task]["labels"] maps each to the paper's row name.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

from flipray.tasks import metrics as M
from flipray.tracking import init_tracking

log = logging.getLogger("jobs.report")

EXPERIMENT = "flipray-report"
PAPER_ORDER = ["pretext", "analyze", "localize", "localize-filtered", "spatialize", "separate", "doa"]

# The paper's numbers (Yang, Russell & Salamon, CVPR 2020), copied as printed, keyed by task then flipray method.
# Units and datasets are in PAPER_INFO; they are real-data numbers (YouTube-ASMR, FAIR-Play, TAU), for orientation.
PAPER_TABLES: dict[str, dict[str, dict[str, float]]] = {
    # Table 2: pretext (flip) test accuracy, %, of the architecture ablations.
    "pretext": {
        "imagenet": {"acc_asmr": 80.4, "acc_fairplay": 92.6},
        "base": {"acc_asmr": 80.1, "acc_fairplay": 93.6},
        "motion": {"acc_asmr": 80.4, "acc_fairplay": 71.3},
        "mono": {"acc_asmr": 81.3, "acc_fairplay": 96.3},
        "gcc-phat": {"acc_asmr": 80.1, "acc_fairplay": 94.1},
    },
    # Sec. 5.1 (text, no table): Pearson R of the audio embedding, and of the visual attention, with the source's
    # approximate position from the left/right log-energy difference; named as flipray.tasks.analyze's closest metrics
    # (first principal component of the audio features; horizontal centre of the Grad-CAM map).
    "analyze": {
        "flip": {"r_pca_energy": 0.790, "r_gradcam_energy": 0.286},
    },
    # Table 3, rows 1-4 (full test set, fine-tuned) and 9-10 (sub-networks frozen): AP50 and IOU in %, X/Y error in
    # % of the frame width / height.
    "localize": {
        "mono-audio": {"ap50": 10.2, "iou": 30.6, "x_err": 11.9, "y_err": 10.4},
        "stereo-audio": {"ap50": 15.1, "iou": 34.8, "x_err": 10.0, "y_err": 10.7},
        "visual-context": {"ap50": 27.9, "iou": 41.0, "x_err": 12.9, "y_err": 5.5},
        "flip": {"ap50": 43.4, "iou": 47.1, "x_err": 9.1, "y_err": 5.5},
        "frozen-scratch": {"ap50": 23.9, "iou": 35.1, "x_err": 12.4, "y_err": 8.9},
        "frozen-flip": {"ap50": 34.9, "iou": 39.5, "x_err": 12.3, "y_err": 6.5},
    },
    # Table 3, rows 5-8: the test clips filtered for faces moving left-right with the audio's log-energy difference.
    "localize-filtered": {
        "mono-audio": {"ap50": 13.9, "iou": 23.8, "x_err": 17.3, "y_err": 10.0},
        "stereo-audio": {"ap50": 26.0, "iou": 39.0, "x_err": 9.7, "y_err": 9.6},
        "visual-context": {"ap50": 21.6, "iou": 27.0, "x_err": 20.7, "y_err": 6.5},
        "flip": {"ap50": 44.1, "iou": 45.0, "x_err": 10.8, "y_err": 5.9},
    },
    # Table 4: upmixing test error, the L1 distance of output and target complex spectrograms (mean over bins).
    "spatialize": {
        "supervised": {"l1_complex_asmr": 0.0858, "l1_complex_fairplay": 0.403},
        "no-visual": {"l1_complex_asmr": 0.0924, "l1_complex_fairplay": 0.418},
        "scratch": {"l1_complex_asmr": 0.0891, "l1_complex_fairplay": 0.413},
        "mismatch": {"l1_complex_asmr": 0.0877, "l1_complex_fairplay": 0.412},
        "shift": {"l1_complex_asmr": 0.0861, "l1_complex_fairplay": 0.409},
        "flip": {"l1_complex_asmr": 0.0853, "l1_complex_fairplay": 0.401},
    },
    # Table 5: separation test error, the L1 distance of output and target magnitude spectrograms (mean over bins).
    "separate": {
        "no-visual": {"l1_mag_asmr": 0.0946, "l1_mag_fairplay": 0.423},
        "scratch": {"l1_mag_asmr": 0.0953, "l1_mag_fairplay": 0.422},
        "mismatch": {"l1_mag_asmr": 0.0923, "l1_mag_fairplay": 0.423},
        "shift": {"l1_mag_asmr": 0.0918, "l1_mag_fairplay": 0.422},
        "flip": {"l1_mag_asmr": 0.0898, "l1_mag_fairplay": 0.410},
        "supervised": {"l1_mag_asmr": 0.0885, "l1_mag_fairplay": 0.362},
        "flip+supervised": {"l1_mag_asmr": 0.0863, "l1_mag_fairplay": 0.350},
    },
    # Table 6: DOA on TAU Spatial Sound (FOA), mean azimuth error in degrees (random = 90). "Ours" here is the 360
    # extension of the flip task, the rotate task (flipray/tasks/doa.py names its rows rotate / svm-rotate).
    "doa": {
        "scratch": {"doa_err": 20.5},
        "rotate": {"doa_err": 17.5},
        "svm-random": {"doa_err": 78.6},
        "svm-rotate": {"doa_err": 29.5},
    },
}

PAPER_INFO: dict[str, dict] = {
    "pretext": {"table": "Table 2", "data": "YouTube-ASMR and FAIR-Play test sets", "units": {
        "acc_asmr": "%", "acc_fairplay": "%"}, "labels": {
        "imagenet": "Pretrained on ImageNet", "base": "Ours", "motion": "Motion", "mono": "+Mono Audio",
        "gcc-phat": "+GCC-Phat"}},
    "analyze": {"table": "Sec. 5.1", "data": "YouTube-ASMR held-out clips (numbers from the text)", "units": {},
                "labels": {"flip": "Ours (flip task)"}},
    "localize": {"table": "Table 3", "data": "YouTube-ASMR test set, sounding-face boxes from RetinaFace", "units": {
        "ap50": "%", "iou": "%", "x_err": "% width", "y_err": "% height"}, "labels": {
        "mono-audio": "Mono audio", "stereo-audio": "Stereo audio", "visual-context": "Visual context",
        "flip": "Ours", "frozen-scratch": "- Pretext (frozen)", "frozen-flip": "+ Pretext (frozen)"}},
    "localize-filtered": {"table": "Table 3 (rows 5-8)", "data": "YouTube-ASMR test clips with moving faces",
                          "units": {"ap50": "%", "iou": "%", "x_err": "% width", "y_err": "% height"}, "labels": {
                              "mono-audio": "Mono audio", "stereo-audio": "Stereo audio",
                              "visual-context": "Visual context", "flip": "Ours"}},
    "spatialize": {"table": "Table 4", "data": "YouTube-ASMR and FAIR-Play test sets", "units": {}, "labels": {
        "supervised": "Supervised", "no-visual": "No visual features", "scratch": "No pretraining",
        "mismatch": "Mismatch task", "shift": "Shift task", "flip": "Flip task (ours)"}},
    "separate": {"table": "Table 5", "data": "YouTube-ASMR and FAIR-Play test sets", "units": {}, "labels": {
        "no-visual": "No visual features", "scratch": "No pretraining", "mismatch": "Mismatch task",
        "shift": "Shift task", "flip": "Flip task (ours)", "supervised": "Supervised",
        "flip+supervised": "Ours + supervised"}},
    "doa": {"table": "Table 6", "data": "TAU Spatial Sound (FOA), 4-fold cross-validation", "units": {
        "doa_err": "deg"}, "labels": {
        "scratch": "Trained from scratch", "rotate": "Pretrained weights",
        "svm-random": "One-shot SVM on random embeddings", "svm-rotate": "One-shot SVM on our embeddings"}},
}


# ------------------------------------------------------------------------------------------------------- one table


def write_table(table: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Validate `table` (the format in the module docstring), add the paper's numbers when absent and the Wilcoxon
    tests of the best method, and write `<out_dir>/<task>.json` and `<out_dir>/<task>.md`; returns both paths."""
    t = copy.deepcopy(table)
    validate(t)
    t.setdefault("paper", PAPER_TABLES.get(t["task"], {}))
    t.setdefault("table", PAPER_INFO.get(t["task"], {}).get("table", ""))
    t["wilcoxon"] = paired_tests(t)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{t['task']}.json", out / f"{t['task']}.md"
    json_path.write_text(json.dumps(_jsonable(t), indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown(t))
    log.info("table %s: %s, %s", t["task"], json_path, md_path)
    return json_path, md_path


def validate(table: dict) -> None:
    """Raise ValueError naming the field when `table` does not follow the format."""
    where = f"table {table.get('task', '?')!r}"
    for key in ("task", "metrics", "primary", "higher_is_better", "rows"):
        if key not in table:
            raise ValueError(f"{where}: missing field {key!r} (see jobs/report.py for the format)")
    names = table["metrics"]
    if not names or not all(isinstance(m, str) for m in names):
        raise ValueError(f"{where}: 'metrics' must be a non-empty list of metric names, got {names!r}")
    missing = [m for m in names if m not in table["higher_is_better"]]
    if missing:
        raise ValueError(f"{where}: 'higher_is_better' lacks {missing}")
    if table["primary"] not in names:
        raise ValueError(f"{where}: 'primary' {table['primary']!r} is not one of 'metrics' {names}")
    if not table["rows"]:
        raise ValueError(f"{where}: 'rows' is empty")
    seen = set()
    for i, row in enumerate(table["rows"]):
        if "method" not in row or not isinstance(row.get("metrics"), dict):
            raise ValueError(f"{where}: rows[{i}] needs 'method' and a 'metrics' dict, got keys {sorted(row)}")
        if row["method"] in seen:
            raise ValueError(f"{where}: method {row['method']!r} appears twice in 'rows'")
        seen.add(row["method"])
        ids = row.get("clip_ids", [])
        for name, values in row.get("per_clip", {}).items():
            if len(values) != len(ids):
                raise ValueError(f"{where}: rows[{i}] ({row['method']}) per_clip[{name!r}] has {len(values)} values "
                                 f"for {len(ids)} clip_ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: rows[{i}] ({row['method']}) has repeated clip_ids")


def best_method(table: dict) -> str | None:
    """The method with the best finite `primary` value (ties: the first row), None when no row has one."""
    primary, higher = table["primary"], table["higher_is_better"][table["primary"]]
    scored = [(row["metrics"][primary], row["method"]) for row in table["rows"] if _finite(row["metrics"].get(primary))]
    if not scored:
        return None
    pick = max if higher else min
    return pick(scored, key=lambda s: s[0])[1]


def paired_tests(table: dict) -> dict:
    """{"best", "metric", "vs": {method: wilcoxon result | {"p_value": None, "reason"}}} (see the module docstring)."""
    best = best_method(table)
    rows = {row["method"]: row for row in table["rows"]}
    metric = table.get("paired_metric")
    if not metric:
        have = rows[best].get("per_clip", {}) if best is not None else {}
        metric = next((m for m in [table["primary"], *table["metrics"]] if m in have), table["primary"])
    result = {"best": best, "metric": metric, "vs": {}}
    if best is None:
        return result
    ref = _per_clip(rows[best], metric)
    for method, row in rows.items():
        if method == best:
            continue
        other = _per_clip(row, metric)
        if ref is None or other is None:
            who = best if ref is None else method
            result["vs"][method] = {"p_value": None, "reason": f"{who} has no per-clip {metric}"}
            continue
        pairs = [(ref[c], other[c]) for c in ref if c in other and _finite(ref[c]) and _finite(other[c])]
        if len(pairs) < 2:
            result["vs"][method] = {"p_value": None, "reason": f"{len(pairs)} clip(s) in common"}
            continue
        result["vs"][method] = M.wilcoxon([a for a, _ in pairs], [b for _, b in pairs])
    return result


def markdown(table: dict) -> str:
    """The table as markdown: our numbers (best per column in bold), the p-value of the best method against each
    row, then the paper's numbers in their own columns (paper-only methods as extra rows), and notes."""
    task, names, higher = table["task"], table["metrics"], table["higher_is_better"]
    info = PAPER_INFO.get(task, {})
    paper = table.get("paper", PAPER_TABLES.get(task, {})) or {}
    paper_names = list(dict.fromkeys(m for vals in paper.values() for m in vals))
    tests = table.get("wilcoxon") or paired_tests(table)
    best = tests["best"]
    best_label = next((r.get("label", r["method"]) for r in table["rows"] if r["method"] == best), best)
    bold = {}
    for m in names:
        vals = [r["metrics"].get(m) for r in table["rows"] if _finite(r["metrics"].get(m))]
        if vals:
            bold[m] = max(vals) if higher[m] else min(vals)

    units = info.get("units", {})
    head = (["method"] + [f"{m} {'↑' if higher[m] else '↓'}" for m in names] + [f"p ({tests['metric']})"]
            + [f"paper {m}" + (f" ({units[m]})" if m in units else "") for m in paper_names])
    title = table.get("table") or info.get("table", "")
    lines = [f"### {title}: {task}" if title else f"### {task}",
             "",
             f"Dataset `{table.get('dataset', '?')}`, preset `{table.get('preset', '?')}`.",
             "",
             "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    ours = {r["method"] for r in table["rows"]}
    for r in table["rows"]:
        label = r.get("label", r["method"])
        cells = [f"{label} `{r['method']}`" if label != r["method"] else f"`{r['method']}`"]
        for m in names:
            v = r["metrics"].get(m)
            cells.append(f"**{_fmt(v)}**" if _finite(v) and v == bold.get(m) else _fmt(v))
        cells.append(_p_cell(r["method"], best, tests))
        cells += [_fmt(paper.get(r["method"], {}).get(m)) for m in paper_names]
        lines.append("| " + " | ".join(cells) + " |")
    for method in paper:
        if method in ours:
            continue
        label = info.get("labels", {}).get(method, method)
        cells = [f"{label} `{method}` (paper only)"] + ["—"] * (len(names) + 1)
        cells += [_fmt(paper[method].get(m)) for m in paper_names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    n_clips = max((len(r.get("clip_ids", [])) for r in table["rows"]), default=0)
    if best is not None:
        lines.append(f"p: two-sided Wilcoxon signed-rank test of the best method by {table['primary']} "
                     f"({best_label}) against each row on per-clip {tests['metric']}, paired by clip id"
                     + (f" (up to {n_clips} clips)." if n_clips else "."))
    if paper:
        lines.append(f"Paper columns: the numbers printed in {info.get('table', 'the paper')} of Yang, Russell & "
                     f"Salamon (CVPR 2020), {info.get('data', 'real data')}: real data in the paper's own units, "
                     "for orientation only, not comparable with numbers measured on flipray's data.")
    if table.get("notes"):
        lines.append("")
        lines.append(str(table["notes"]))
    return "\n".join(lines) + "\n"


def _p_cell(method: str, best: str | None, tests: dict) -> str:
    if method == best:
        return "best"
    r = tests.get("vs", {}).get(method)
    if not r or r.get("p_value") is None:
        return "—"
    return f"{r['p_value']:.3g} (n={r['n']})"


def _per_clip(row: dict, metric: str) -> dict | None:
    values = row.get("per_clip", {}).get(metric)
    if values is None:
        return None
    return dict(zip(row.get("clip_ids", []), values))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.4g}"
    return str(v)


def _jsonable(obj):
    """numpy / torch scalars and arrays to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------------------ the report


def load_tables(runs: str | Path) -> list[tuple[Path, dict]]:
    """Every table JSON under `runs` (files with "task" and "rows"; per-method results are skipped), in the paper's
    order, then by path."""
    found = []
    for path in sorted(Path(runs).rglob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("skipping %s: not JSON (%s)", path, e)
            continue
        if isinstance(obj, dict) and "task" in obj and "rows" in obj:
            validate(obj)
            found.append((path, obj))

    def order(item):
        task = item[1]["task"]
        return (PAPER_ORDER.index(task) if task in PAPER_ORDER else len(PAPER_ORDER), task, str(item[0]))
    return sorted(found, key=order)


def build_report(tables: list[tuple[Path, dict]]) -> str:
    lines = ["# flipray: the paper's downstream tables", "",
             (f"{len(tables)} table(s), assembled {time.strftime('%Y-%m-%d %H:%M')} by `python -m jobs.report`. "
              "Paper columns are the numbers of Yang, Russell & Salamon (CVPR 2020) on real data, for orientation "
              "only."), ""]
    for path, table in tables:
        lines.append(markdown(table))
        lines.append(f"_from `{path}`_")
        lines.append("")
    return "\n".join(lines)


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
                    if _finite(value):
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
        raise SystemExit("give --runs DIR (tables written by the downstream jobs) or --from-mlflow")
    if not Path(args.runs).is_dir():
        raise SystemExit(f"--runs {args.runs}: no such folder")
    tables = load_tables(args.runs)
    if not tables:
        raise SystemExit(f"no table JSONs under {args.runs} (files with 'task' and 'rows', as jobs.report.write_table "
                         "writes them); run a downstream job first, e.g. python -m jobs.localize")
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
    main(sys.argv[1:])
