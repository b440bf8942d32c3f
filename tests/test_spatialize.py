"""Audio spatialization (flipray/tasks/spatialize.py), the shared audio U-Net (flipray/tasks/unet.py) and the Table 4 job.

    .venv/bin/python -m pytest tests/test_spatialize.py -x -q
"""
from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch

from flipray.tasks import spatialize
from flipray.config import load_config
from flipray.tasks.base import apply, load_clips
from flipray.pretext.models import SpatialAlignmentNet
from flipray.tasks.unet import AudioUNet, Chunks, Spectrogram, overlap_add

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spatialize_checkpoint(tmp_path_factory):
    """A demo-shaped pretext checkpoint with random weights (the job's loader reads it like a trained one)."""
    pcfg = load_config("demo")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretext") / "checkpoint.pt"
    torch.save({"model": SpatialAlignmentNet(pcfg).state_dict(), "config": pcfg.to_dict()}, path)
    return path


def test_unet_shapes_ranges_and_condition():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 256, 70)  # 70 frames: not a multiple of 32, padded inside and cropped back
    tanh_net = AudioUNet(2, 2, ngf=4, cond_dim=12, cond_proj=8, out_act="tanh").eval()
    cond = torch.randn(3, 12, 5)
    out = tanh_net(x, cond)
    assert out.shape == (3, 2, 256, 70)
    assert out.abs().max() < 1
    assert tanh_net(x, cond[:, :, 0]).shape == (3, 2, 256, 70)  # a (B, D) vector is tiled over time
    assert not torch.allclose(tanh_net(x, cond), tanh_net(x, torch.randn(3, 12, 5)))  # the condition is used
    sig = AudioUNet(2, 2, ngf=4, out_act="sigmoid").eval()(x)
    assert sig.shape == (3, 2, 256, 70) and sig.min() > 0 and sig.max() < 1
    with pytest.raises(ValueError, match="cond_dim"):
        AudioUNet(2, 2, ngf=4)(x, cond)
    with pytest.raises(ValueError, match="cond_dim"):
        tanh_net(x)


def _segment(n: int, g: torch.Generator, fade: int = 800) -> torch.Tensor:
    """Noise below 4.8 kHz with raised-cosine fades: no energy at the dropped Nyquist bin."""
    spectrum = torch.fft.rfft(torch.randn(n, generator=g, dtype=torch.float64))
    spectrum[int(0.3 * n):] = 0
    x = torch.fft.irfft(spectrum, n)
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, fade, dtype=torch.float64))
    x[:fade] *= ramp
    x[-fade:] *= ramp.flip(0)
    return x


def test_perfect_tanh_mask_reconstructs_left_and_right():
    spec = Spectrogram(load_config("demo"))
    g = torch.Generator().manual_seed(0)
    # A source on the left (R = L/2), silence longer than an STFT frame, then on the right (R = 2L): the ideal mask
    # D/S is +1/3 then -1/3, inside tanh's range, so tanh(atanh(mask)) is a mask the U-Net can output.
    x1, x2 = _segment(8000, g), _segment(7000, g)
    gap = torch.zeros(1000, dtype=torch.float64)
    left, right = torch.cat([x1, gap, x2]), torch.cat([0.5 * x1, gap, 2.0 * x2])
    mono = left + right
    mono_spec, diff_spec = spec(mono), spec(left - right)
    mask = spatialize.ideal_mask(mono_spec, diff_spec)
    assert mask.real.max() == pytest.approx(1 / 3, abs=1e-6) and mask.real.min() == pytest.approx(-1 / 3, abs=1e-6)
    logits = torch.atanh(torch.stack([mask.real, mask.imag]))
    assert torch.isfinite(logits).all()
    m = torch.tanh(logits)
    pred = torch.complex(m[0], m[1]) * mono_spec
    assert spatialize.complex_l1(pred, diff_spec) < 1e-9
    stereo = spatialize.upmix(mono, pred, spec)
    assert stereo.shape == (2, len(mono))
    assert torch.allclose(stereo, torch.stack([left, right]), atol=1e-6)
    # and with no difference at all, both channels get half the mono mix
    assert torch.allclose(spatialize.upmix(mono, torch.zeros_like(pred), spec), torch.stack([mono, mono]) / 2,
                          atol=1e-9)


def test_chunks_and_overlap_add():
    chunks = Chunks(0.63, 6.0, 16000)
    assert (chunks.samples, chunks.frames) == (10080, 4)
    starts = chunks.sliding(60, 160000, hop=2)
    assert starts[0] == 0 and starts[-1] == chunks.last_start(60, 160000) == 56
    assert all(b - a <= 2 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="shorter than one"):
        chunks.last_start(3, 160000)
    # averaging identical overlapping copies of a signal gives the signal back
    wave = torch.randn(2, 30000)
    pieces = [(s, wave[:, s:s + 10000]) for s in (0, 5000, 12000, 20000)]
    assert torch.allclose(overlap_add(pieces, 30000), wave)


