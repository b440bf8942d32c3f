"""MLflow for flipray jobs: where the tracking store is, the registered pretext model, and loading it back.

The tracking URI comes from `--tracking-uri`, else MLFLOW_TRACKING_URI, else the local services' sqlite
store `.flipray/local/mlflow.db` (the one `make demo` and `python -m cluster.local up --mlflow` use). Models are
registered as a state_dict artifact (`checkpoint.pt` + `config.yaml`), not a pickled class, so they load back as
flipray's own SpatialAlignmentNet with `torch.load(..., weights_only=True)`:

    from flipray.tracking import load_pretrained
    model, cfg = load_pretrained("models:/flipray-pretext/latest")      # or /3, @alias, or a checkpoint.pt path
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PRETEXT_MODEL = "flipray-pretext"
DEFAULT_STORE = Path(".flipray/local")  # = cluster.local.DEFAULT_STATE_DIR: mlflow.db + mlartifacts/


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


class StoreError(ValueError):
    """A tracking URI that is not an MLflow store flipray may use: a server that does not answer, a file that is not
    an MLflow database."""


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
        # later calls fail after a few retries rather than MLflow's default of minutes of backoff
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
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


def pretext_model_name(task: str) -> str:
    """Registered name of a pretext model: flipray-pretext for the flip task, flipray-pretext-<task> for baselines."""
    return PRETEXT_MODEL if task == "flip" else f"{PRETEXT_MODEL}-{task}"


def init_tracking(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` and make sure the experiment exists; returns its id.

    Run once by the driver before any worker or trial touches the store: a fresh sqlite store creates its tables
    here, not in several processes at once.
    """
    check_store(uri, create=True)
    import mlflow
    mlflow.set_tracking_uri(uri)
    return mlflow.set_experiment(experiment).experiment_id


def find_run(experiment_id: str, run_name: str):
    """The MLflow run of a flipray run name (so a restored Ray run keeps logging into the same MLflow run)."""
    from mlflow import MlflowClient
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`flipray.run_name` = '{run_name}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def register_checkpoint(run_id: str, checkpoint_dir: str | Path, name: str, tags: dict[str, str]) -> int:
    """Log `checkpoint_dir` (checkpoint.pt, config.yaml) as the run's `model` artifact and register it as a new
    version of model `name`; returns the version number (`models:/NAME/latest` resolves to the newest)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client = MlflowClient()
    client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="model")
    try:
        client.create_registered_model(name, description="flipray Spatial Alignment Network (flipray.pretext.models); "
                                                          "load with flipray.tracking.load_pretrained")
    except MlflowException as e:
        if "already exists" not in str(e):
            raise
    # create_model_version, not mlflow.register_model: MLflow 3 only registers runs:/ URIs of logged models, and
    # this is a plain state_dict artifact.
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                          tags={k: str(v)[:5000] for k, v in tags.items()})
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return int(version.version)


def load_pretrained(uri: str, tracking: str | None = None):
    """(SpatialAlignmentNet in eval mode, Config) from `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `models:/NAME/latest`, a run folder, or a checkpoint.pt path."""
    from flipray.pretext.train import load_model
    if not uri.startswith("models:/"):
        path = Path(uri)
        return load_model(path / "checkpoint.pt" if path.is_dir() else path)
    check_store(tracking_uri(tracking))
    import mlflow
    mlflow.set_tracking_uri(tracking_uri(tracking))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = _download(uri, tmp)
        except Exception as e:
            raise ValueError(f"cannot load {uri} from {mlflow.get_tracking_uri()}: {e}. Train and register one "
                             f"with `make demo` or `python -m jobs.pretext`.") from None
        return load_model(Path(local) / "checkpoint.pt")


def _download(uri: str, dst: str) -> str:
    """Download a models:/ URI. With a sqlite store whose artifacts were written through an MLflow server
    (mlflow-artifacts:/...), read them from the server's artifacts folder beside the database, so a model trained by
    `make demo` loads after the server is gone."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
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
    run = client.get_run(version.run_id)
    rel = run.info.artifact_uri.split("mlflow-artifacts:/", 1)[1].lstrip("/")
    folder = Path(store[len("sqlite:///"):]).parent / "mlartifacts" / rel / version.source.split("/", 3)[-1]
    if not (folder / "checkpoint.pt").exists():
        raise FileNotFoundError(f"{uri}: artifacts expected in {folder}, not there")
    return str(folder)
