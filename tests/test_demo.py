"""The demo's promise: on a freshly generated synthetic set, the `demo` preset learns the flip task (>= 90% test
accuracy) with the preset's sample budget (a few minutes of training on 2 idle CPU cores: timings are the README's and
the report's business, not this test's). The training itself is the session fixture `demo_run` (conftest.py), which
the `flipray check` and downstream tests reuse.
"""
import json

import pytest

from flipray.config import load_config

pytestmark = pytest.mark.slow  # trains the demo model


@pytest.mark.timeout(2400)  # ~7 minutes on 2 idle cores; generous for a loaded machine
def test_demo_preset_learns_the_flip_task(demo_run):
    report = demo_run["report"]
    on_disk = json.loads((demo_run["run_dir"] / "report.json").read_text())
    assert on_disk == report
    test = report["flip_accuracy"]["test"]
    assert test["samples"] == 60 * 4 * 2  # 60 test clips, 4 windows each, scored as recorded and swapped
    assert test["acc"] >= 0.90, report["flip_accuracy"]
    assert report["samples_seen"] >= load_config("demo").train.total_samples
