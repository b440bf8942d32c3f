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
