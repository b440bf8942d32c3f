"""MLflow for flipray jobs: where the tracking store is, the registered pretext model, and loading it back.

The tracking URI comes from `--tracking-uri`, else MLFLOW_TRACKING_URI, else the local services' sqlite
store `.flipray/local/mlflow.db` (the one `make demo` and `python -m cluster.local up --mlflow` use). A registered
version is a standard MLflow PyTorch model (`mlflow.pytorch`, so the UI shows its flavor and `mlflow.pytorch.
load_model` works) that carries the state_dict checkpoint (`checkpoint.pt` + `config.yaml`) as extra files.
flipray itself loads that checkpoint, never the pickled module: SpatialAlignmentNet with `torch.load(...,
weights_only=True)`. Both give the same network:

    from flipray.tracking import load_pretrained
    model, cfg = load_pretrained("models:/flipray-pretext/latest")      # or /3, @alias, or a checkpoint.pt path
    net = mlflow.pytorch.load_model("models:/flipray-pretext/latest")   # unpickles: trusted stores only
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from flipray.optional import require
from flipray.overrides import UsageError

log = logging.getLogger(__name__)

PRETEXT_MODEL = "flipray-pretext"
DEFAULT_STORE = Path(".flipray/local")  # = cluster.local.DEFAULT_STATE_DIR: mlflow.db + mlartifacts/


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


class StoreError(UsageError):
    """A tracking URI that is not an MLflow store flipray may use: a server that does not answer, a file that is not
    an MLflow database (a command says so in one line, exit 2, before it starts any work)."""


SERVER_TIMEOUT_S = 5.0
SQLITE_HEADER = b"SQLite format 3\x00"


def check_store(uri: str, create: bool = False) -> None:
    """StoreError unless `uri` is an MLflow store: an http(s) server answering /health within SERVER_TIMEOUT_S, or a
    sqlite file that holds MLflow's tables (with `create`, also a path where nothing is yet). Never writes: MLflow
    would turn any file it is pointed at, an empty one included, into its database."""
    if uri.startswith(("http://", "https://")):
        import urllib.request
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_S) as r:
                r.read(64)
        except OSError as e:
            raise StoreError(f"no MLflow server answers at {uri} (tried GET {url}, {SERVER_TIMEOUT_S:g}-s time-out: "
                             f"{getattr(e, 'reason', e)})") from None
        _quick_requests()
        return
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if not path.exists():
        if create:
            return
        raise StoreError(f"no MLflow store at {path}")
    if not path.is_file():
        raise StoreError(f"{path} is not a file, so not an MLflow sqlite store")
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise StoreError(f"{path} is {'an empty file' if not header else 'not a SQLite database'}, not an MLflow "
                         f"store; left as it is (name a new path, or an existing MLflow database)")
    import sqlite3
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a readable SQLite database ({e})") from None
    if "experiments" not in tables:
        raise StoreError(f"{path} is a SQLite database without MLflow's tables, not an MLflow store; left as it is")


def _quick_requests() -> None:
    """One MLflow request gives up after a few retries (MLflow's default backs off for minutes), so a server that
    does not answer is noticed, and waited out by the caller (MetricLog, PatientClient), which says so."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def server_away(e: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server did not answer (no connection, a time-out, a 5xx),
    not because of what was asked (a 4xx: a bad value, a missing run), which no retry mends."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    http = require("requests").exceptions
    if isinstance(e, http.HTTPError):  # an artifact upload's answer
        return e.response is None or e.response.status_code >= 500
    if isinstance(e, http.RequestException):  # no connection, a time-out (not a missing local file: an OSError too)
        return True
    exceptions = require("mlflow.exceptions")
    return isinstance(e, exceptions.MlflowException) and e.get_http_status_code() >= 500


class PatientClient:
    """An MlflowClient that waits out a tracking server that does not answer (a pod restart, a network cut): a call
    that fails for that reason is retried (2 s, doubling to 30 s) for up to `wait_s`, with one warning line when the
    server stops answering and one when it answers again; after `wait_s` the call raises what MLflow raised. Calls
    that fail for what they ask raise at once. For code that may wait (a sweep trial, a table job's end); a training
    step never waits (MetricLog):

        client = PatientClient(uri, wait_s=600)
        run_id = client.create_run(experiment_id, run_name="trial").info.run_id
    """

    def __init__(self, uri: str, wait_s: float = 600.0, retry_s: float = 2.0, max_retry_s: float = 30.0):
        _quick_requests()
        self.uri, self.wait_s, self.retry_s, self.max_retry_s = uri, wait_s, retry_s, max_retry_s
        self._client = require("mlflow").MlflowClient(uri)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not a client method (and no recursion before __init__ has set _client)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return self.call(attr, *args, **kwargs)
        return call

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried while the server is away, for up to wait_s."""
        deadline, delay, down_since = time.monotonic() + self.wait_s, self.retry_s, None
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not server_away(e) or time.monotonic() + delay > deadline:
                    if down_since is not None:
                        log.warning("MLflow at %s did not answer within %.0f s", self.uri, self.wait_s)
                    raise
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow at %s is not answering (%s); waiting up to %.0f s for it", self.uri, _why(e),
                                self.wait_s)
                time.sleep(delay)
                delay = min(delay * 2, self.max_retry_s)
                continue
            if down_since is not None:
                log.warning("MLflow at %s answers again after %.0f s", self.uri, time.monotonic() - down_since)
            return result


class MetricLog:
    """The metrics of one MLflow run, sent by a background thread so that training never waits on the tracking
    server (jobs/pretext.py's rank 0):

        metrics = MetricLog(uri, run_id, held=state.get("mlflow_held", ()))
        metrics.log(step, loss=0.69, flip_acc=0.5)
        unsent = metrics.close(wait_s=600)

    While the server does not answer, metrics are held, each with the time it was measured, and sent when it answers
    again: one warning line when it stops, one line when it is back. `held()` goes into every checkpoint, so a worker
    group restarted from it sends what the lost one could not; sending a metric twice is harmless (MLflow drops a
    repeat of the same key, value, time and step)."""

    BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics

    def __init__(self, uri: str, run_id: str, held=(), retry_s: float = 2.0, max_retry_s: float = 30.0,
                 max_held: int = 200_000):
        _quick_requests()  # this class does the retrying, for as long as it takes
        self.uri, self.run_id = uri, run_id
        self.retry_s, self.max_retry_s, self.max_held = retry_s, max_retry_s, max_held
        self._client = require("mlflow").MlflowClient(uri)
        self._metric = require("mlflow.entities").Metric
        self._lock, self._wake = threading.Lock(), threading.Event()
        self._closing, self._given_up = threading.Event(), threading.Event()
        self._pending: deque = deque()  # (seq, key, value, timestamp_ms, step)
        self._seq = self._dropped = self._sent = 0
        for key, value, timestamp, step in held:
            self._hold(key, value, timestamp, step)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._thread.start()
        if self._pending:
            log.info("%d metrics a checkpoint held for MLflow at %s are sent first", len(self._pending), uri)
            self._wake.set()

    def _hold(self, key: str, value: float, timestamp: int, step: int) -> None:
        if len(self._pending) >= self.max_held:  # a long outage: the oldest go first
            self._pending.popleft()
            self._dropped += 1
        self._seq += 1
        self._pending.append((self._seq, str(key), float(value), int(timestamp), int(step)))

    def log(self, step: int, **metrics: float) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                self._hold(key, value, now, step)
        self._wake.set()

    def held(self) -> list[list]:
        """[key, value, timestamp_ms, step] of every metric not sent yet (plain values: checkpoint-safe)."""
        with self._lock:
            return [list(m[1:]) for m in self._pending]

    def _send_all(self) -> None:
        """Send what is pending, oldest first, in batches (counted in _sent). Raises what MLflow raises."""
        while True:
            with self._lock:
                batch = [self._pending[i] for i in range(min(self.BATCH, len(self._pending)))]
            if not batch:
                return
            self._client.log_batch(self.run_id, metrics=[self._metric(*m[1:]) for m in batch])
            with self._lock:  # held ones may have been dropped meanwhile: remove by sequence number
                while self._pending and self._pending[0][0] <= batch[-1][0]:
                    self._pending.popleft()
            self._sent += len(batch)

    def _send_loop(self) -> None:
        down_since, delay, sent_before = None, self.retry_s, 0
        while True:
            if down_since is None:
                self._wake.wait()
            elif self._closing.is_set():  # close() is waiting: retry at the shortest interval
                time.sleep(self.retry_s)
            else:
                self._closing.wait(delay)  # a retry on a timer, cut short by close()
            self._wake.clear()
            try:
                self._send_all()
            except Exception as e:  # noqa: BLE001 - whatever stops the request, training goes on
                if self._given_up.is_set():  # close() has handed back what is held
                    return
                if down_since is None:
                    down_since, sent_before = time.time(), self._sent
                    log.warning("MLflow at %s is not answering (%s); training goes on, its metrics are held and "
                                "sent when the server answers again", self.uri, _why(e))
                delay = min(delay * 2, self.max_retry_s)
                continue
            if down_since is not None:
                log.warning("MLflow at %s answers again after %.0f s: %d held metrics sent", self.uri,
                            time.time() - down_since, self._sent - sent_before)
                down_since, delay = None, self.retry_s
            if self._closing.is_set() and not self._pending:
                return

    def artifact(self, path: str | Path) -> bool:
        """Log a file now; one warning line instead of an error if the server does not take it."""
        try:
            self._client.log_artifact(self.run_id, str(path))
            return True
        except Exception as e:  # noqa: BLE001 - a figure is not worth a run
            log.warning("MLflow at %s did not take %s: %s", self.uri, Path(path).name, _why(e))
            return False

    def close(self, wait_s: float) -> list[list]:
        """Wait up to `wait_s` for everything to be sent; returns what was not (as `held()`), in one line if any."""
        self._closing.set()
        self._wake.set()
        self._thread.join(wait_s)
        self._given_up.set()
        unsent = self.held()
        if unsent or self._dropped:
            log.warning("MLflow at %s did not answer within %.0f s: %d metrics not logged (kept in the checkpoint, "
                        "sent when the run is continued)%s", self.uri, wait_s, len(unsent),
                        f"; {self._dropped} older ones dropped while it was away" if self._dropped else "")
        return unsent


def pretext_model_name(task: str) -> str:
    """Registered name of a pretext model: flipray-pretext for the flip task, flipray-pretext-<task> for baselines."""
    return PRETEXT_MODEL if task == "flip" else f"{PRETEXT_MODEL}-{task}"


# The tag that makes MLflow 3's UI open an experiment as model training (runs, metrics, models), not as a GenAI app
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def init_tracking(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` and make sure the experiment exists, tagged as model training; returns its id.

    Run once by the driver before any worker or trial touches the store: a fresh sqlite store creates its tables
    here, not in several processes at once.
    """
    check_store(uri, create=True)
    mlflow = require("mlflow")
    mlflow.set_tracking_uri(uri)
    found = mlflow.set_experiment(experiment)
    if EXPERIMENT_KIND[0] not in found.tags:  # MLflow 3's UI opens an untagged experiment in its GenAI view
        mlflow.MlflowClient(uri).set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
    return found.experiment_id


def find_run(experiment_id: str, run_name: str):
    """The MLflow run of a flipray run name (so a restored Ray run keeps logging into the same MLflow run)."""
    MlflowClient = require("mlflow").MlflowClient
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`flipray.run_name` = '{run_name}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def register_checkpoint(run_id: str, checkpoint_dir: str | Path, name: str, tags: dict[str, str]) -> int:
    """Register the network of `checkpoint_dir` (checkpoint.pt, config.yaml) as a new version of model `name`, logged
    in MLflow's PyTorch flavor with the checkpoint as extra files; the run also keeps the checkpoint as its `model`
    artifact. Logging ends the run (status FINISHED), as the caller does after registering. Returns the version
    number (`models:/NAME/latest` resolves to the newest)."""
    import numpy as np
    import torch

    from flipray.pretext.train import load_model
    mlflow = require("mlflow")
    mlflow_pytorch = require("mlflow.pytorch")
    MlflowClient, MlflowException = mlflow.MlflowClient, require("mlflow.exceptions").MlflowException
    ModelSignature = require("mlflow.models").ModelSignature
    Schema, TensorSpec = require("mlflow.types").Schema, require("mlflow.types").TensorSpec
    checkpoint_dir = Path(checkpoint_dir)
    client = MlflowClient()
    client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="model")
    network, _ = load_model(checkpoint_dir / "checkpoint.pt")
    # (B, T, 3, H, W) frames and (B, C, mels, frames) log-mel audio in; one flip logit per clip out
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, 3, -1, -1), "video"),
                       TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1), "audio")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), "flip_logit")]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow_pytorch.log_model(
            # "pickle": load_model gives back flipray's class (MLflow 3.17's default, "pt2", exports a traced graph)
            network, name=name, signature=signature, serialization_format="pickle",
            extra_files=[str(checkpoint_dir / "checkpoint.pt"), str(checkpoint_dir / "config.yaml")],
            # flipray (the class) must be importable where it loads; pinning torch avoids MLflow's slow inference
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    try:
        client.create_registered_model(name, description="flipray Spatial Alignment Network (flipray.pretext.models); "
                                                          "mlflow.pytorch.load_model, or flipray.tracking."
                                                          "load_pretrained for the weights_only checkpoint")
    except MlflowException as e:
        if "already exists" not in str(e):
            raise
    version = client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                          tags={k: str(v)[:5000] for k, v in tags.items()})
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return int(version.version)


