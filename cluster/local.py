"""Local flipray services: a moto S3 endpoint, an MLflow tracking server and a Ray head with dashboard and job server.

    python -m cluster.local up [--s3] [--mlflow] [--ray] [--state-dir .flipray/local] [--ray-cpus N]
    eval "$(python -m cluster.local env)"
    ray job submit -- python -m jobs.ingest ...
    python -m cluster.local status
    python -m cluster.local down

Run it with the project's venv python (`.venv/bin/python -m cluster.local ...`): the Ray head is started from that
venv's `ray`, with that venv first on PATH, so a job's `python` is the venv's python.

Every service binds to 127.0.0.1, runs in its own session (`start_new_session=True`, so its PID is also its process
group and session id) and is stopped by that PID only: this module never runs `ray stop` or kills by name, which would
hit every Ray on a shared machine. What was started, on which ports, with which PIDs, is kept in
`<state-dir>/services.json`. `up` reuses a service recorded there while it still answers, and a service already
answering on a port you name (say your own MLflow on 127.0.0.1:5000); `down` stops only what `up` started and merely
forgets what it reused.

Ray's token authentication stays on: the head runs with RAY_AUTH_MODE=token and Ray's usual token (RAY_AUTH_TOKEN,
else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, which `up` creates, mode 0600, when none exists). Clients
with RAY_AUTH_MODE=token (`env` prints it) read the same token and send it as `Authorization: Bearer <token>`. The
token itself is never printed or written to the state file.

The AWS keys `env` prints for a moto endpoint are random dummies generated per state dir: moto accepts any keys,
and they are worthless elsewhere.

Linux: processes are found through /proc (sessions and descendants), elsewhere only by process group.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from flipray.atomic import folder_lock
from flipray.overrides import UsageError, user_errors

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = Path(".flipray/local")
HOST = "127.0.0.1"
BUCKET = "flipray"
REGION = "us-east-1"
STATE_FILE = "services.json"
NAMES = ("s3", "mlflow", "ray")
# A Ray temp dir holds unix sockets (<temp>/session_<date>_<pid>/sockets/plasma_store), and a socket path may not
# exceed 107 bytes; a longer state dir gets its Ray temp dir under the system temp dir instead.
MAX_RAY_TEMP_DIR_LEN = 40


# ---- records -----------------------------------------------------------------------------------------------------

@dataclass
class Service:
    """One local service. `owned`: started by this module (so `down` stops it); False: found running and reused."""

    name: str
    url: str
    port: int
    owned: bool
    pid: int | None = None          # session leader = process group id = session id (start_new_session=True)
    start_ticks: int | None = None  # /proc/<pid>/stat starttime, to tell our process from a later one with its PID
    log: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pgid(self) -> int | None:
        return self.pid


@dataclass
class LocalServices:
    """What `up` brought up (or found): per-service records, and the client environment to reach them."""

    state_dir: Path
    s3: Service | None = None
    mlflow: Service | None = None
    ray: Service | None = None
    credentials: dict = field(default_factory=dict)

    @property
    def services(self) -> dict[str, Service]:
        return {name: svc for name in NAMES if (svc := getattr(self, name)) is not None}

    @property
    def env(self) -> dict[str, str]:
        """Client environment: AWS_* for the S3 endpoint, MLFLOW_TRACKING_URI, and for Ray RAY_API_SERVER_ADDRESS
        (dashboard: job submission), RAY_ADDRESS (GCS: ray.init) and RAY_AUTH_MODE=token (the client reads the token
        as Ray does and sends it as a bearer token)."""
        env: dict[str, str] = {}
        if self.s3:
            env["AWS_ENDPOINT_URL"] = self.s3.url
            env["AWS_DEFAULT_REGION"] = env["AWS_REGION"] = REGION
            if self.s3.extra.get("moto") and self.credentials:
                env["AWS_ACCESS_KEY_ID"] = self.credentials["aws_access_key_id"]
                env["AWS_SECRET_ACCESS_KEY"] = self.credentials["aws_secret_access_key"]
        if self.mlflow:
            env["MLFLOW_TRACKING_URI"] = self.mlflow.url
        if self.ray:
            # `ray job submit` and JobSubmissionClient read RAY_API_SERVER_ADDRESS first (the dashboard); ray.init()
            # reads RAY_ADDRESS and refuses an http:// one, so that is the GCS address (where known).
            env["RAY_API_SERVER_ADDRESS"] = self.ray.url
            env["RAY_ADDRESS"] = self.ray.extra.get("gcs_address") or self.ray.url
            env["RAY_AUTH_MODE"] = "token"
            if self.ray.extra.get("loopback"):  # drivers on this machine reach the head's 127.0.0.1 addresses
                env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            if token_path := self.ray.extra.get("token_path_env"):
                env["RAY_AUTH_TOKEN_PATH"] = token_path
        return env

    def export_lines(self) -> str:
        """`export K=V` lines for `eval "$(python -m cluster.local env)"`."""
        env = self.env
        lines = []
        for key in sorted(env):
            if key == "AWS_ACCESS_KEY_ID":
                lines.append("# dummy keys for the local moto S3 endpoint only (moto accepts any): not AWS credentials")
            lines.append(f"export {key}={shlex.quote(env[key])}")
        if self.ray:
            source = self.ray.extra.get("token_source", "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
            lines.append(f"# Ray token (not printed): {source}; `ray get-auth-token` shows it for the dashboard login")
        return "\n".join(lines) + "\n"


# ---- state file --------------------------------------------------------------------------------------------------

def _state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def _prepare_state_dir(state_dir: Path) -> Path:
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ignore = state_dir / ".gitignore"
    if not ignore.exists():  # logs, databases and dummy keys never show up in `git status`
        ignore.write_text("*\n")
    return state_dir


def load(state_dir: Path | str = DEFAULT_STATE_DIR) -> LocalServices:
    """The services recorded in `state_dir` (empty when none); does not check that they answer."""
    state_dir = Path(state_dir).resolve()
    path = _state_path(state_dir)
    if not path.exists():
        return LocalServices(state_dir)
    try:
        data = json.loads(path.read_text())
        services = {name: Service(**rec) for name, rec in data.get("services", {}).items() if name in NAMES}
        return LocalServices(state_dir, credentials=data.get("credentials", {}), **services)
    except (ValueError, TypeError, AttributeError) as e:  # written by atomic rename: only a hand edit gets here
        raise UsageError(f"{path}: not a record of cluster.local's services ({str(e).splitlines()[0]}); move it "
                         f"aside and stop what it listed by PID (`ps`), then run `up` again") from None


def _save(local: LocalServices) -> None:
    path = _state_path(local.state_dir)
    data = {"services": {name: dataclasses.asdict(svc) for name, svc in local.services.items()},
            "credentials": local.credentials}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _locked(state_dir: Path):
    """One `up`/`down` at a time per state dir (released if the holder dies)."""
    def wait(holder: str) -> None:
        print(f"{state_dir}: another cluster.local (pid {holder}) is starting or stopping services; waiting for it",
              file=sys.stderr, flush=True)
    return folder_lock(state_dir, ".lock", busy=wait)


# ---- processes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_ticks: int


def _read_proc(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields 3.. (comm, field 2, may hold spaces and parentheses)
    return _Proc(pid, int(rest[1]), int(rest[2]), int(rest[3]), rest[0], int(rest[19]))


def _proc_table() -> dict[int, _Proc]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (proc := _read_proc(int(entry.name))):
            table[proc.pid] = proc
    return table


def _start_ticks(pid: int) -> int | None:
    proc = _read_proc(pid) if Path("/proc").is_dir() else None
    return proc.start_ticks if proc else None


def _alive(pid: int, start_ticks: int | None) -> bool:
    """Whether `pid` still runs and is the process we know (same start time); reaps it if it is our zombie child."""
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    proc = _read_proc(pid)
    if proc is None or (start_ticks is not None and proc.start_ticks != start_ticks):
        return False
    if proc.state in ("Z", "X"):
        _reap(pid)
        return False
    return True


_CHILDREN: dict[int, subprocess.Popen] = {}  # services started by this Python process, to reap when they stop


def _reap(pid: int) -> None:
    """Collect the exit status of a service this process started (else it stays a zombie while we run); a process
    someone else started is theirs to wait for."""
    if (child := _CHILDREN.pop(pid, None)) is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.1)


def _signal(pid: int, start_ticks: int | None, sig: int) -> None:
    if _alive(pid, start_ticks):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(procs: dict[int, int | None], timeout: float) -> dict[int, int | None]:
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: ticks for pid, ticks in procs.items() if _alive(pid, ticks)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _session_processes(leader: int, start_ticks: int | None) -> dict[int, int | None]:
    """{pid: start ticks} of the session `leader` leads plus all descendants of `leader`, leader included.

    Descendants count even when they made their own session (Ray's job drivers do). A session id is not reused while
    any process still carries it, so members whose leader has died are still ours, unless the leader's PID now names
    a different process (another start time), in which case nothing of ours is left.
    """
    table = _proc_table()
    lead = table.get(leader)
    if lead is not None and start_ticks is not None and lead.start_ticks != start_ticks:
        return {}
    found = {p.pid for p in table.values() if p.sid == leader}
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = [leader] if lead is not None else []
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(c for c in children.get(pid, []) if c not in found)
    return {pid: table[pid].start_ticks for pid in found if pid in table}


def _terminate(pid: int, start_ticks: int | None, timeout: float = 30.0) -> list[int]:
    """Stop the session `pid` leads, and its descendants: SIGTERM to the leader first (`ray start --block` and
    `mlflow server` shut their own children down), then SIGTERM to what is left, then SIGKILL.
    Returns the PIDs that survived (empty on success)."""
    if not Path("/proc").is_dir():  # no /proc (macOS): the process group is all we know
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        time.sleep(min(timeout, 5.0))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        return []
    procs = _session_processes(pid, start_ticks)
    if not procs:
        _reap(pid)
        return []
    if pid in procs:
        _signal(pid, procs[pid], signal.SIGTERM)
        _wait_gone({pid: procs[pid]}, timeout * 0.6)
    procs.update(_session_processes(pid, start_ticks))  # anything started meanwhile
    left = _wait_gone(procs, 0)
    for other, ticks in left.items():
        _signal(other, ticks, signal.SIGTERM)
    left = _wait_gone(left, timeout * 0.3)
    for other, ticks in left.items():
        _signal(other, ticks, signal.SIGKILL)
    left = _wait_gone(left, max(timeout * 0.1, 2.0))
    _reap(pid)
    return sorted(left)


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start `cmd` in its own session (its PID is its process group and session id), output to `log_path`."""
    log.info("starting %s", " ".join(shlex.quote(c) for c in cmd))
    with open(log_path, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    return proc


def _tail(path: Path | str | None, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:] if path else ""
    except OSError:
        return ""


def _wait_ready(name: str, proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, log_path: Path):
    """Wait until `ready()`; if the process exits, time runs out or we are interrupted, stop it and raise."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before it answered; log {log_path}:"
                                   f"\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer within {timeout:.0f} s (stopped it); log {log_path}:\n"
                                   f"{_tail(log_path)}")
            time.sleep(0.5)
    except BaseException:
        _terminate(proc.pid, _start_ticks(proc.pid), timeout=15)
        raise


# ---- ports and HTTP ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


def _http_get(url: str, headers: dict | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError, http.client.HTTPException):  # nothing, or no HTTP server, answers there
        return 0, b""


# ---- S3 (moto) ---------------------------------------------------------------------------------------------------

def _s3_client(endpoint: str, credentials: dict | None):
    import boto3
    from botocore.config import Config
    keys = credentials or {}
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=keys.get("aws_access_key_id"),
                        aws_secret_access_key=keys.get("aws_secret_access_key"),
                        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))


def _is_moto(endpoint: str) -> bool:
    return _http_get(f"{endpoint}/moto-api/")[0] == 200


def _keys_for(endpoint: str, credentials: dict | None) -> dict | None:
    """Keys to talk to `endpoint`: for moto the state dir's dummies (moto takes any), else the environment's."""
    if not _is_moto(endpoint):
        return None
    return credentials or {"aws_access_key_id": "moto", "aws_secret_access_key": "moto"}


def s3_healthy(endpoint: str, credentials: dict | None = None) -> bool:
    """S3 answers ListBuckets at `endpoint` (moto takes any keys; another S3 gets the environment's)."""
    if not _port_in_use(int(endpoint.rsplit(":", 1)[1])):
        return False
    try:
        _s3_client(endpoint, _keys_for(endpoint, credentials)).list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not a usable S3 here"
        return False


def ensure_bucket(endpoint: str, bucket: str = BUCKET, credentials: dict | None = None) -> None:
    client = _s3_client(endpoint, _keys_for(endpoint, credentials))
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - missing (404) or not visible: try to create it
        client.create_bucket(Bucket=bucket)


def start_s3(state_dir: Path | str = DEFAULT_STATE_DIR, port: int | None = None, bucket: str = BUCKET,
             credentials: dict | None = None, venv: Path | None = None, timeout: float = 60.0) -> Service:
    """Start moto's S3 server on 127.0.0.1 (a free port unless `port`), wait until it answers, create `bucket`."""
    state_dir = _prepare_state_dir(state_dir)
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    log_path = state_dir / "logs" / "s3.log"
    log_path.parent.mkdir(exist_ok=True)
    proc = _spawn([str(_venv_bin(venv) / "python"), "-m", "moto.server", "-H", HOST, "-p", str(port)], log_path,
                  dict(os.environ), state_dir)
    _wait_ready("moto S3", proc, lambda: _http_get(f"{url}/moto-api/", timeout=2)[0] == 200, timeout, log_path)
    ensure_bucket(url, bucket, credentials)
    return Service("s3", url, port, owned=True, pid=proc.pid, start_ticks=_start_ticks(proc.pid), log=str(log_path),
                   extra={"moto": True, "bucket": bucket})


# ---- MLflow ------------------------------------------------------------------------------------------------------

def mlflow_healthy(url: str) -> bool:
    status, body = _http_get(f"{url}/health")
    return status == 200 and body.strip() == b"OK"


def start_mlflow(state_dir: Path | str = DEFAULT_STATE_DIR, port: int | None = None, artifacts: str | None = None,
                 s3_env: dict[str, str] | None = None, workers: int = 1, venv: Path | None = None,
                 timeout: float = 180.0) -> Service:
    """Start `mlflow server` on 127.0.0.1: sqlite store `<state>/mlflow.db`, artifacts proxied by the server to
    `artifacts` (e.g. s3://flipray/mlflow with `s3_env` naming the endpoint; default `<state>/mlartifacts`).

    The server creates the sqlite schema itself, once, before its (single) worker starts, so no client ever races a
    fresh database; sqlite wants one writer, hence workers=1.
    """
    state_dir = _prepare_state_dir(state_dir)
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    artifacts = artifacts or str(state_dir / "mlartifacts")
    log_path = state_dir / "logs" / "mlflow.log"
    log_path.parent.mkdir(exist_ok=True)
    local_s3 = bool(s3_env)  # a local endpoint replaces whatever AWS settings the caller has
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_S3_") + (("AWS_",) if local_s3 else ()))}
    env.update(s3_env or {})
    if "AWS_ENDPOINT_URL" in env:
        env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: GenAI jobs are not used here
    cmd = [str(_venv_bin(venv) / "python"), "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", artifacts, "--workers", str(workers)]
    proc = _spawn(cmd, log_path, env, state_dir)
    _wait_ready("MLflow", proc, lambda: mlflow_healthy(url), timeout, log_path)
    return Service("mlflow", url, port, owned=True, pid=proc.pid, start_ticks=_start_ticks(proc.pid),
                   log=str(log_path), extra={"artifacts": artifacts, "deps": _mlflow_deps(s3_env, artifacts)})


def _mlflow_deps(s3_env: dict | None, artifacts: str) -> dict:
    """What an MLflow server was started with; `up` restarts one of ours when this changes."""
    return dict(s3_env or {}, artifacts=artifacts)


# ---- Ray ---------------------------------------------------------------------------------------------------------

def _venv_bin(venv: Path | None = None) -> Path:
    """bin/ of the project's venv: `venv`, else the venv running this module, else <repo>/.venv."""
    if venv is None:
        venv = Path(sys.prefix) if sys.prefix != sys.base_prefix else REPO / ".venv"
    return Path(venv) / "bin"


def ray_token(create: bool = True) -> tuple[str, str]:
    """(token, where it came from), looked up the way Ray does: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    With none of them, creates ~/.ray/auth_token (64 hex digits, as `ray get-auth-token --generate` does, but mode
    0600, and without racing another process that creates it at the same moment).
    """
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            return Path(path).expanduser().read_text().strip(), path
        except OSError as e:
            raise RuntimeError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e}); Ray would refuse it too") from e
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists() and not create:
        return "", str(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, and never replaces a token another process wrote first
            log.info("created a Ray auth token in %s", path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip(), str(path)


def ray_healthy(url: str, token: str | None = None) -> bool:
    """The dashboard answers /api/version and its job API accepts `token`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, body = _http_get(f"{url}/api/version", headers)
    if status != 200 or b"ray_version" not in body:
        return False
    return _http_get(f"{url}/api/jobs/", headers, timeout=10)[0] == 200


def ray_temp_dir(state_dir: Path) -> Path:
    """<state>/ray, or a short per-state-dir folder in the system temp dir when that path is too long for sockets."""
    candidate = Path(state_dir).resolve() / "ray"
    if len(str(candidate)) <= MAX_RAY_TEMP_DIR_LEN:
        return candidate
    digest = hashlib.sha1(str(candidate).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"flipray-ray-{digest}"


def start_ray_head(state_dir: Path | str = DEFAULT_STATE_DIR, port: int | None = None,
                   dashboard_port: int | None = None, num_cpus: int | None = None,
                   object_store_mb: int | None = None, env: dict[str, str] | None = None,
                   venv: Path | None = None, timeout: float = 180.0) -> Service:
    """Start a Ray head on 127.0.0.1 from the venv's `ray`: GCS on `port`, dashboard + job server on `dashboard_port`
    (free ports unless given), its own --temp-dir, token auth on, `env` (service endpoints) passed on to every job.

    `ray start --block` keeps the head's processes under one parent in one session, so stopping that PID stops
    exactly this head; without --block `ray start` leaves daemons that only `ray stop` (every Ray on the machine)
    would find.
    """
    state_dir = _prepare_state_dir(state_dir)
    port = port or free_port()
    dashboard_port = dashboard_port or free_port()
    url = f"http://{HOST}:{dashboard_port}"
    temp_dir = ray_temp_dir(state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "logs" / "ray.log"
    log_path.parent.mkdir(exist_ok=True)
    bin_dir = _venv_bin(venv)
    token, token_source = ray_token()

    local_s3 = "AWS_ENDPOINT_URL" in (env or {})  # then the caller's own AWS settings must not mix in
    head_env = {k: v for k, v in os.environ.items()
                if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not (local_s3 and k.startswith("AWS_"))}
    head_env.update(env or {})
    head_env.update({
        "RAY_AUTH_MODE": "token",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # a job's `python` is the venv's
        "VIRTUAL_ENV": str(bin_dir.parent),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray swaps --node-ip-address 127.0.0.1 for the machine's address and then listens on every interface;
        # its single-machine mode (the macOS/Windows default) keeps the node, GCS and raylet on 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # On SIGTERM the head first drains (for Serve proxies, up to 30 s); nothing here needs that.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Metrics ports that default to fixed numbers (44227, 44217): another Ray on the machine may hold them.
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "AUTOSCALER_METRIC_PORT": str(free_port()),
    })
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block",
           "--node-ip-address", HOST, "--port", str(port),
           "--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
           # Ports that default to fixed numbers would collide with another Ray on the machine:
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--min-worker-port", "0", "--max-worker-port", "0",
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if object_store_mb is not None:
        cmd += ["--object-store-memory", str(object_store_mb * 1024 * 1024)]
    proc = _spawn(cmd, log_path, head_env, state_dir)
    _wait_ready("Ray head", proc, lambda: ray_healthy(url, token), timeout, log_path)
    version = json.loads(_http_get(f"{url}/api/version", {"Authorization": f"Bearer {token}"})[1]).get("ray_version")
    extra = {"gcs_address": f"{HOST}:{port}", "dashboard_url": url, "temp_dir": str(temp_dir),
             "python": str(bin_dir / "python"), "ray_version": version, "num_cpus": num_cpus,
             "token_source": token_source, "loopback": True, "deps": dict(env or {})}
    if "RAY_AUTH_TOKEN_PATH" in os.environ:
        extra["token_path_env"] = os.environ["RAY_AUTH_TOKEN_PATH"]
    return Service("ray", url, dashboard_port, owned=True, pid=proc.pid, start_ticks=_start_ticks(proc.pid),
                   log=str(log_path), extra=extra)


# ---- stop / up / down --------------------------------------------------------------------------------------------

def stop(service: Service, timeout: float = 30.0) -> bool:
    """Stop `service` if this module started it (by its PID: its session and descendants). Returns True when it
    was stopped (or had already gone); False for a reused service, which is left running."""
    if not service.owned or service.pid is None:
        return False
    left = _terminate(service.pid, service.start_ticks, timeout)
    if left:
        raise RuntimeError(f"{service.name}: processes {left} of session {service.pid} did not stop")
    return True


def is_running(service: Service) -> bool:
    """An owned service's leader process is alive (says nothing of whether it answers)."""
    return service.pid is not None and _alive(service.pid, service.start_ticks)


def healthy(service: Service, local: LocalServices | None = None) -> bool:
    if service.owned and not is_running(service):
        return False
    if service.name == "s3":
        return s3_healthy(service.url, local.credentials if local else None)
    if service.name == "mlflow":
        return mlflow_healthy(service.url)
    return ray_healthy(service.url, ray_token(create=False)[0])


def _eventually(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(1.0)
    return False


def _found(name: str, port: int, local: LocalServices) -> Service | None:
    """A service of kind `name` already answering on 127.0.0.1:`port` (not started by us), or None."""
    url = f"http://{HOST}:{port}"
    if not _port_in_use(port):
        return None
    if name == "s3" and s3_healthy(url, local.credentials):
        return Service("s3", url, port, owned=False, extra={"moto": _is_moto(url)})
    if name == "mlflow" and mlflow_healthy(url):
        return Service("mlflow", url, port, owned=False)
    if name == "ray":
        if ray_healthy(url, ray_token()[0]):
            if _http_get(f"{url}/api/version")[0] == 200:
                log.warning("the Ray cluster at %s has token authentication OFF (anyone who reaches it can run "
                            "code); reusing it as asked", url)
            return Service("ray", url, port, owned=False, extra={"dashboard_url": url})
        if _http_get(f"{url}/api/version")[0] in (401, 403):
            raise RuntimeError(f"a Ray dashboard answers on {url} but rejects this token ({ray_token()[1]}): "
                               "set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH to that cluster's token")
    raise RuntimeError(f"127.0.0.1:{port} is taken by something that is not a working {name} service")


def _reusable(name: str, local: LocalServices, port: int | None, deps: dict | None) -> Service | None:
    """The service to reuse for `name`, or None when one must be started (on `port`, or a free one).

    First the recorded one, if it answers and, when ours, was started with the same `deps` (the endpoints it was
    given); a recorded service of ours that fails that is stopped. Then, for a fixed `port`, whatever already
    answers there (not ours: `down` leaves it running).
    """
    record: Service | None = getattr(local, name)
    if record is not None and (port is None or record.port == port):
        same_deps = deps is None or record.extra.get("deps", {}) == deps
        answers = healthy(record, local) or (record.owned and is_running(record) and _eventually(
            lambda: healthy(record, local), seconds=20))  # ours and running: maybe only busy
        if answers and (same_deps or not record.owned):
            if not same_deps:
                log.warning("%s at %s (not ours) was set up with %s; reusing it anyway",
                            name, record.url, record.extra.get("deps"))
            log.info("%s: reusing %s (%s)", name, record.url, "ours" if record.owned else "not ours")
            return record
        log.info("%s: recorded %s is %s; replacing it", name, record.url,
                 "configured for other endpoints" if answers else "not answering")
    if record is not None and record.owned:
        if name == "ray" and is_running(record) and _http_get(
                f"{record.url}/api/version", {"Authorization": f"Bearer {ray_token()[0]}"})[0] == 403:
            raise RuntimeError(f"the Ray head at {record.url} (pid {record.pid}) runs, but rejects this token "
                               f"({ray_token()[1]}): use the token it was started with, or `down` it first")
        stop(record)
    if port is not None and (found := _found(name, port, local)) is not None:
        log.info("%s: reusing %s, which cluster.local did not start (down leaves it running)", name, found.url)
        return found
    return None


def up(state_dir: Path | str = DEFAULT_STATE_DIR, s3: bool = True, mlflow: bool = True, ray: bool = True, *,
       s3_port: int | None = None, mlflow_port: int | None = None, ray_port: int | None = None,
       dashboard_port: int | None = None, ray_cpus: int | None = None, object_store_mb: int | None = None,
       bucket: str = BUCKET, artifacts: str | None = None, venv: Path | None = None,
       timeout: float = 180.0) -> LocalServices:
    """Bring up the selected services (reusing what answers), record them in `<state_dir>/services.json` and return
    them. S3 comes first; then MLflow and the Ray head start in parallel, MLflow with the S3 endpoint, the Ray head
    with both endpoints in its environment (so every job sees them)."""
    state_dir = _prepare_state_dir(state_dir)
    with _locked(state_dir):
        local = load(state_dir)
        if not local.credentials:
            local.credentials = {"aws_access_key_id": "flipray-local-" + secrets.token_hex(6),
                                 "aws_secret_access_key": secrets.token_hex(20)}
        try:
            if s3:
                local.s3 = _reusable("s3", local, s3_port, None) or start_s3(
                    state_dir, s3_port, bucket, local.credentials, venv=venv, timeout=min(timeout, 60))
                _save(local)
                ensure_bucket(local.s3.url, bucket, local.credentials)
            s3_env = LocalServices(state_dir, s3=local.s3, credentials=local.credentials).env

            starts: dict[str, Callable[[], Service]] = {}
            mlflow_url = local.mlflow.url if local.mlflow else None
            if mlflow:
                destination = artifacts or (f"s3://{bucket}/mlflow" if local.s3 else str(state_dir / "mlartifacts"))
                if found := _reusable("mlflow", local, mlflow_port, _mlflow_deps(s3_env, destination)):
                    local.mlflow = found
                else:
                    local.mlflow, port = None, mlflow_port or free_port()
                    starts["mlflow"] = lambda: start_mlflow(state_dir, port, destination, s3_env, venv=venv,
                                                            timeout=timeout)
                mlflow_url = found.url if found else f"http://{HOST}:{port}"
            ray_env = dict(s3_env, **({"MLFLOW_TRACKING_URI": mlflow_url} if mlflow_url else {}))
            if ray:
                if found := _reusable("ray", local, dashboard_port, ray_env):
                    local.ray = found
                else:
                    local.ray = None
                    starts["ray"] = lambda: start_ray_head(state_dir, ray_port, dashboard_port, ray_cpus,
                                                           object_store_mb, ray_env, venv=venv, timeout=timeout)
            errors = []
            with ThreadPoolExecutor(max_workers=2) as pool:
                futures = {}
                # Ray's processes take ports of their own among the free ones: Ray starts once MLflow holds the port
                # picked for it, or one of them could take it first (seen: MLflow's health check got a gRPC answer)
                if "mlflow" in starts:
                    futures["mlflow"] = pool.submit(starts["mlflow"])
                    _eventually(lambda: _port_in_use(port) or futures["mlflow"].done(), timeout)
                if "ray" in starts:
                    futures["ray"] = pool.submit(starts["ray"])
                for name, future in futures.items():
                    try:
                        setattr(local, name, future.result())
                    except Exception as e:  # noqa: BLE001 - keep what did start on record, then re-raise
                        errors.append(e)
            if errors:
                raise errors[0]
        finally:
            _save(local)
    return local


def down(state_dir: Path | str = DEFAULT_STATE_DIR, names: Iterable[str] = NAMES,
         timeout: float = 30.0) -> dict[str, str]:
    """Stop the recorded services this module started, forget the ones it reused. {name: 'stopped' | 'left running'}.
    Ray's logs stay in its temp dir."""
    state_dir = Path(state_dir).resolve()
    if not _state_path(state_dir).exists():
        return {}
    result: dict[str, str] = {}
    with _locked(state_dir):
        local = load(state_dir)
        # Ray first: its jobs may still be writing to MLflow and S3.
        for name in ("ray", "mlflow", "s3"):
            svc = getattr(local, name)
            if svc is None or name not in names:
                continue
            result[name] = "stopped" if stop(svc, timeout) else "left running (not started by cluster.local)"
            setattr(local, name, None)
        if local.services:
            _save(local)
        else:
            _state_path(state_dir).unlink()
    return result


def status(state_dir: Path | str = DEFAULT_STATE_DIR) -> dict[str, dict]:
    local = load(state_dir)
    return {name: {"url": svc.url, "owned": svc.owned, "pid": svc.pid,
                   "running": is_running(svc) if svc.owned else None, "healthy": healthy(svc, local),
                   **{k: v for k, v in svc.extra.items() if k not in ("deps",)}}
            for name, svc in local.services.items()}


# ---- CLI ---------------------------------------------------------------------------------------------------------

def _summary(local: LocalServices) -> str:
    lines = []
    for name, svc in local.services.items():
        who = f"pid {svc.pid}" if svc.owned else "reused, not ours"
        what = {"s3": "S3 endpoint", "mlflow": "MLflow UI", "ray": "Ray dashboard"}[name]
        lines.append(f"  {what:14s} {svc.url}  ({who})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: %(default)s")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start (or reuse) the services; default: all three")
    for name in NAMES:
        p_up.add_argument(f"--{name}", action="store_true", help=f"bring up {name} (several may be named)")
    p_up.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)
    p_up.add_argument("--s3-port", type=int, help="fixed port (reuses an S3 answering there); default: free")
    p_up.add_argument("--mlflow-port", type=int, help="fixed port (reuses an MLflow answering there)")
    p_up.add_argument("--ray-port", type=int, help="fixed GCS port")
    p_up.add_argument("--dashboard-port", type=int, help="fixed dashboard port (reuses a Ray answering there)")
    p_up.add_argument("--ray-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    p_up.add_argument("--object-store-mb", type=int, help="Ray object store size (default: Ray's)")
    p_up.add_argument("--bucket", default=BUCKET, help="bucket created on the S3 endpoint (default: %(default)s)")
    p_up.add_argument("--artifacts", help="MLflow artifact destination (default: s3://BUCKET/mlflow with --s3, "
                                          "else <state-dir>/mlartifacts)")
    p_up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service")
    for name, text in (("down", "stop what up started"), ("status", "show the recorded services"),
                       ("env", "print export lines: eval \"$(python -m cluster.local env)\"")):
        sub.add_parser(name, help=text).add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    if args.command == "up":
        chosen = [n for n in NAMES if getattr(args, n)] or list(NAMES)
        t0 = time.monotonic()
        local = up(args.state_dir, **{n: n in chosen for n in NAMES}, s3_port=args.s3_port,
                   mlflow_port=args.mlflow_port, ray_port=args.ray_port, dashboard_port=args.dashboard_port,
                   ray_cpus=args.ray_cpus, object_store_mb=args.object_store_mb, bucket=args.bucket,
                   artifacts=args.artifacts, timeout=args.timeout)
        print(f"up in {time.monotonic() - t0:.1f} s (state: {local.state_dir / STATE_FILE}):\n{_summary(local)}")
        print(f'clients: eval "$({Path(sys.executable).name} -m cluster.local env'
              f'{"" if args.state_dir == DEFAULT_STATE_DIR else " --state-dir " + shlex.quote(str(args.state_dir))})"')
    elif args.command == "down":
        for name, what in down(args.state_dir).items() or {"-": "nothing recorded"}.items():
            print(f"{name}: {what}")
    elif args.command == "status":
        info = status(args.state_dir)
        print(json.dumps(info, indent=2) if info else "nothing recorded")
        return 0 if info and all(s["healthy"] for s in info.values()) else 1
    elif args.command == "env":
        local = load(args.state_dir)
        if not local.services:
            print(f"nothing recorded in {local.state_dir}: run `python -m cluster.local up` first", file=sys.stderr)
            return 1
        sys.stdout.write(local.export_lines())
    return 0


if __name__ == "__main__":
    with user_errors("python -m cluster.local"):
        sys.exit(main())