def test_head_shapes_and_loss_on_a_tiny_batch(synth_root, spatialize_checkpoint):
    cfg = apply(spatialize.Config(data_root=str(synth_root), pretext=str(spatialize_checkpoint), pretrained=False),
                {"ngf": 4, "cond_proj": 8, "lr_backbone": 0.0})
    pcfg = load_config("demo")
    clips, _ = load_clips(str(synth_root), "train", pcfg.data.resize, pcfg.data.sample_rate, max_clips=3)
    chunks = spatialize.prepare_clips(clips, cfg, pcfg)
    batch = spatialize.make_batch(clips, [(0, 0, False), (1, 5, True), (2, 3, False)], chunks, pcfg)
    assert batch["video"].shape == (3, 4, 3, pcfg.data.crop, pcfg.data.crop)
    assert batch["wave"].shape == (3, 2, chunks.samples)
    # mirroring swaps the channels of the chunk
    assert torch.equal(batch["wave"][1], chunks.wave(clips[1].wave, 5).flip(0))
    model = spatialize.Upmixer(SpatialAlignmentNet(pcfg), cfg)
    spec = Spectrogram(pcfg)
    pred, target, mono = spatialize.forward_chunks(model, batch["video"], batch["wave"], spec)
    assert pred.shape == target.shape == (3, 256, 64) and pred.is_complex()
    assert mono.shape == (3, chunks.samples) and torch.equal(mono, batch["wave"][:, 0] + batch["wave"][:, 1])
    w = chunks.wave(clips[1].wave, 5)  # the target is STFT(L - R): mirroring the chunk negates it
    assert torch.allclose(target[1], -spec((w[0] - w[1])[None])[0], atol=1e-5)
    loss = spatialize.complex_l1(pred, target)
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    assert model.unet.last.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.net.parameters())  # lr_backbone=0: frozen, no gradients
    # predicting no difference at all costs exactly the mean |STFT(L-R)|
    zero = spatialize.complex_l1(torch.zeros_like(target), target)
    assert torch.allclose(zero, (target.real.abs() + target.imag.abs()).mean(dim=(-2, -1)) / 2)


@pytest.mark.slow
def test_training_learns_and_beats_the_untrained_upmixer(synth_root, spatialize_checkpoint):
    cfg = apply(spatialize.Config(data_root=str(synth_root), pretext=str(spatialize_checkpoint), pretrained=False,
                                  method="scratch", eval_split="train", max_clips=6),
                {"ngf": 8, "cond_proj": 8, "epochs": 6, "batch_size": 6, "lr": 1e-3, "lr_backbone": 0.0,
                 "chunks_per_clip": 6, "infer_hop_frames": 6, "examples": 0, "threads": 1})
    reports = []
    result = spatialize.run_trial(cfg, report=lambda epoch, m: reports.append((epoch, m)))
    assert [e for e, _ in reports] == list(range(6))
    history = result["history"]
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["val_l1_complex"] < history[0]["val_l1_complex"]
    # the same whole-clip scoring of an untrained upmixer of the same shape, on the same clips
    pcfg = load_config("demo")
    clips, _ = load_clips(str(synth_root), "train", pcfg.data.resize, pcfg.data.sample_rate, max_clips=6)
    chunks = spatialize.prepare_clips(clips, cfg, pcfg)
    torch.manual_seed(1)
    untrained = spatialize.Upmixer(SpatialAlignmentNet(pcfg), cfg)
    before = spatialize.score_clips(untrained, clips, chunks, Spectrogram(pcfg), pcfg, cfg, "cpu", None)
    mean = {k: sum(v) / len(v) for k, v in before.items()}
    m = result["metrics"]
    assert m["l1_complex"] < mean["l1_complex"] and m["stft_distance"] < mean["stft_distance"]
    assert m["stft_distance_mono"] == pytest.approx(mean["stft_distance_mono"])  # the floor is the data's
    assert result["clip_ids"] == [c.clip_id for c in clips]
    assert all(len(v) == 6 for v in result["per_clip"].values())


@pytest.mark.slow
def test_job_runs_methods_as_ray_tasks_and_writes_table_and_stereo_flac(synth_root, spatialize_checkpoint, tmp_path,
                                                                         ray_local):
    from jobs.spatialize import main
    summary = main(["--data", str(synth_root), "--preset", "demo", "--no-mlflow",
                    "--pretext", f"flip={spatialize_checkpoint}", "--methods", "no-visual,flip",
                    "--set", "epochs=1", "--set", "ngf=4", "--set", "examples=1", "--set", "eval_split=val",
                    "--out", str(tmp_path)])
    out = tmp_path / "spatialize"
    table = json.loads((out / "spatialize.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["no-visual", "flip"]
    assert table["primary"] == "stft_distance" and table["table"] == "Table 4"
    assert set(summary["results"]["flip"]) == set(spatialize.TABLE["metrics"])
    assert all(math.isfinite(v) for v in summary["results"]["flip"].values())
    for method in ("no-visual", "flip"):
        result = json.loads((out / method / "result.json").read_text())
        assert len(result["per_clip"]["stft_distance"]) == len(result["clip_ids"]) == 2
        assert [h["epoch"] for h in result["history"]] == [0]
        pred = next((out / method / "examples").glob("*_pred.flac"))
        info = sf.info(pred)
        assert info.channels == 2 and info.samplerate == 16000 and info.frames > 16000 * 3
        assert (out / method / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Flip task (ours) `flip`" in (out / "spatialize.md").read_text()