class NoModelError(UsageError):
    """No trained model where a models:/ URI, run folder or checkpoint path points; the message says what to do.
    (`flipray check` exits 4 on it; the jobs, as on every UsageError, print it as one line and exit 2.)"""


HINT = "Run `make demo` (it trains the demo model and registers it as flipray-pretext), or pass --model PATH"


def _checkpoint_in(folder: str | Path) -> Path:
    """checkpoint.pt of a downloaded model: beside MLmodel's extra_files/ (PyTorch flavor) or at the top (older
    versions, registered as a bare state_dict artifact)."""
    for path in (Path(folder) / "extra_files" / "checkpoint.pt", Path(folder) / "checkpoint.pt"):
        if path.exists():
            return path
    raise NoModelError(f"{folder}: no checkpoint.pt in this model")


def load_pretrained(uri: str, tracking: str | None = None):
    """(SpatialAlignmentNet in eval mode, Config) from `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `models:/NAME/latest`, a run folder, or a checkpoint.pt path: the one model resolution of flipray check, the
    downstream tasks and the jobs. Raises NoModelError (a ValueError) saying where it looked."""
    from flipray.pretext.train import load_model
    if not uri.startswith("models:/"):
        path = Path(uri)
        try:
            return load_model(path / "checkpoint.pt" if path.is_dir() else path)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            hint = ""
            try:  # the MLflow store given as --model (.flipray/local/mlflow.db after make demo)
                check_store(f"sqlite:///{path.resolve()}")
                hint = (f"; it is an MLflow store: pass it as --tracking-uri sqlite:///{path.resolve()} (its newest "
                        f"model) or with --model models:/flipray-pretext/VERSION")
            except StoreError:
                pass
            raise NoModelError(f"cannot load the model {uri}: {e}{hint}") from None
    store = tracking_uri(tracking)
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).exists():
        # MLflow would create an empty store there; say where we looked instead
        raise NoModelError(f"no trained model: no MLflow store at {store[len('sqlite:///'):]}. {HINT} "
                           f"(or set MLFLOW_TRACKING_URI).")
    try:  # a dead server answers in seconds, not minutes; a file that is not MLflow's is left untouched
        check_store(store)
    except StoreError as e:
        raise NoModelError(f"no trained model: {e}. {HINT}.") from None
    mlflow = require("mlflow")
    mlflow.set_tracking_uri(store)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = _download(uri, tmp)
        except Exception as e:  # noqa: BLE001 - MLflow's own exception types for a missing model mean "no model here"
            raise NoModelError(f"no trained model at {uri} in {store}: {_why(e)}. {HINT}.") from None
        return load_model(_checkpoint_in(local))


