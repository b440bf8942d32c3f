"""jobs.report: the table format, Wilcoxon wiring, markdown, report assembly and MLflow logging (real sqlite store).

    .venv/bin/python -m pytest tests/test_report.py -q
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs import report

CLIPS = ["c1", "c2", "c3", "c4", "c5", "c6"]
GOOD = [0.10, 0.20, 0.15, 0.30, 0.25, 0.05]  # per-clip error of the method that wins on every clip


def _spatialize_table() -> dict:
    worse = [g + 0.1 * (k + 1) for k, g in enumerate(GOOD)]          # worse on every clip
    mixed = [g + d for g, d in zip(GOOD, [0.01, -0.02, 0.03, 0.04, 0.05, 0.065])]  # one clip better than GOOD
    rows = [
        {"method": "scratch", "label": "No pretraining", "metrics": {"stft": sum(worse) / 6, "env": 0.30},
         "per_clip": {"stft": worse}, "clip_ids": CLIPS},
        # listed in reverse clip order: pairing has to go by clip id, not by position
        {"method": "flip", "label": "Flip (ours)", "metrics": {"stft": sum(GOOD) / 6, "env": 0.31},
         "per_clip": {"stft": GOOD[::-1]}, "clip_ids": CLIPS[::-1]},
        {"method": "shift", "label": "Shift task", "metrics": {"stft": sum(mixed) / 6, "env": 0.29},
         "per_clip": {"stft": mixed}, "clip_ids": CLIPS},
        # c6 is NaN and c5 missing: 4 pairs left
        {"method": "mismatch", "label": "Mismatch task", "metrics": {"stft": 1.0, "env": 0.5},
         "per_clip": {"stft": [g + 1 for g in GOOD[:4]] + [math.nan]}, "clip_ids": CLIPS[:4] + ["c6"]},
        {"method": "no-visual", "label": "No visual features", "metrics": {"stft": 2.0, "env": math.inf}},
    ]
    return {"task": "spatialize", "dataset": "data/test", "preset": "demo", "metrics": ["stft", "env"],
            "higher_is_better": {"stft": False, "env": False}, "primary": "stft", "rows": rows,
            "notes": "synthetic numbers for the test"}


def test_wilcoxon_wiring_and_json(tmp_path):
    json_path, md_path = report.write_table(_spatialize_table(), tmp_path)
    assert json_path == tmp_path / "spatialize.json" and md_path == tmp_path / "spatialize.md"
    t = json.loads(json_path.read_text())
    w = t["wilcoxon"]
    assert w["best"] == "flip" and w["metric"] == "stft"
    # Better on all 6 clips: exact two-sided p = 2 / 2^6.
    assert w["vs"]["scratch"]["p_value"] == pytest.approx(2 / 64) and w["vs"]["scratch"]["n"] == 6
    assert w["vs"]["scratch"]["median_diff"] < 0
    # Differences -0.01, +0.02, -0.03, -0.04, -0.05, -0.065 (flip - shift): ranks 1..6, the positive one has rank 2,
    # so W = 2 and p = 2 * #{sign patterns with W <= 2} / 64 = 2 * 3 / 64.
    assert w["vs"]["shift"]["statistic"] == 2.0 and w["vs"]["shift"]["p_value"] == pytest.approx(6 / 64)
    # 4 clips in common and finite, all better: p = 2 / 2^4.
    assert w["vs"]["mismatch"]["n"] == 4 and w["vs"]["mismatch"]["p_value"] == pytest.approx(2 / 16)
    assert w["vs"]["no-visual"] == {"p_value": None, "reason": "no-visual has no per-clip stft"}
    # The paper's Table 4 came along, infinities became null, the rest is kept.
    assert t["table"] == "Table 4" and t["paper"]["flip"]["l1_complex_asmr"] == 0.0853
    assert t["rows"][4]["metrics"]["env"] is None and t["notes"] == "synthetic numbers for the test"


def test_paired_metric_for_set_level_primary():
    # AP is one number per method, so the localize table tests per-clip IOU instead.
    rows = [{"method": m, "metrics": {"ap50": ap, "iou": sum(ious) / 3}, "per_clip": {"iou": ious},
             "clip_ids": ["a", "b", "c"]}
            for m, ap, ious in [("flip", 0.6, [0.5, 0.6, 0.7]), ("scratch", 0.3, [0.4, 0.5, 0.6])]]
    table = {"task": "localize", "metrics": ["ap50", "iou"], "higher_is_better": {"ap50": True, "iou": True},
             "primary": "ap50", "rows": rows}
    # Without "paired_metric" the first metric the rows have per clip is tested (ap50 has none): iou, better on 3
    # of 3 clips, p = 2 / 2^3.
    r = report.paired_tests(table)
    assert r["best"] == "flip" and r["metric"] == "iou" and r["vs"]["scratch"]["p_value"] == pytest.approx(2 / 8)
    assert report.paired_tests(table | {"paired_metric": "iou"}) == r
    # Asking for a metric nobody has per clip gives no p-value, and says why.
    r = report.paired_tests(table | {"paired_metric": "ap50"})
    assert r["vs"]["scratch"] == {"p_value": None, "reason": "flip has no per-clip ap50"}


def test_markdown_has_ours_and_the_papers_numbers():
    rows = [{"method": "flip", "label": "Flip (ours)", "metrics": {"ap50": 0.6125, "iou": 0.52, "x_err": 7.25,
                                                                    "y_err": 4.5}},
            {"method": "scratch", "label": "No pretraining", "metrics": {"ap50": 0.3377, "iou": 0.41, "x_err": 9.5,
                                                                         "y_err": 4.25}}]
    table = {"task": "localize", "dataset": "data/demo", "preset": "small", "metrics": ["ap50", "iou", "x_err", "y_err"],
             "higher_is_better": {"ap50": True, "iou": True, "x_err": False, "y_err": False}, "primary": "ap50",
             "rows": rows}
    md = report.markdown(table)
    lines = md.splitlines()
    assert lines[0] == "### Table 3: localize"
    header = next(line for line in lines if line.startswith("| method"))
    assert "ap50 ↑" in header and "x_err ↓" in header and "paper ap50 (%)" in header and "paper x_err (% width)" in header
    flip = next(line for line in lines if "`flip`" in line)
    # ours (bold where best), then the p column (best), then the paper's row "Ours": 43.4, 47.1, 9.1, 5.5
    assert flip.split(" | ")[1:] == ["**0.6125**", "**0.52**", "**7.25**", "4.5", "best", "43.4", "47.1", "9.1",
                                     "5.5 |"]
    scratch = next(line for line in lines if "`scratch`" in line)
    assert "**4.25**" in scratch and "0.3377" in scratch
    # paper-only rows keep the paper's numbers (Table 3 row "Visual context": 27.9, 41.0, 12.9, 5.5)
    visual = next(line for line in lines if "`visual-context`" in line)
    assert "paper only" in visual and "27.9" in visual and "12.9" in visual
    assert "for orientation only" in md and "Wilcoxon" in md


def test_paper_tables_are_labelled():
    info_of = report.paper_info()
    assert report.report_order()[:2] == ["pretext", "analyze"] and report.report_order()[-1] == "doa"
    for task, methods in report.paper_tables().items():
        info = info_of[task]
        assert set(methods) == set(info["labels"]), task
        for values in methods.values():
            assert all(isinstance(v, float) for v in values.values())


def test_validate_names_the_problem():
    t = _spatialize_table()
    del t["primary"]
    with pytest.raises(ValueError, match="missing field 'primary'"):
        report.write_table(t, "unused")
    t = _spatialize_table()
    t["rows"][0]["clip_ids"] = CLIPS[:5]
    with pytest.raises(ValueError, match=r"scratch\) per_clip\['stft'\] has 6 values for 5 clip_ids"):
        report.validate(t)
    t = _spatialize_table()
    t["higher_is_better"].pop("env")
    with pytest.raises(ValueError, match="'higher_is_better' lacks"):
        report.validate(t)


def _two_tables(runs):
    report.write_table(_spatialize_table() | {"task": "doa", "table": "Table 6"}, runs / "doa")
    loc = {"task": "localize", "dataset": "data/demo", "preset": "demo", "metrics": ["ap50"],
           "higher_is_better": {"ap50": True}, "primary": "ap50",
           "rows": [{"method": "flip", "label": "Flip (ours)", "metrics": {"ap50": 0.7123}}]}
    report.write_table(loc, runs / "localize")
    (runs / "localize" / "flip").mkdir()
    (runs / "localize" / "flip" / "result.json").write_text(json.dumps({"metrics": {"ap50": 0.7123}}))


def test_report_assembles_tables_in_paper_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    _two_tables(runs)
    summary = report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    assert "mlflow_run_id" not in summary
    text = (tmp_path / "out" / "report.md").read_text()
    assert len(summary["tables"]) == 2                         # result.json is not a table
    assert text.index("### Table 3: localize") < text.index("### Table 6: doa")   # paper order, not file order
    assert "**0.7123**" in text and "43.4" in text and "17.5" in text   # ours, paper Table 3, paper Table 6


def test_report_logs_to_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    monkeypatch.chdir(tmp_path)                               # the sqlite store's artifacts land under ./mlruns
    runs = tmp_path / "runs"
    _two_tables(runs)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = report.main(["--runs", str(runs), "--tracking-uri", uri, "--run-name", "r1"])
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == report.EXPERIMENT
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    tables = {f.path for f in client.list_artifacts(run.info.run_id, "tables")}
    assert "report.md" in top
    assert {"tables/localize.json", "tables/localize.md", "tables/doa.json", "tables/doa.md"} <= tables
    assert run.data.metrics["localize/flip/ap50"] == pytest.approx(0.7123)
    assert run.data.metrics["doa/no-visual/stft"] == pytest.approx(2.0)
    local = client.download_artifacts(run.info.run_id, "report.md", str(tmp_path / "dl"))
    assert "### Table 3: localize" in Path(local).read_text()


def test_report_without_tables_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from flipray.overrides import user_errors
    a_file = tmp_path / "f.json"
    a_file.write_text("{}")
    (tmp_path / "empty").mkdir()
    for argv, message in [([], "give --runs DIR"), (["--runs", str(tmp_path / "nope")], "no such folder"),
                          (["--runs", str(a_file)], "not a folder"),
                          (["--runs", str(tmp_path / "empty")], f"no table JSONs under {tmp_path / 'empty'}")]:
        with pytest.raises(SystemExit) as exited:
            with user_errors("python -m jobs.report"):  # as its __main__ runs it
                report.main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith("python -m jobs.report: ") and message in err, err
        assert err.count("\n") == 1
