"""flipray.overrides: one `--set a.b=value` / YAML mechanism, one set of type rules and one error format for the
pretext config, the downstream task configs and the synthesis configs.

    .venv/bin/python -m pytest tests/test_overrides.py -q
"""
from __future__ import annotations

import pytest

from flipray import overrides
from flipray.config import load_config
from flipray.synth import scenes
from flipray.synth.scenes import SynthConfig
from flipray.tasks.localize import Config as LocalizeConfig


def test_type_rules():
    cfg = load_config("demo")
    overrides.apply(cfg, ["train.total_samples=7e6", "train.lr=3", "data.cache=false", "data.root=123",
                          "data.rotations_deg=[90, 270]"])
    assert cfg.train.total_samples == 7_000_000 and type(cfg.train.total_samples) is int
    assert cfg.train.lr == 3.0 and type(cfg.train.lr) is float
    assert cfg.data.cache is False and cfg.data.root == "123"  # a string field keeps the text as it is
    assert cfg.data.rotations_deg == [90, 270]
    for item, message in [("train.total_samples=2.5", "train.total_samples must be an integer, got 2.5"),
                          ("train.lr=fast", "train.lr must be a number, got 'fast'"),
                          ("data.cache=1", "data.cache must be true or false, got 1"),
                          ("data.rotations_deg=90", "data.rotations_deg must be a list, got 90"),
                          ("train.lr", "override 'train.lr' must look like key=value")]:
        with pytest.raises(ValueError, match=message):
            overrides.apply(cfg, [item])
    with pytest.raises(ValueError, match="data.root must be a string, got 5"):
        overrides.apply(cfg, {"data": {"root": 5}})  # from YAML, a number is not a path
    synth = SynthConfig()
    overrides.apply(synth, {"rt60_s": [0.2, 0.4]})
    assert synth.rt60_s == (0.2, 0.4)
    with pytest.raises(ValueError, match=r"rt60_s must be a list of 2 values, got \[0.2\]"):
        overrides.apply(synth, {"rt60_s": [0.2]})


@pytest.mark.parametrize("cfg,key,closest", [
    (load_config("demo"), "model.audio_widht", "model.audio_width"),
    (load_config("demo"), "trian.lr", "train.lr"),
    (LocalizeConfig(), "lrr", "lr"),
    (SynthConfig(), "rt60", "rt60_s"),
])
def test_unknown_keys_name_the_closest(cfg, key, closest):
    with pytest.raises(ValueError, match=f"^unknown key {key}; did you mean {closest}\\?$"):
        overrides.apply(cfg, [f"{key}=1"])
    with pytest.raises(ValueError, match="unknown key zzzz; keys are"):
        overrides.apply(cfg, ["zzzz=1"])


def test_every_config_reads_yaml_files_the_same_way(tmp_path):
    f = tmp_path / "over.yaml"
    f.write_text("lr: 3.0e-4\nepochs: 2\n")
    cfg = overrides.apply(LocalizeConfig(), overrides.read_yaml(f))
    assert (cfg.lr, cfg.epochs) == (3e-4, 2)
    run = tmp_path / "run.yaml"
    run.write_text("preset: demo\nmodel:\n  audio_widht: 8\n")
    with pytest.raises(ValueError, match="run.yaml: unknown key model.audio_widht; did you mean model.audio_width"):
        load_config(str(run))


def test_synth_command_line_takes_set_and_config_files(tmp_path, capsys):
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--fps", type=int, default=6)
    overrides.add_arguments(p)
    f = tmp_path / "s.yaml"
    f.write_text("fps: 30\nreverb_prob: 0.0\n")
    args = p.parse_args(["--config-file", str(f), "--set", "size=128", "--set", "snr_db=[20, 30]"])
    cfg = overrides.config_from_args(SynthConfig, args, p, {"fps": "fps"})
    assert (cfg.fps, cfg.reverb_prob, cfg.size, cfg.snr_db) == (30, 0.0, 128, (20.0, 30.0))
    # the generator's own checks still run, and the command says what is wrong in one line
    with pytest.raises(SystemExit) as e:
        scenes.main(["--out", str(tmp_path / "x"), "--clips", "1", "--seed", "0", "--set", "size=63"])
    assert e.value.code == 2 and "size must be an even number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scenes.main(["--out", str(tmp_path / "x"), "--clips", "1", "--seed", "0", "--set", "reverb=0"])
    assert "unknown key reverb; did you mean reverb_prob?" in capsys.readouterr().err


