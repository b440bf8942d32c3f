"""MLflow as the k8s manifests run it requires a login: the server started with the Deployment's own arguments,
environment and basic-auth settings (from the built dev overlay; only the address, stores and the Secret's values
replaced by local ones) answers 401 without credentials and serves a client that has them.

    .venv/bin/python -m pytest tests/test_mlflow_auth.py -x -q
"""
from __future__ import annotations

import base64
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("flipray_k8s_validate_auth", REPO / "k8s" / "validate.py")
validate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = validate
_spec.loader.exec_module(validate)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def k8s_mlflow(tmp_path):
    # The image installs mlflow[auth]; the test extras pin the same (Flask-WTF), a venv made before that lacks it.
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (pip install -e '.[test]')")
    docs = validate.build(REPO / "k8s" / "overlays" / "dev")
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "flipray-mlflow")
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    ini_dir, ini_name = env["MLFLOW_AUTH_CONFIG_PATH"].rsplit("/", 1)
    volume = next(v for v in pod["volumes"]
                  if v["name"] == next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == ini_dir))
    ini = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
               )["data"][ini_name]
    store_dir = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "auth-store")
    (tmp_path / ini_name).write_text(ini.replace(store_dir, str(tmp_path / "auth-store")))
    (tmp_path / "auth-store").mkdir()
    admin = ("test-admin", secrets.token_hex(12))  # stands in for the Secret flipray-mlflow-auth
    port = _free_port()
    args = [a.replace("--host=0.0.0.0", "--host=127.0.0.1").replace("--port=5000", f"--port={port}")
            for a in c["args"]]
    assert c["command"] == ["mlflow"]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    run_env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"],
                    "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / ini_name),
                    "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                    "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "MLFLOW_DEFAULT_ARTIFACT_ROOT": str(tmp_path / "artifacts")})
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", *args], cwd=tmp_path, env=run_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while _get_or_none(f"{url}/health") != 200:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"MLflow did not start: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, admin, tmp_path
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the server's own session: it and its workers, nothing else
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)
    except OSError:
        return None


@pytest.mark.slow  # starts an MLflow server
def test_mlflow_requires_a_login(k8s_mlflow, monkeypatch):
    url, admin, tmp_path = k8s_mlflow
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(api) == 401
    assert _get(api, (admin[0], "wrong-password")) == 401
    assert _get(api, admin) == 200
    assert (tmp_path / "auth-store" / "basic_auth.db").stat().st_size > 0  # the user store is on its volume

    # what the Ray pods do: MLFLOW_TRACKING_USERNAME/PASSWORD from the Secret
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    experiment = MlflowClient(url).create_experiment("flipray-auth-check")
    assert MlflowClient(url).get_experiment(experiment).name == "flipray-auth-check"
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException):
        MlflowClient(url).get_experiment(experiment)