def resolve_pretext(specs: list[str], needed: set[str], out: Path, tracking_uri: str | None) -> dict[str, str]:
    """{pretext task: local checkpoint.pt} for the pretext tasks the methods need; models:/ URIs are downloaded
    into out/pretext/<task>/ so Ray tasks on any node read a plain file. Missing models are left out."""
    import torch

    from flipray.config import TASKS
    malformed = [s for s in specs if "=" not in s]
    given = dict(s.split("=", 1) for s in specs if "=" in s)
    unknown = sorted(set(given) - set(TASKS)) + malformed
    if unknown:
        raise UsageError(f"--pretext takes {', '.join(f'{t}=URI' for t in TASKS)}, got {unknown}")
    paths = {}
    for task in sorted(needed):
        uri = given.get(task, f"models:/{pretext_model_name(task)}/latest")
        try:
            model, cfg = load_pretrained(uri, tracking_uri)
        except NoModelError as e:
            if task in given:
                raise
            log.warning("no %s pretext model (%s): its methods are left out. Train it with `python -m jobs.pretext "
                        "--set train.task=%s`.", task, e, task)
            continue
        path = out / "pretext" / task / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
        paths[task] = str(path)
        log.info("pretext %s: %s", task, uri)
    return paths


def _why(e: Exception) -> str:
    """The first line of an MLflow error, without its exception class noise."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _download(uri: str, dst: str) -> str:
    """Download a models:/ URI. With a sqlite store whose artifacts were written through an MLflow server
    (mlflow-artifacts:/...), read them from the server's artifacts folder beside the database, so a model trained by
    `make demo` loads after the server is gone."""
    mlflow = require("mlflow")
    MlflowClient = require("mlflow").MlflowClient
    MlflowException = require("mlflow.exceptions").MlflowException
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except MlflowException as e:
        store = mlflow.get_tracking_uri()
        if "mlflow-artifacts" not in str(e) or not store.startswith("sqlite:///"):
            raise
    client = MlflowClient()
    name, _, ref = uri[len("models:/"):].partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif ref in ("", "latest"):
        version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    else:
        version = client.get_model_version(name, ref)
    if version.source.startswith("models:/"):  # a logged model (PyTorch flavor), models:/<model id>
        model_id = getattr(version, "model_id", None) or version.source[len("models:/"):].split("/")[0]
        location = client.get_logged_model(model_id).artifact_location
    else:  # a run artifact (runs:/<run>/model)
        location = f"{client.get_run(version.run_id).info.artifact_uri}/{version.source.split('/', 3)[-1]}"
    rel = location.split("mlflow-artifacts:/", 1)[1].lstrip("/")
    folder = Path(store[len("sqlite:///"):]).parent / "mlartifacts" / rel
    _checkpoint_in(folder)  # FileNotFoundError naming the folder when it is not there
    return str(folder)
