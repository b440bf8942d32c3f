"""The local training loop: it learns, checkpoints, resumes exactly, and reports."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from flipray.config import load_config
from flipray.overrides import UsageError
from flipray.pretext.data import ClipDataset, EpochSampler, collate
from flipray.pretext.models import SpatialAlignmentNet
from flipray.pretext.train import (evaluate, evaluate_splits, fit_temperature, load_checkpoint, load_model, lr_at, main,
                                   make_optimizer, train_one_epoch)

FAST = ["data.num_frames=3", "data.eval_windows=1", "data.resize=40", "data.crop=32", "data.n_mels=32",
        "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32",
        "train.batch_size=8", "train.log_every=1"]


def test_lr_schedule_counts_samples():
    cfg = load_config("demo", ["train.lr=0.1", "train.warmup_samples=100", "train.total_samples=1100"])
    assert lr_at(0, cfg) == pytest.approx(0.001)
    assert lr_at(99, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(600, cfg) == pytest.approx(0.05)   # half way through the cosine
    assert lr_at(1100, cfg) == pytest.approx(0.0, abs=1e-12)
    constant = load_config("demo", ["train.schedule=constant", "train.warmup_samples=0"])
    assert lr_at(0, constant) == lr_at(5000, constant) == constant.train.lr


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_temperature_scaling_undoes_over_and_under_confidence(scale):
    """Labels drawn from sigmoid(z); a model that says scale * z is over- (3) or under-confident (0.5) by `scale`."""
    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(20_000, generator=g)
    labels = (torch.rand(20_000, generator=g) < torch.sigmoid(z)).float()
    assert fit_temperature(scale * z, labels) == pytest.approx(scale, rel=0.08)
    assert fit_temperature(torch.zeros(0), torch.zeros(0)) == 1.0


def test_the_temperature_travels_with_the_weights_and_old_checkpoints_load_uncalibrated(tmp_path):
    cfg = load_config("demo", FAST)
    net = SpatialAlignmentNet(cfg)
    assert float(net.temperature) == 1.0 and "temperature" in net.state_dict()
    net.temperature.fill_(2.5)
    state = net.state_dict()
    again = SpatialAlignmentNet(cfg)
    again.load_state_dict(state)
    assert float(again.temperature) == 2.5
    legacy = {k: v for k, v in state.items() if k != "temperature"}  # saved before calibration existed
    again.load_state_dict(legacy)
    assert float(again.temperature) == 1.0


@pytest.mark.slow
def test_a_short_run_lowers_the_loss(synth_root):
    """Fit a fixed set of 4 clip windows: the loss must fall well below chance (0.693) within a few passes."""
    torch.manual_seed(0)
    cfg = load_config("demo", FAST + [f"data.root={synth_root}", "data.cache=true", "train.lr=0.003"])
    ds = ClipDataset(cfg, "train", train=True)
    ds.clips, ds.cache = ds.clips[:4], ds.cache[:4]
    model = SpatialAlignmentNet(cfg)
    opt = make_optimizer(model, cfg)
    state = {"samples_seen": 0, "step": 0, "epoch_pos": 0}
    fixed = lambda: DataLoader(ds, batch_size=4, sampler=EpochSampler(4, 0, epoch=0), collate_fn=collate)
    before = evaluate(model, fixed(), "cpu")["loss"]
    losses = [train_one_epoch(model, fixed(), opt, cfg, "cpu", state)["loss"] for _ in range(40)]
    after = evaluate(model, fixed(), "cpu")["loss"]
    assert state["samples_seen"] == 160 and state["step"] == 40
    assert min(losses[-5:]) < 0.35 < losses[0], losses
    assert after < before - 0.2, (before, after)


@pytest.mark.slow
def test_train_checkpoint_resume_is_exact_and_reports(synth_root, tmp_path, capsys):
    common = FAST + ["train.batch_size=4", f"data.root={synth_root}", f"train.out_dir={tmp_path}", "data.cache=true",
                     "train.checkpoint_every_samples=8", "train.eval_every_samples=16"]
    # One uninterrupted run of 32 samples ...
    full = main(["--config", "demo", "--run-name", "full", "--set", "train.total_samples=32", *sum(
        (["--set", s] for s in common), [])])
    # ... against 16 samples, then resumed to 32.
    main(["--config", "demo", "--run-name", "split", "--set", "train.total_samples=16",
          *sum((["--set", s] for s in common), [])])
    half = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert half["state"]["samples_seen"] == 16 and half["state"]["step"] == 4
    with pytest.raises(UsageError, match="--resume"):
        main(["--config", "demo", "--run-name", "split", *sum((["--set", s] for s in common), [])])
    stored = (tmp_path / "split" / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match=r"^--resume: the run's network cannot change \(data.n_mels 32 -> 64; "
                                         r"model.audio_width 8 -> 16\)"):  # was: torch's size-mismatch traceback
        main(["--config", "demo", "--run-name", "split", "--resume", "--set", "train.total_samples=32", "--set",
              f"train.out_dir={tmp_path}", "--set", "model.audio_width=16", "--set", "data.n_mels=64"])
    assert (tmp_path / "split" / "checkpoint.pt").read_bytes() == stored
    resumed = main(["--config", "demo", "--run-name", "split", "--resume", "--set", "train.total_samples=32",
                    "--set", f"train.out_dir={tmp_path}"])

    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["state"]["samples_seen"] == b["state"]["samples_seen"] == 32
    assert a["state"]["step"] == b["state"]["step"] == 8
    steps = [h["samples_seen"] for h in b["state"]["history"] if h["kind"] == "train"]
    assert steps == list(range(4, 33, 4))  # continuous: nothing repeated, nothing skipped
    assert (a["state"]["epoch"], a["state"]["epoch_pos"]) == (b["state"]["epoch"], b["state"]["epoch_pos"]) == (1, 8)  # 24 items an epoch:
    # 12 train clips, each window as a pair (train.pair_negatives)
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k
    # the report lands in the run folder with the accuracy per split and the counts
    report = json.loads((tmp_path / "split" / "report.json").read_text())
    assert report == resumed
    assert set(report["flip_accuracy"]) == {"val", "test"}
    # ... and it is the final model's: scoring the splits again with the saved weights gives the same fractions
    model, cfg = load_model(tmp_path / "split" / "checkpoint.pt")
    again = evaluate_splits(model, cfg, "cpu")
    for split in ("val", "test"):
        r = report["flip_accuracy"][split]
        assert r["acc"] == again[split]["acc"] and r["samples"] == again[split]["samples"] == 2 * len(ClipDataset(
            load_config("demo", [f"data.root={synth_root}"]), split, train=False).clips)
    assert report["samples_seen"] == 32 and report["wall_seconds"] > 0
    assert (tmp_path / "split" / "curves.png").stat().st_size > 10_000
    assert full["flip_accuracy"]["test"]["acc"] == pytest.approx(report["flip_accuracy"]["test"]["acc"])
    assert "report: " in capsys.readouterr().out
    model, cfg = load_model(tmp_path / "split" / "checkpoint.pt")
    assert cfg.data.crop == 32 and not model.training
    # calibrated on the validation split after training: the checkpoint's model carries the fitted temperature
    cal = report["calibration"]
    assert cal["samples"] == report["flip_accuracy"]["val"]["samples"] and cal["nll_after"] <= cal["nll_before"]
    assert float(model.temperature) == pytest.approx(cal["temperature"], rel=1e-3)


def test_a_second_run_into_a_run_folder_in_use_is_refused_before_it_writes(synth_root, tmp_path, capsys):
    """`flipray train-pretext --run-name R` (or `--resume`) while another process trains into runs/R: one line naming
    the folder and its pid, exit 2, nothing in the folder touched (before, both trained and overwrote each other's
    checkpoints). Once that process is gone, so is its lock."""
    import subprocess
    import sys
    import textwrap

    from flipray import cli
    from flipray.atomic import folder_lock
    from flipray.pretext.train import RUN_LOCK
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from flipray.atomic import folder_lock
        with folder_lock(sys.argv[1], sys.argv[2], busy=print):
            print("held", flush=True)
            sys.stdin.readline()
    """), str(run_dir), RUN_LOCK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        argv = ["train-pretext", "--run-name", "r", "--set", f"train.out_dir={tmp_path}", "--set",
                f"data.root={synth_root}", *sum((["--set", s] for s in FAST), []), "--set", "train.total_samples=8"]
        for extra in ([], ["--resume"]):  # a run that has not checkpointed yet, then one that has
            with pytest.raises(SystemExit) as exited:
                cli.main(argv + extra)
            assert exited.value.code == 2
            assert capsys.readouterr().err == (f"flipray train-pretext: {run_dir}: another training run is writing "
                                               f"into this folder (pid {holder.pid}); give another --run-name, or "
                                               f"pass --resume once it has stopped\n")
            assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock"] + ["checkpoint.pt"] * bool(extra)
            (run_dir / "checkpoint.pt").write_bytes(b"the running process's checkpoint")
        assert (run_dir / "checkpoint.pt").read_bytes() == b"the running process's checkpoint"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)

    def still_held(pid):
        raise AssertionError(f"{run_dir}: still locked by pid {pid}")
    with folder_lock(run_dir, RUN_LOCK, busy=still_held):  # the holder gone, so is its lock
        pass
