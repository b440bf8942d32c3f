import pytest

from flipray.config import config_from_dict, load_config


def test_presets_have_the_papers_window():
    cfg = load_config("paper")
    assert cfg.window_samples == 45_920            # 2.87 s at 16 kHz
    assert cfg.mel_frames == 288                   # hop 160, centre=True
    assert cfg.window_frames == 18                 # 6 Hz
    assert (cfg.data.num_frames, cfg.data.crop, cfg.data.n_mels) == (18, 224, 128)
    assert (cfg.train.lr, cfg.train.momentum) == (0.01, 0.9)
    demo = load_config("demo")
    assert demo.data.crop < cfg.data.crop and demo.train.total_samples < cfg.train.total_samples


def test_overrides_are_typed_and_checked(tmp_path):
    cfg = load_config("demo", ["train.lr=0.02", "data.cache=false", "model.variant=pooled-visual",
                               "train.total_samples=100"])
    assert cfg.train.lr == 0.02 and cfg.data.cache is False and cfg.model.variant == "pooled-visual"
    assert isinstance(cfg.train.total_samples, int)
    with pytest.raises(ValueError, match="unknown key train.lrr; did you mean train.lr?"):
        load_config("demo", ["train.lrr=1"])
    with pytest.raises(ValueError, match="train.lr must be a number"):
        load_config("demo", ["train.lr=fast"])
    with pytest.raises(ValueError, match="model.variant must be one of"):
        load_config("demo", ["model.variant=transformer"])
    with pytest.raises(ValueError, match="n_mels must be divisible by 16"):
        load_config("demo", ["data.n_mels=70"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("huge")


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: small\ntrain:\n  lr: 0.005\ndata:\n  root: s3://bucket/ds/\n")
    cfg = load_config(str(path), ["train.seed=3"])
    assert cfg.preset == "small" and cfg.train.lr == 0.005 and cfg.data.root == "s3://bucket/ds/"
    assert cfg.train.seed == 3 and cfg.data.crop == 112  # the rest comes from the preset
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.flat()["train.lr"] == 0.005
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: train is a section: give a mapping"):
        load_config(str(bad))


def test_an_elastic_run_refuses_a_batch_one_of_its_sizes_cannot_split():
    """min_workers..workers = 1..2 with a batch of 3: two workers cannot share it, so the run is refused up front
    (it could shrink or grow to that size mid-run); the same batch on a fixed-size or local run is not refused here."""
    with pytest.raises(ValueError, match=r"train.batch_size 3 must split evenly .* 2 workers do not"):
        load_config("demo", ["train.batch_size=3", "train.pair_negatives=false", "cluster.workers=2",
                             "cluster.min_workers=1"])
    assert load_config("demo", ["train.batch_size=4", "cluster.workers=2", "cluster.min_workers=1"]).train.batch_size == 4
    assert load_config("demo", ["train.batch_size=3", "train.pair_negatives=false", "cluster.workers=2"]
                       ).train.batch_size == 3  # fixed size: not here


def test_worker_start_timeout_reaches_ray_train_and_must_be_positive():
    """cluster.worker_start_timeout_s becomes Ray Train's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (the drills in
    tests/test_multinode.py see it in the controller's log); 0 would make every worker group start fail."""
    from jobs.pretext import ray_train_env
    cfg = load_config("demo", ["cluster.worker_start_timeout_s=25"])
    assert ray_train_env(cfg.cluster) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25.0"}
    assert ray_train_env(load_config("demo").cluster)["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "60.0"
    with pytest.raises(ValueError, match="cluster.worker_start_timeout_s must be > 0, got 0"):
        load_config("demo", ["cluster.worker_start_timeout_s=0"])
