"""MLflow for flipray jobs: where the tracking store is, the registered pretext model, and loading it back.

The tracking URI comes from `--tracking-uri`, else MLFLOW_TRACKING_URI, else the local services' sqlite
store `.flipray/local/mlflow.db` (the one `make demo` and `python -m cluster.local up --mlflow` use). Models are
registered as a state_dict artifact (`checkpoint.pt` + `config.yaml`), not a pickled class, so they load back as
flipray's own SpatialAlignmentNet with `torch.load(..., weights_only=True)`:

    from flipray.tracking import load_pretrained
    model, cfg = load_pretrained("models:/flipray-pretext/latest")      # or /3, @alias, or a checkpoint.pt path
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from flipray.optional import require

log = logging.getLogger(__name__)

PRETEXT_MODEL = "flipray-pretext"
DEFAULT_STORE = Path(".flipray/local")  # = cluster.local.DEFAULT_STATE_DIR: mlflow.db + mlartifacts/


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def pretext_model_name(task: str) -> str:
    """Registered name of a pretext model: flipray-pretext for the flip task, flipray-pretext-<task> for baselines."""
    return PRETEXT_MODEL if task == "flip" else f"{PRETEXT_MODEL}-{task}"


def init_tracking(uri: str, experiment: str) -> str:
    """Point MLflow at `uri` and make sure the experiment exists; returns its id.

    Run once by the driver before any worker or trial touches the store: a fresh sqlite store creates its tables
    here, not in several processes at once.
    """
    mlflow = require("mlflow")
    mlflow.set_tracking_uri(uri)
    return mlflow.set_experiment(experiment).experiment_id


def find_run(experiment_id: str, run_name: str):
    """The MLflow run of a flipray run name (so a restored Ray run keeps logging into the same MLflow run)."""
    MlflowClient = require("mlflow").MlflowClient
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`flipray.run_name` = '{run_name}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def register_checkpoint(run_id: str, checkpoint_dir: str | Path, name: str, tags: dict[str, str]) -> int:
    """Log `checkpoint_dir` (checkpoint.pt, config.yaml) as the run's `model` artifact and register it as a new
    version of model `name`; returns the version number (`models:/NAME/latest` resolves to the newest)."""
    MlflowClient = require("mlflow").MlflowClient
    MlflowException = require("mlflow.exceptions").MlflowException
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


class NoModelError(ValueError):
    """No trained model where a models:/ URI, run folder or checkpoint path points; the message says what to do."""


HINT = "Run `make demo` (it trains the demo model and registers it as flipray-pretext), or pass --model PATH"


def load_pretrained(uri: str, tracking: str | None = None):
    """(SpatialAlignmentNet in eval mode, Config) from `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `models:/NAME/latest`, a run folder, or a checkpoint.pt path: the one model resolution of flipray check, the
    downstream tasks and the jobs. Raises NoModelError (a ValueError) saying where it looked."""
    from flipray.pretext.train import load_model
    if not uri.startswith("models:/"):
        path = Path(uri)
        try:
            return load_model(path / "checkpoint.pt" if path.is_dir() else path)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise NoModelError(f"cannot load the model {uri}: {e}") from None
    store = tracking_uri(tracking)
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).exists():
        # MLflow would create an empty store there; say where we looked instead
        raise NoModelError(f"no trained model: no MLflow store at {store[len('sqlite:///'):]}. {HINT} "
                           f"(or set MLFLOW_TRACKING_URI).")
    mlflow = require("mlflow")
    mlflow.set_tracking_uri(store)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = _download(uri, tmp)
        except Exception as e:  # noqa: BLE001 - MLflow's own exception types for a missing model mean "no model here"
            raise NoModelError(f"no trained model at {uri} in {store}: {_why(e)}. {HINT}.") from None
        return load_model(Path(local) / "checkpoint.pt")


def resolve_pretext(specs: list[str], needed: set[str], out: Path, tracking_uri: str | None) -> dict[str, str]:
    """{pretext task: local checkpoint.pt} for the pretext tasks the methods need; models:/ URIs are downloaded
    into out/pretext/<task>/ so Ray tasks on any node read a plain file. Missing models are left out."""
    import torch

    from flipray.config import TASKS
    given = dict(s.split("=", 1) for s in specs)
    unknown = set(given) - set(TASKS)
    if unknown:
        raise ValueError(f"--pretext takes {', '.join(f'{t}=URI' for t in TASKS)}, got {sorted(unknown)}")
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
    run = client.get_run(version.run_id)
    rel = run.info.artifact_uri.split("mlflow-artifacts:/", 1)[1].lstrip("/")
    folder = Path(store[len("sqlite:///"):]).parent / "mlartifacts" / rel / version.source.split("/", 3)[-1]
    if not (folder / "checkpoint.pt").exists():
        raise FileNotFoundError(f"{uri}: artifacts expected in {folder}, not there")
    return str(folder)
