"""The two test lanes: `make test` (everything) and `make test-fast` (`pytest -m "not slow"`), which starts no service
(moto, Ray, MLflow server), uses no trained model and still runs at least half of the tests.

    .venv/bin/python -m pytest tests/test_lanes.py -q
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Fixtures that start a service or train a model: only tests marked `slow` may use them.
SLOW_FIXTURES = {"moto_server", "bucket", "ray_local", "ingested", "demo_run", "mlflow_servers",
                 "services", "cluster_services",  # cluster.local.up (test_cluster, test_pretext_job)
                 "rotate_checkpoint"}             # a pretext training run (test_doa)


def _pytest(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # collects the whole suite (10 s): a guard of the fast lane, run with everything else
def test_fast_lane_starts_no_service_and_runs_at_least_half_of_the_tests():
    plan = _pytest("--setup-plan", "-q", "-m", "not slow")  # what a fast run would set up, without running it
    tests = dict(re.findall(r"^\s*(tests/\S+)(?: \(fixtures used: ([^)]*)\))?$", plan, re.M))
    users = [test for test, fixtures in tests.items() if SLOW_FIXTURES & set(fixtures.split(", "))]
    assert not users, f"mark these @pytest.mark.slow (they start a service or train a model): {users}"
    started = re.findall(r"SETUP +[SPMCF] (\w+)", plan)
    assert started and not SLOW_FIXTURES & set(started), started

    slow = int(re.search(r"(\d+) deselected", plan).group(1))
    assert slow > 0 and 2 * len(tests) >= len(tests) + slow, f"the fast lane runs {len(tests)} tests, {slow} are slow"
