"""The table format every downstream job writes, the Wilcoxon tests in it, and the report that assembles tables.

A downstream job (jobs.downstream) calls `write_table(table, out_dir)`, which writes `<out_dir>/<task>.json` and
`<out_dir>/<task>.md` from a dict

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
     "paper": {"flip": {"ap50": 43.4, ...}, ...},   # optional: defaults to the task module's PAPER
     "notes": "..."}                    # optional free text; other keys (e.g. "config") are kept as they are

and adds "wilcoxon": {"best": method, "metric": paired metric, "vs": {method: {"p_value", "statistic", "n",
"median_diff"} or {"p_value": null, "reason": ...}}}: a two-sided Wilcoxon signed-rank test
(flipray.tasks.metrics.wilcoxon, as the paper tests Tables 4-5) of the best method by `primary` against every other
method on the per-clip values, paired by clip id (clips missing from either side, or with NaN / inf values, are left
out of that pair). Non-finite numbers are written as null (JSON has no NaN).

Method names, shared by all tables so rows mean the same thing everywhere: `flip` (weights from the flip pretext
task, the paper's "ours"), `mismatch`, `shift` (the other pretext tasks, Table 4-5 baselines), `scratch` (the same
network with random weights: "no pretraining", "- pretext"), `no-visual` (no visual features), `supervised`
(ImageNet ResNet-18), `flip+supervised`; Table 3's input ablations `mono-audio`, `stereo-audio`, `visual-context`,
and its frozen-feature rows `frozen-scratch` / `frozen-flip`; Table 2's pretext variants `base` (= flip with the
base model), `imagenet`, `motion`, `mono`, `gcc-phat`; Table 6's `rotate` (the 360 rotate task), `svm-random` /
`svm-rotate` one-shot SVMs and `intensity`.
Each task module's PAPER[table]["labels"] maps them to the paper's row names.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

from flipray.tasks.metrics import wilcoxon

log = logging.getLogger(__name__)


def paper_entries() -> dict[str, dict]:
    """{paper table key: {"table", "data", "units", "labels", "numbers"}}: Table 2 (flipray.config) and every
    registered task's PAPER, in the report's order."""
    from flipray import tasks
    from flipray.config import PAPER
    entries = dict(PAPER)
    for module in tasks.registry().values():
        entries.update(module.PAPER)
    return entries


def paper_tables() -> dict[str, dict[str, dict[str, float]]]:
    """{table key: {method: {metric: the paper's number}}}."""
    return {k: e["numbers"] for k, e in paper_entries().items()}


def paper_info() -> dict[str, dict]:
    """{table key: {"table", "data", "units", "labels"}}."""
    return {k: {f: v for f, v in e.items() if f != "numbers"} for k, e in paper_entries().items()}


def report_order() -> list[str]:
    """Table keys in the paper's order: pretext (Table 2), then each task's tables."""
    return list(paper_entries())


def write_table(table: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Validate `table` (the format in the module docstring), add the paper's numbers when absent and the Wilcoxon
    tests of the best method, and write `<out_dir>/<task>.json` and `<out_dir>/<task>.md`; returns both paths."""
    t = copy.deepcopy(table)
    validate(t)
    t.setdefault("paper", paper_tables().get(t["task"], {}))
    t.setdefault("table", paper_info().get(t["task"], {}).get("table", ""))
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
            raise ValueError(f"{where}: missing field {key!r} (see flipray/tasks/tables.py for the format)")
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
    scored = [(row["metrics"][primary], row["method"]) for row in table["rows"] if finite(row["metrics"].get(primary))]
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
        pairs = [(ref[c], other[c]) for c in ref if c in other and finite(ref[c]) and finite(other[c])]
        if len(pairs) < 2:
            result["vs"][method] = {"p_value": None, "reason": f"{len(pairs)} clip(s) in common"}
            continue
        result["vs"][method] = wilcoxon([a for a, _ in pairs], [b for _, b in pairs])
    return result


def markdown(table: dict) -> str:
    """The table as markdown: our numbers (best per column in bold), the p-value of the best method against each
    row, then the paper's numbers in their own columns (paper-only methods as extra rows), and notes."""
    task, names, higher = table["task"], table["metrics"], table["higher_is_better"]
    info = paper_info().get(task, {})
    paper = table.get("paper", paper_tables().get(task, {})) or {}
    paper_names = list(dict.fromkeys(m for vals in paper.values() for m in vals))
    tests = table.get("wilcoxon") or paired_tests(table)
    best = tests["best"]
    best_label = next((r.get("label", r["method"]) for r in table["rows"] if r["method"] == best), best)
    bold = {}
    for m in names:
        vals = [r["metrics"].get(m) for r in table["rows"] if finite(r["metrics"].get(m))]
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
            cells.append(f"**{_fmt(v)}**" if finite(v) and v == bold.get(m) else _fmt(v))
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


def finite(v) -> bool:
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


# ---------------------------------------------------------------------------------------------------------------------
# The report

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
        order = report_order()
        return (order.index(task) if task in order else len(order), task, str(item[0]))
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
