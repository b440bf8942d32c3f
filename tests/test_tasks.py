"""The downstream task contract, for every task flipray.tasks.registry() finds (adding a task module adds its row here).

    .venv/bin/python -m pytest tests/test_tasks.py -q
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from flipray import tasks
from flipray.config import TASKS as PRETEXT_TASKS
from flipray.tasks import tables
from flipray.overrides import UsageError
from flipray.tasks.base import DownstreamConfig, apply

NAMES = list(tasks.registry())


def test_the_registry_finds_the_papers_tasks_in_order():
    assert NAMES == ["analyze", "localize", "spatialize", "separate", "doa"]
    assert tasks.starting_from("flip") == ["analyze", "localize", "spatialize", "separate"]
    assert tasks.starting_from("rotate") == ["doa"]
    with pytest.raises(ValueError, match="unknown task 'localise'; did you mean localize?"):
        tasks.get("localise")
    from jobs import downstream
    with pytest.raises(UsageError, match="unknown task 'localise'; did you mean localize?"):
        downstream.main(["--task", "localise"])  # `python -m jobs.downstream` prints it as one line, exit 2


@pytest.mark.parametrize("name", NAMES)
def test_task_contract(name, tmp_path):
    m = tasks.get(name)
    assert m.TABLE["task"] == name and issubclass(m.Config, DownstreamConfig)
    assert getattr(m, "SHAPE_FROM", "flip") in PRETEXT_TASKS
    for method, spec in m.METHODS.items():
        assert isinstance(spec["label"], str) and spec["pretext"] in (*PRETEXT_TASKS, None), method
    # every preset is a set of real fields with the right types
    assert {"demo", "small", "paper"} <= set(m.PRESETS)
    for preset in m.PRESETS.values():
        apply(m.Config(), preset)
    # the paper's numbers: labelled, in the paper's units, for metrics it names
    for key, entry in m.PAPER.items():
        assert set(entry["numbers"]) == set(entry["labels"]), key
        assert set(entry["units"]) <= {k for row in entry["numbers"].values() for k in row}, key
    # one row per method makes a valid table, written with the paper's numbers beside it
    rows = [{"method": k, "label": v["label"], "metrics": {x: float(i) for x in m.TABLE["metrics"]},
             "per_clip": {x: [float(i), float(i) + 1] for x in m.TABLE["metrics"]}, "clip_ids": ["a", "b"]}
            for i, (k, v) in enumerate(m.METHODS.items())]
    json_path, md_path = tables.write_table({**m.TABLE, "rows": rows}, tmp_path)
    t = json.loads(json_path.read_text())
    assert t["paper"] == m.PAPER.get(name, {}).get("numbers", {}) and t["wilcoxon"]["best"] in m.METHODS
    assert all(v["label"] in md_path.read_text() for v in m.METHODS.values())
    # an unknown method fails before any data is read
    with pytest.raises(ValueError, match=f"unknown method 'nope' for {name}; methods are"):
        m.run_trial(dataclasses.replace(m.Config(), method="nope", data_root=str(tmp_path / "absent")))


@pytest.mark.parametrize("name", NAMES)
def test_task_job_entrypoint(name, capsys):
    """`python -m jobs.downstream --task NAME` is every task's Ray job; its --help lists the task's presets."""
    from jobs import downstream
    with pytest.raises(SystemExit) as e:
        downstream.main(["--task", name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"--task {name}" in out and all(p in out for p in tasks.get(name).PRESETS)
