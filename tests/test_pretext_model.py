"""The registered pretext model on MLflow (sqlite store): a standard PyTorch-flavor model that
`mlflow.pytorch.load_model("models:/flipray-pretext/latest")` returns as a working network, equal to the one
`flipray check` loads (from the weights_only checkpoint the model carries).

    .venv/bin/python -m pytest tests/test_pretext_model.py -x -q
"""
from __future__ import annotations

import pytest
import torch
import yaml

FAST = ["data.num_frames=3", "data.eval_windows=1", "data.resize=40", "data.crop=32", "data.n_mels=32",
        "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32", "train.log_every=1"]


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    """A tiny pretext model trained for 16 samples on the shared synthetic set: its run folder."""
    from flipray.pretext import train
    out = tmp_path_factory.mktemp("tiny")
    sets = FAST + [f"data.root={synth_root}", "train.batch_size=4", "train.total_samples=16",
                   "train.eval_every_samples=16", f"train.out_dir={out}", "train.device=cpu"]
    train.main(["--config", "demo", "--run-name", "tiny", *sum((["--set", s] for s in sets), [])])
    return out / "tiny"


def test_registered_model_loads_with_mlflow_pytorch_and_equals_the_check_model(tiny_model, tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient

    from flipray import tracking
    from flipray.check import load_check_model
    from flipray.pretext.data import ClipDataset
    from flipray.pretext.models import SpatialAlignmentNet

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    experiment_id = tracking.init_tracking(uri, "flipray-pretext")
    run_id = MlflowClient(uri).create_run(experiment_id, run_name="tiny").info.run_id
    version = tracking.register_checkpoint(run_id, tiny_model, tracking.PRETEXT_MODEL, {"task": "flip"})
    assert version == 1

    client = MlflowClient(uri)
    # tagged so that MLflow 3's UI opens it as model training, not as a GenAI app; a kind set by hand is kept
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")
    assert tracking.init_tracking(uri, "flipray-pretext") == experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "genai_development"
    mv = client.get_model_version(tracking.PRETEXT_MODEL, "1")
    assert mv.run_id == run_id and mv.tags["task"] == "flip" and mv.source.startswith("models:/")
    # the run keeps the state_dict checkpoint as its `model` artifact (downstream code and older readers use it)
    assert {"model/checkpoint.pt", "model/config.yaml"} <= {a.path for a in client.list_artifacts(run_id, "model")}
    info = mlflow.models.get_model_info("models:/flipray-pretext/latest")
    assert "pytorch" in info.flavors
    assert [s.name for s in info.signature.inputs.inputs] == ["video", "audio"]

    net = mlflow.pytorch.load_model("models:/flipray-pretext/latest")
    check_net, cfg = load_check_model("models:/flipray-pretext/latest")  # weights_only checkpoint, MLflow store
    assert type(net) is SpatialAlignmentNet and not net.training and net is not check_net

    # a test clip, as the data pipeline makes it
    sample = next(s for s in ClipDataset(cfg, "test", train=False) if s is not None)
    video, audio = sample["video"][None].float(), sample["audio"][None].float()
    with torch.no_grad():
        out, expected = net(video, audio), check_net(video, audio)
        untrained = SpatialAlignmentNet(cfg).eval()(video, audio)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, untrained)  # the trained weights, not a fresh network
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, check_net.state_dict()[name]), name
    assert yaml.safe_load((tiny_model / "config.yaml").read_text())["data"]["crop"] == cfg.data.crop == 32


@pytest.mark.slow  # starts an MLflow server
def test_the_demo_store_serves_the_model_with_its_server_and_without(tiny_model, tmp_path, monkeypatch):
    """`make demo`'s layout: an MLflow server proxying artifacts into a folder beside its sqlite store. While it runs,
    mlflow.pytorch.load_model works through it; after it stops, flipray still loads the checkpoint from the folder."""
    import mlflow.pytorch
    from mlflow import MlflowClient

    from cluster import local
    from flipray import tracking

    state = tmp_path / "local"
    service = local.start_mlflow(state)  # free port, 127.0.0.1, its own process group
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", service.url)
        experiment_id = tracking.init_tracking(service.url, "flipray-pretext")
        run_id = MlflowClient(service.url).create_run(experiment_id, run_name="demo").info.run_id
        assert tracking.register_checkpoint(run_id, tiny_model, tracking.PRETEXT_MODEL, {}) == 1
        net = mlflow.pytorch.load_model("models:/flipray-pretext/latest")
    finally:
        local.stop(service)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    model, _ = tracking.load_pretrained("models:/flipray-pretext/latest", f"sqlite:///{state / 'mlflow.db'}")
    weights = net.state_dict()
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
