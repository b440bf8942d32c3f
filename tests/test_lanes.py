"""The two test lanes: `make test` (everything) and `make test-fast` (`pytest -m "not slow"`), which starts no service
(moto, Ray, MLflow server), uses no trained model and still runs at least half of the tests.

    .venv/bin/python -m pytest tests/test_lanes.py -q
"""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Fixtures that start a service or train a model: only tests marked `slow` may use them.
SLOW_FIXTURES = {"moto_server", "bucket", "ray_local", "ingested", "demo_run",
                 "services", "cluster_services",  # cluster.local.up (test_cluster, test_pretext_job)
                 "rotate_checkpoint"}             # a pretext training run (test_doa)


def _pytest(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_fast_lane_starts_no_service_and_runs_at_least_half_of_the_tests():
    plan = _pytest("--setup-plan", "-q", "-m", "not slow")
    users = [line.split()[0] for line in plan.splitlines() if line.strip().startswith("tests/")
             and "(fixtures used:" in line and SLOW_FIXTURES & set(re.split(r"[ ,()]+", line.split("(fixtures used:", 1)[1]))]
    assert not users, f"mark these @pytest.mark.slow (they start a service or train a model): {users}"
    started = re.findall(r"SETUP +[SPMCF] (\w+)", plan)
    assert not SLOW_FIXTURES & set(started), started

    summary = _pytest("--collect-only", "-q", "-m", "not slow").strip().splitlines()[-1]
    fast, total, slow = map(int, re.match(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", summary).groups())
    assert fast + slow == total and slow > 0
    assert 2 * fast >= total, f"the fast lane runs only {fast} of {total} tests"
