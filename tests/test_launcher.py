"""cluster/gpu-cluster.yaml (Ray's cluster launcher) refuses to start the head without MLFLOW_TRACKING_URI: its first
head start command, run here in bash as the launcher runs it inside the node's container.

    .venv/bin/python -m pytest tests/test_launcher.py -x -q
"""
import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_head_refuses_to_start_without_a_tracking_uri():
    config = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    commands = config["head_start_ray_commands"]
    guard = commands[0]
    assert "MLFLOW_TRACKING_URI" in guard
    assert any(c.strip().startswith("ulimit") and "ray start --head" in c for c in commands[1:])  # Ray starts after
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    refused = subprocess.run(["bash", "-c", guard], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert "MLFLOW_TRACKING_URI is not set" in refused.stderr and "docker.run_options" in refused.stderr
    empty = subprocess.run(["bash", "-c", guard], env={**env, "MLFLOW_TRACKING_URI": ""}, capture_output=True,
                           timeout=30)
    assert empty.returncode == 1
    ok = subprocess.run(["bash", "-c", guard], env={**env, "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"},
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stderr == ""