def test_commands_say_what_is_wrong_in_one_line_and_exit_2(synth_root, tmp_path, capsys, monkeypatch):
    """A bad --set, preset, config file, data root or --resume: `PROG: what is wrong` on stderr, exit 2, nothing
    written (before: a traceback and exit 1)."""
    import collections
    import json

    from flipray import cli
    monkeypatch.chdir(tmp_path)  # train.out_dir is runs/, relative
    no_test = tmp_path / "no-test"
    no_test.mkdir()
    rows = [json.loads(line) for line in (synth_root / "manifest.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["split"] != "test"]
    (no_test / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [audio_width: 8\n")
    cases = [(["--set", "data.crop=abc"], "data.crop must be an integer, got 'abc'"),
             (["--set", "data.crop=[1"], "data.crop must be an integer, got '[1'"),  # not YAML at all
             (["--set", "model.front_end=foo"], "model.front_end must be one of ("),
             (["--config", "nosuch"], "unknown preset 'nosuch'; presets are demo, small, paper"),
             (["--config", str(broken)], f"{broken}: not valid YAML ("),
             (["--config", "absent.yaml"], "config file absent.yaml does not exist"),
             (["--set", f"data.root={tmp_path / 'absent'}"], f"data.root: {tmp_path / 'absent' / 'manifest.jsonl'}: "
                                                             "no manifest"),
             (["--set", f"data.root={no_test}"], f"data.root: {no_test} has no clips in split 'test' "
                                                 f"({dict(collections.Counter(r['split'] for r in kept))}); training "
                                                 f"needs clips in train, val and test"),
             (["--set", f"data.root={synth_root}", "--resume", "--run-name", "r"],
              "--resume: runs/r holds no checkpoint.pt to continue")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            cli.main(["train-pretext", *argv])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith(f"flipray train-pretext: {message}"), (argv, err)
        assert err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    # any other error keeps its traceback: user_errors turns only UsageError into a line
    with pytest.raises(KeyError):
        with overrides.user_errors("prog"):
            raise KeyError("a bug")


@pytest.mark.slow  # a subprocess that imports Ray, MLflow and torch
def test_jobs_refuse_a_wrong_data_root_before_starting_anything(tmp_path):
    """`python -m jobs.pretext` with a data.root that holds no dataset: one line, exit 2, before the MLflow store or
    Ray is touched; the downstream jobs the same for --data and an unknown method."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flipray.tasks import localize
    from jobs import downstream
    repo = Path(__file__).resolve().parents[1]
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "jobs.pretext", "--tracking-uri", f"sqlite:///{db}",
                           "--set", f"data.root={tmp_path / 'absent'}"], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"python -m jobs.pretext: data.root: {tmp_path / 'absent' / 'manifest.jsonl'}"
                                        ": no manifest; a dataset is complete only once `flipray ingest` (or `flipray "
                                        "synth`) has written it last"]
    assert not db.exists()
    with pytest.raises(overrides.UsageError, match=f"^--data: {tmp_path / 'absent'}"):
        downstream.main(["--task", "localize", "--data", str(tmp_path / "absent"), "--local", "--no-mlflow"])
    with pytest.raises(overrides.UsageError, match=r"unknown method\(s\) \['nope'\] for localize"):
        downstream.method_configs(localize, downstream.parse_args(localize, ["--data", "d", "--methods", "nope"]),
                                  {"flip": "x.pt"})


def test_a_pretext_that_is_no_model_is_one_line_for_the_jobs(tmp_path, capsys):
    """--pretext with no `=`, an unknown task, or a file that is no checkpoint: a UsageError, which the jobs and the
    sweep print as one line with exit 2 (NoModelError is one; `flipray check` exits 4 on it instead)."""
    from flipray.tracking import NoModelError, resolve_pretext
    junk = tmp_path / "junk.pt"
    junk.write_text("junk\n")
    with pytest.raises(overrides.UsageError, match=r"--pretext takes flip=URI, .* got \['flip2', 'bogus'\]$"):
        resolve_pretext(["bogus", "flip2=x"], {"flip"}, tmp_path, None)
    with pytest.raises(NoModelError, match=f"cannot load the model {junk}: .*not a flipray checkpoint"):
        resolve_pretext([f"flip={junk}"], {"flip"}, tmp_path, None)
    with pytest.raises(SystemExit) as exited:
        with overrides.user_errors("python -m jobs.localize"):
            resolve_pretext([f"flip={junk}"], {"flip"}, tmp_path, None)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"python -m jobs.localize: cannot load the model {junk}")
    assert err.count("\n") == 1


def test_a_table_job_on_data_without_its_splits_says_so_before_training(synth_root, tmp_path, monkeypatch):
    """A downstream table on a dataset with no clips in the split it scores (one ingested video: all train) stops
    with one line naming the split, before any method trains (was: a traceback from each method's task)."""
    import json

    import torch

    from flipray.pretext.models import SpatialAlignmentNet
    from jobs import downstream
    monkeypatch.chdir(tmp_path)  # the default MLflow store (.flipray/local) is not there: no model is found
    pcfg = load_config("demo")
    torch.save({"model": SpatialAlignmentNet(pcfg).state_dict(), "config": pcfg.to_dict()}, tmp_path / "flip.pt")
    root = tmp_path / "train-only"
    root.mkdir()
    rows = [json.loads(line) for line in (synth_root / "manifest.jsonl").read_text().splitlines()]
    (root / "manifest.jsonl").write_text("".join(json.dumps({**r, "split": "train"}) + "\n" for r in rows))
    with pytest.raises(overrides.UsageError, match=f"^--data: {root} has no clips in split 'test' \\({{'train': "
                                                   f"{len(rows)}}}\\); the localize table trains on 'train' and "
                                                   f"scores 'test'$"):
        downstream.main(["--task", "localize", "--data", str(root), "--methods", "flip", "--local", "--no-mlflow",
                         "--pretext", f"flip={tmp_path / 'flip.pt'}", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "localize" / "flip").exists()
    from tuning import sweep  # the sweep the same, before its MLflow store or Ray
    with pytest.raises(overrides.UsageError, match=f"^--data: {root} has no clips in split 'val' .*; the sweep "
                                                   f"trains on 'train' and scores 'val'$"):
        sweep.main(["--task", "localize", "--data", str(root), "--pretext", f"flip={tmp_path / 'flip.pt'}",
                    "--storage", str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert not (tmp_path / "mlflow.db").exists()


def test_a_tracking_store_that_cannot_take_the_run_is_one_line_before_any_work(synth_root, tmp_path, capsys):
    """A tracking server that does not answer: the pretext job and a downstream table say so in one line, exit 2,
    before Ray starts or any method trains (was: a traceback; the table only after every method had trained)."""
    import torch

    from cluster.local import free_port
    from flipray.pretext.models import SpatialAlignmentNet
    from flipray.tracking import StoreError
    from jobs import downstream, pretext
    dead = f"http://127.0.0.1:{free_port()}"
    pcfg = load_config("demo")
    torch.save({"model": SpatialAlignmentNet(pcfg).state_dict(), "config": pcfg.to_dict()}, tmp_path / "flip.pt")
    with pytest.raises(StoreError, match=f"^no MLflow server answers at {dead} "):
        downstream.main(["--task", "localize", "--data", str(synth_root), "--methods", "flip", "--local",
                         "--pretext", f"flip={tmp_path / 'flip.pt'}", "--out", str(tmp_path / "out"),
                         "--tracking-uri", dead])
    assert not (tmp_path / "out" / "localize" / "flip").exists()
    with pytest.raises(SystemExit) as exited:
        with overrides.user_errors("python -m jobs.pretext"):
            pretext.main(["--set", f"data.root={synth_root}", "--tracking-uri", dead,
                          "--set", f"cluster.storage_path={tmp_path / 'ray'}"])
    assert exited.value.code == 2 and not (tmp_path / "ray").exists()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m jobs.pretext: no MLflow server answers at {dead} "), err
