"""cluster/: the local services (moto S3, MLflow, a Ray head) started for real by cluster/local.py, and the cloud
configs (cluster/gpu-cluster.yaml, cluster/runtime_env.yaml) checked with Ray's own validators.

    .venv/bin/python -m pytest tests/test_cluster.py -q

One `up` serves the module's service tests, which run in file order and end with `down`; a test of its own shows
that `down` leaves a service it merely reused running. Every service binds to 127.0.0.1 in its own session and is
stopped by PID; the tests check that nothing of theirs is left.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `cluster` is not an installed package; run from the checkout
    sys.path.insert(0, str(REPO))

from cluster import local  # noqa: E402

VENV_BIN = local._venv_bin()
STARTUP_TIMEOUT = 240  # seconds per service: generous, the machine is shared and loaded


def _client_env(services: local.LocalServices) -> dict[str, str]:
    """This process's environment without any Ray/AWS/MLflow settings other fixtures left, plus `services.env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    return {**env, **services.env}


def _get(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _listening_addresses(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes `pids` hold, from /proc/net/tcp{,6}."""
    inode_owner = {}
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inode_owner[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inode_owner:  # 0A: LISTEN
                continue
            address, port = local_address.split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # kernel words are little-endian
            found.append((inode_owner[inode], str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


# ---- one `up` for the service tests ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state_dir():
    path = Path(tempfile.mkdtemp(prefix="frt-"))  # short: the Ray head's unix sockets live under it
    yield path
    local.down(path)  # whatever a failing test left running
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def services(state_dir):
    t0 = time.monotonic()
    started = local.up(state_dir, ray_cpus=1, object_store_mb=128, timeout=STARTUP_TIMEOUT)
    print(f"\ncluster.local up: {time.monotonic() - t0:.1f} s")
    return started


@pytest.mark.slow
def test_up_starts_healthy_services_on_loopback(services):
    assert set(services.services) == {"s3", "mlflow", "ray"}
    sessions = set()
    for name, svc in services.services.items():
        assert svc.owned and local.is_running(svc), name
        assert svc.url.startswith("http://127.0.0.1:"), svc.url
        assert local.healthy(svc, services), name
        sessions |= set(local._session_processes(svc.pid, svc.start_ticks))
    assert all(info["healthy"] for info in local.status(services.state_dir).values())
    assert services.ray.extra["ray_version"] == "2.60.0"
    listening = _listening_addresses(sessions)
    assert {svc.port for svc in services.services.values()} <= {port for _, _, port in listening}
    assert all(_is_loopback(address) for _, address, _ in listening), listening  # GCS and raylet too


@pytest.mark.slow
def test_job_runs_on_the_venv_python_with_the_token(services):
    result = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--", "python", "-c",
                             "import sys; print(sys.executable)"],
                            env=_client_env(services), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert str(VENV_BIN / "python") in result.stdout.splitlines(), result.stdout[-3000:]
    assert "succeeded" in result.stdout + result.stderr


@pytest.mark.slow
def test_job_api_rejects_requests_without_the_token(services):
    jobs = f"{services.ray.url}/api/jobs/"
    submit = json.dumps({"entrypoint": "echo should-not-run"}).encode()
    assert _get(jobs) == 401
    assert _get(jobs, data=submit, headers={"Content-Type": "application/json"}) == 401
    assert _get(jobs, headers={"Authorization": "Bearer not-the-token"}) == 403
    assert _get(jobs, headers={"Authorization": f"Bearer {local.ray_token(create=False)[0]}"}) == 200


@pytest.mark.slow
def test_mlflow_run_artifact_lands_in_the_bucket(services):
    script = ("import mlflow\n"
              "with mlflow.start_run() as run:\n"
              "    mlflow.log_param('cluster', 'local')\n"
              "    mlflow.log_text('hello', 'notes/hello.txt')\n"
              "print(run.info.run_id)\n")
    result = subprocess.run([str(VENV_BIN / "python"), "-c", script], env=_client_env(services),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split()[-1]

    import boto3
    env = services.env
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flipray", Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"/{run_id}/artifacts/notes/hello.txt") for k in keys), keys
    assert _get(services.mlflow.url + "/") == 200  # the UI


@pytest.mark.slow
def test_env_prints_exports_but_never_the_token(services, state_dir):
    result = subprocess.run([sys.executable, "-m", "cluster.local", "env", "--state-dir", str(state_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    exported = dict(shlex.split(line)[1].split("=", 1) for line in result.stdout.splitlines()
                    if line.startswith("export "))
    assert exported == services.env
    assert exported["RAY_AUTH_MODE"] == "token"
    assert exported["RAY_API_SERVER_ADDRESS"] == services.ray.url
    assert exported["RAY_ADDRESS"] == services.ray.extra["gcs_address"]
    assert exported["MLFLOW_TRACKING_URI"] == services.mlflow.url
    token = local.ray_token(create=False)[0]
    assert token and token not in result.stdout
    assert token not in (state_dir / local.STATE_FILE).read_text()


@pytest.mark.slow
def test_second_up_reuses_the_running_services(services, state_dir):
    t0 = time.monotonic()
    again = local.up(state_dir, ray_cpus=1, object_store_mb=128, timeout=STARTUP_TIMEOUT)
    assert time.monotonic() - t0 < 60
    assert {n: s.pid for n, s in again.services.items()} == {n: s.pid for n, s in services.services.items()}
    assert all(s.owned for s in again.services.values())


@pytest.mark.slow
def test_down_stops_everything_it_started(services, state_dir):
    before = {name: local._session_processes(svc.pid, svc.start_ticks) for name, svc in services.services.items()}
    assert len(before["ray"]) > 3  # GCS, raylet, dashboard, workers, ...
    t0 = time.monotonic()
    assert local.down(state_dir) == {"ray": "stopped", "mlflow": "stopped", "s3": "stopped"}
    print(f"\ncluster.local down: {time.monotonic() - t0:.1f} s")
    for name, procs in before.items():
        assert not [pid for pid, ticks in procs.items() if local._alive(pid, ticks)], name
    leaders = {svc.pid for svc in services.services.values()}
    table = local._proc_table()
    assert not [p for p in table.values() if (p.sid in leaders or p.pgid in leaders) and p.state != "Z"]
    assert not (state_dir / local.STATE_FILE).exists()
    assert local.down(state_dir) == {}


# ---- reuse without ownership -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_down_leaves_a_reused_service_running(tmp_path):
    port = local.free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "moto.log", "wb") as log:
        theirs = subprocess.Popen([str(VENV_BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while local._http_get(f"{url}/moto-api/")[0] != 200:
            assert theirs.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.3)
        reused = local.up(tmp_path / "state", s3=True, mlflow=False, ray=False, s3_port=port)
        assert reused.s3.url == url and not reused.s3.owned and reused.s3.pid is None
        assert local.load(tmp_path / "state").s3.url == url
        local._s3_client(url, reused.credentials).head_bucket(Bucket="flipray")  # up made the bucket there
        assert local.down(tmp_path / "state") == {"s3": "left running (not started by cluster.local)"}
        assert theirs.poll() is None and local.s3_healthy(url)
    finally:
        theirs.send_signal(signal.SIGTERM)  # ours to stop, by PID
        try:
            theirs.wait(timeout=10)
        except subprocess.TimeoutExpired:
            theirs.kill()
            theirs.wait()


def test_stop_only_kills_the_process_it_recorded():
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ticks = local._start_ticks(sleeper.pid)
        assert local.stop(local.Service("s3", "http://x", 1, owned=False, pid=sleeper.pid, start_ticks=ticks)) is False
        # A record whose PID now names another process (another start time) stops nothing.
        local.stop(local.Service("s3", "http://x", 1, owned=True, pid=sleeper.pid, start_ticks=ticks + 1))
        assert sleeper.poll() is None
        assert local.stop(local.Service("s3", "http://x", 1, owned=True, pid=sleeper.pid, start_ticks=ticks))
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_env_without_state_fails(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.local", "env", "--state-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and not result.stdout and "up" in result.stderr


def test_a_state_file_that_is_no_record_is_one_line_and_left_alone(tmp_path):
    """services.json is written by atomic rename; a hand-edited or foreign one is refused by every command (was: a
    JSON traceback), and `up` does not write over it."""
    state = tmp_path / "services.json"
    for text in ("garbage{", '{"services": {"s3": {"nonsense": 1}}}'):
        state.write_text(text)
        for command in ("status", "down", "env", "up"):
            result = subprocess.run([sys.executable, "-m", "cluster.local", command, "--state-dir", str(tmp_path)],
                                    cwd=REPO, capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, (command, result.stderr[-2000:])
            assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(
                f"python -m cluster.local: {state}: not a record of cluster.local's services ("), result.stderr
        assert state.read_text() == text


def test_ray_temp_dir_stays_short_enough_for_sockets(tmp_path):
    assert local.ray_temp_dir(Path("/tmp/s")) == Path("/tmp/s/ray")
    deep = tmp_path / ("x" * 60)
    short = local.ray_temp_dir(deep)
    assert len(str(short)) <= local.MAX_RAY_TEMP_DIR_LEN + 20 and short == local.ray_temp_dir(deep)
    assert short != local.ray_temp_dir(tmp_path / ("y" * 60))


# ---- cloud configs -----------------------------------------------------------------------------------------------

def test_runtime_env_keeps_data_and_environments_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**spec)  # Ray accepts it
    assert spec["working_dir"] == "."
    tree = tmp_path / "repo"
    kept = ["pyproject.toml", "flipray/__init__.py", "flipray/data/loader.py", "jobs/ingest.py", "cluster/local.py",
            "k8s/Dockerfile", "docs/cluster.md"]
    dropped = [".venv/bin/python", "data/demo/manifest.jsonl", "runs/demo/model.pt", "mlruns/0/meta.yaml",
               "mlflow.db", ".flipray/local/services.json", ".git/HEAD", "clip.webm", "sub/clip.flac",
               "flipray/__pycache__/x.cpython-311.pyc"]
    for name in kept + dropped:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    create_package(str(tree), tmp_path / "pkg.zip", include_gitignore=False, excludes=spec["excludes"])
    packed = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert packed == set(kept)


def test_gpu_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "cluster" / "gpu-cluster.yaml").read_text()
    config = prepare_config(yaml.safe_load(text))
    validate_config(config)  # Ray's cluster-launcher schema
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == "flipray:0.1.0"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t["node_config"]["InstanceType"] for t in types.values()
                 if t["node_config"]["InstanceType"].startswith(("g5.", "p4d.", "g6.", "p5."))]
    assert gpu_types
    assert not any(key in text for key in ("aws_access_key_id", "aws_secret_access_key", "AKIA"))
    assert "0.0.0.0" not in text  # the dashboard is reached through `ray dashboard`'s SSH tunnel
    # The image's Ray is the project's Ray (2.60.0), and the tag is the project's version.
    import ray
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert 'version = "0.1.0"' in (REPO / "pyproject.toml").read_text()
