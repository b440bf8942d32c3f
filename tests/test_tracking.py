"""flipray.tracking.load_pretrained: the one model resolution (check, downstream tasks, jobs) and its errors.

    .venv/bin/python -m pytest tests/test_tracking.py -q
"""
from __future__ import annotations

import pytest
import torch

from flipray import check, tracking
from flipray.config import load_config
from flipray.pretext.models import SpatialAlignmentNet


def test_missing_paths_and_stores_say_where_they_looked(tmp_path, monkeypatch):
    with pytest.raises(tracking.NoModelError, match="none.pt"):
        tracking.load_pretrained(str(tmp_path / "none.pt"))
    store = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with pytest.raises(tracking.NoModelError) as e:
        tracking.load_pretrained("models:/flipray-pretext/latest")
    assert str(store) in str(e.value) and "make demo" in str(e.value) and "--model PATH" in str(e.value)
    assert not store.exists()  # looking did not create an empty store
    assert check.NoModelError is tracking.NoModelError  # flipray check reports the same error (exit code 4)


def test_a_run_folder_and_its_checkpoint_load_the_same_weights(tmp_path):
    from flipray.pretext.train import make_optimizer, new_state, save_checkpoint
    cfg = load_config("demo")
    torch.manual_seed(3)
    net = SpatialAlignmentNet(cfg)
    save_checkpoint(tmp_path / "checkpoint.pt", net, make_optimizer(net, cfg), new_state(), cfg)
    for spec in (tmp_path, tmp_path / "checkpoint.pt"):
        model, got = tracking.load_pretrained(str(spec))
        assert got.to_dict() == cfg.to_dict() and not model.training
        for (k, a), b in zip(net.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    # the check tool takes the same folder, and refuses a model of another pretext task
    assert check.load_check_model(str(tmp_path))[1].train.task == "flip"
    rotate = load_config("demo", ["train.task=rotate"])
    (tmp_path / "r").mkdir()
    rnet = SpatialAlignmentNet(rotate)
    save_checkpoint(tmp_path / "r" / "checkpoint.pt", rnet, make_optimizer(rnet, rotate), new_state(), rotate)
    with pytest.raises(tracking.NoModelError, match="'rotate' pretext task"):
        check.load_check_model(str(tmp_path / "r"))


def test_metric_log_keeps_what_a_dead_server_did_not_take_checkpoint_safe(tmp_path, caplog, monkeypatch):
    """Nothing answers: log() returns at once, close() hands back every metric (those carried in from a checkpoint
    first), as plain values a weights_only checkpoint load accepts, and says so in one line."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MetricLog retries; MLflow's own backoff only waits
    from cluster.local import free_port
    from flipray.pretext.train import load_checkpoint, make_optimizer, new_state, save_checkpoint
    uri = f"http://127.0.0.1:{free_port()}"
    metrics = tracking.MetricLog(uri, "run", held=[["loss", 0.7, 1000, 1]], retry_s=0.1)
    metrics.log(2, loss=0.5, flip_acc=0.75)
    unsent = metrics.close(wait_s=0.5)
    assert [(k, v, s) for k, v, _, s in unsent] == [("loss", 0.7, 1), ("loss", 0.5, 2), ("flip_acc", 0.75, 2)]
    assert unsent[0][2] == 1000 and unsent[1][2] > 1000  # the time each was measured, not sent
    warnings = [r.getMessage() for r in caplog.records if "did not answer within" in r.getMessage()]
    assert len(warnings) == 1 and "3 metrics not logged" in warnings[0] and uri in warnings[0]
    cfg = load_config("demo")
    net = SpatialAlignmentNet(cfg)
    state = new_state() | {"mlflow_held": unsent}
    save_checkpoint(tmp_path / "checkpoint.pt", net, make_optimizer(net, cfg), state, cfg)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["mlflow_held"] == unsent


def test_patient_client_waits_out_a_server_that_does_not_answer_and_raises_at_once_on_a_bad_request(caplog,
                                                                                                    monkeypatch):
    """Nothing answers at the port: a call is retried until wait_s, saying so once, then raises MLflow's error; a
    request the server refused for what it asks (a 4xx) is no outage: raised at the first try, nothing said."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.exceptions import MlflowException, RestException

    from cluster.local import free_port
    uri = f"http://127.0.0.1:{free_port()}"
    client = tracking.PatientClient(uri, wait_s=0.4, retry_s=0.05, max_retry_s=0.1)
    tries = []
    with pytest.raises(MlflowException, match="failed with exception"):
        client.call(lambda: tries.append(1) or client._client.get_run("0" * 32))
    assert len(tries) >= 3  # retried while the deadline allowed
    said = [r.getMessage() for r in caplog.records if r.name == "flipray.tracking"]
    assert len([m for m in said if f"MLflow at {uri} is not answering" in m]) == 1
    assert len([m for m in said if f"MLflow at {uri} did not answer within" in m]) == 1
    caplog.clear()
    refused = RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "run 00 not found"})
    assert not tracking.server_away(refused) and tracking.server_away(ConnectionRefusedError())
    assert not tracking.server_away(FileNotFoundError("curves.png"))  # a file to upload that is not there
    tries.clear()

    def bad_request():
        tries.append(1)
        raise refused
    with pytest.raises(RestException, match="not found"):
        client.call(bad_request)
    assert tries == [1] and not caplog.records
    with pytest.raises(MlflowException, match="failed with exception"):  # a client method, called through it
        client.get_experiment_by_name("x")
