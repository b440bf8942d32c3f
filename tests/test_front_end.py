"""The audio front end (flipray.pretext.data.AudioFeatures, model.front_end) and the paper-fidelity options: phase
differences and GCC-PHAT lags of known delays, channel swaps, device checks, old configs, batch renorm, audio head.

    .venv/bin/python -m pytest tests/test_front_end.py -x -q
"""
from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from flipray.config import config_from_dict, load_config
from flipray.pretext.data import ILD_SCALE, AudioFeatures
from flipray.pretext.models import BatchRenorm2d, SpatialAlignmentNet

SR = 16000


def delayed_pair(signal: torch.Tensor, delay: int) -> torch.Tensor:
    """(2, S): left = signal, right = signal delayed by `delay` samples (a source on the left of a spaced pair)."""
    right = torch.cat([torch.zeros(delay), signal[:-delay]]) if delay > 0 else signal
    return torch.stack([signal, right])


def test_logmel_channels_are_torchaudios_melspectrogram():
    cfg = load_config("demo", ["model.front_end=ipd-gcc"])
    wave = torch.randn(3, 2, cfg.window_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    wave[:, 1] = 0.5 * wave[:, 0]  # right: the left 6 dB quieter, a level difference of log10(4) = 0.602
    ref = torchaudio.transforms.MelSpectrogram(SR, n_fft=512, win_length=400, hop_length=160, n_mels=64,
                                               power=2.0, norm="slaney", mel_scale="slaney")
    logmel = torch.log10(ref(wave) + 1e-10)
    feats = AudioFeatures(cfg)(wave)
    assert feats.shape == (3, 7, 64, cfg.mel_frames)
    torch.testing.assert_close(feats[:, :2], logmel, atol=1e-4, rtol=0)
    # the default keeps the same information as mid and side: the mean log-mel, and the level difference scaled
    default = AudioFeatures(load_config("demo"))(wave)
    assert default.shape == feats.shape
    torch.testing.assert_close(default[:, 0], logmel.mean(dim=1), atol=1e-4, rtol=0)
    torch.testing.assert_close(default[:, 1], torch.full_like(default[:, 1], ILD_SCALE * math.log10(4)), atol=1e-3,
                               rtol=0)
    torch.testing.assert_close(default[:, 2:], feats[:, 2:])  # phase and delay channels are the same


@pytest.mark.parametrize("freq,delay", [(500.0, 3), (1000.0, 2), (300.0, 9)])
def test_ipd_of_a_delayed_tone_is_its_phase_ramp(freq, delay):
    """Right = left delayed by k samples: the left x conj(right) phase is 2 pi f k / sr in the tone's band."""
    cfg = load_config("demo")
    t = torch.arange(cfg.window_samples) / SR
    wave = delayed_pair(torch.sin(2 * math.pi * freq * t), delay)
    f = AudioFeatures(cfg)
    feats = f(wave)
    band = int(f.fb[round(freq * 512 / SR)].argmax())  # the mel band whose peak holds the tone's bin
    mid = slice(10, cfg.mel_frames - 10)  # away from the reflect-padded edges
    cos, sin = feats[2, band, mid].mean().item(), feats[3, band, mid].mean().item()
    phase = 2 * math.pi * freq * delay / SR
    assert cos == pytest.approx(math.cos(phase), abs=0.02) and sin == pytest.approx(math.sin(phase), abs=0.02)
    assert math.hypot(cos, sin) > 0.98  # one steady phase difference: fully coherent
    # The same tone with no delay: phase 0 everywhere it is heard
    same = f(delayed_pair(torch.sin(2 * math.pi * freq * t), 0))
    assert same[2, band, mid].mean().item() == pytest.approx(1.0, abs=1e-3)
    assert same[3, band, mid].abs().max().item() < 1e-3


def test_swapping_channels_negates_sin_ipd_keeps_cos_and_mirrors_the_gcc_lag():
    cfg = load_config("demo")
    noise = torch.randn(cfg.window_samples, generator=torch.Generator().manual_seed(1))
    delay = 7  # 0.44 ms: a source well to the left of a 30-cm pair
    wave = delayed_pair(noise, delay) * torch.tensor([[1.0], [0.7]])  # and louder on the left (3.1 dB)
    f = AudioFeatures(cfg)
    a, b = f(wave), f(wave.flip(0))
    assert a[1, :, 10:-10].mean().item() == pytest.approx(ILD_SCALE * math.log10(1 / 0.49), abs=0.02)
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=0)   # mean log-mel unchanged
    torch.testing.assert_close(b[1], -a[1], atol=1e-5, rtol=0)  # level difference negated
    torch.testing.assert_close(b[2], a[2], atol=1e-5, rtol=0)   # cos IPD unchanged
    torch.testing.assert_close(b[3], -a[3], atol=1e-5, rtol=0)  # sin IPD negated
    half = cfg.data.n_mels // 2
    for band in range(3):  # every GCC-PHAT band peaks at the delay, mirrored when swapped
        lag_a = a[4 + band, :, 10:-10].mean(-1).argmax().item() - half
        lag_b = b[4 + band, :, 10:-10].mean(-1).argmax().item() - half
        assert (lag_a, lag_b) == (-delay, delay)
        assert a[4 + band, :, 10:-10].mean(-1).max().item() > 0.7  # scaled: a coherent delay peaks near 1
    # The low bands' IPD follows the delay's ramp (a source on the left: left leads, sin > 0 below the first wrap)
    freqs = torch.linspace(0, SR / 2, 257)
    centres = (f.fb * freqs[:, None]).sum(0) / f.fb.sum(0)
    low = (centres > 150) & (centres < 0.8 * SR / (4 * delay))  # phase below pi / 2 * 0.8
    assert (a[3][low, 10:-10].mean(-1) > 0).all()
    expected = torch.sin(2 * math.pi * centres[low] * delay / SR)
    assert (a[3][low, 10:-10].mean(-1) - expected).abs().max() < 0.15


def test_logmel_front_end_gives_the_papers_two_channels_and_ipd_four():
    wave = torch.randn(2, 45920) * 0.1
    assert AudioFeatures(load_config("paper", ["model.front_end=logmel"]))(wave).shape == (2, 128, 288)
    assert AudioFeatures(load_config("paper"))(wave).shape == (7, 128, 288)  # the default: + IPD cos/sin + 3 GCC
    assert AudioFeatures(load_config("demo", ["model.front_end=ipd"]))(wave).shape == (4, 64, 288)
    mono = AudioFeatures(load_config("demo", ["model.variant=mono"]))(wave)
    assert mono.shape == (8, 64, 288)  # ipd-gcc's 7, then the mono mix last
    torch.testing.assert_close(mono[-1], AudioFeatures(load_config("demo")).log_mel(wave.mean(0, keepdim=True))[0])
    with pytest.raises(ValueError, match="front_end=logmel"):
        load_config("demo", ["model.variant=gcc-phat"])
    with pytest.raises(ValueError, match="model.front_end must be one of"):
        load_config("demo", ["model.front_end=phase"])


def test_model_takes_waveforms_on_its_own_device_and_rejects_a_mismatch():
    cfg = load_config("demo")
    torch.manual_seed(0)
    net = SpatialAlignmentNet(cfg).eval()
    video = torch.randn(2, 6, 3, 80, 80)
    wave = torch.randn(2, 2, cfg.window_samples) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(net(video, wave), net(video, net.front_end(wave)))
    assert net.audio.blocks[0].body[0].in_channels == 7
    assert not any(k.startswith("front_end") for k in net.state_dict())  # buffers follow from the config
    meta = SpatialAlignmentNet(cfg).to("meta")
    assert meta.front_end.fb.device.type == "meta"  # the front end moves with the model
    with pytest.raises(ValueError, match="audio waveform is on cpu, the model on meta"):
        meta(video.to("meta"), wave)
    meta(video.to("meta"), wave.to("meta"))  # same device: fine
    with torch.device("meta"):  # built under a default device (bench/project.py counts FLOPs so): buffers follow
        assert SpatialAlignmentNet(cfg).front_end.fb.device.type == "meta"
    torch.testing.assert_close(SpatialAlignmentNet(cfg).front_end.fb, net.front_end.fb)


def test_configs_saved_before_the_front_end_load_as_the_log_mel_model():
    old = load_config("demo").to_dict()
    for key in ("front_end", "norm", "audio_head"):
        del old["model"][key]
    cfg = config_from_dict(old)
    assert (cfg.model.front_end, cfg.model.norm, cfg.model.audio_head) == ("logmel", "batchnorm", "conv-bn-relu")
    paper = load_config("paper")
    assert (paper.model.front_end, paper.model.norm, paper.model.audio_head) == ("ild-ipd-gcc", "batchrenorm", "conv")
    assert load_config("small").model.front_end == load_config("demo").model.front_end == "ild-ipd-gcc"
    # a checkpoint of the earlier default keeps its L, R log-mel channels
    earlier = load_config("demo").to_dict()
    earlier["model"]["front_end"] = "ipd-gcc"
    assert AudioFeatures(config_from_dict(earlier)).cues == {"ipd", "gcc"}


def test_batch_renorm_corrects_batch_statistics_towards_running_ones():
    torch.manual_seed(0)
    brn, bn = BatchRenorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5) * 2 + 1
    # fresh running statistics (mean 0, var 1) vs a batch of mean 1, std 2: r = 2, d = 1
    y = brn.train()(x)
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / x.var((0, 2, 3), unbiased=False, keepdim=True).add(
        1e-5).sqrt()
    r = x.var((0, 2, 3), unbiased=False).add(1e-5).sqrt().view(1, 4, 1, 1)
    d = x.mean((0, 2, 3)).view(1, 4, 1, 1)
    torch.testing.assert_close(y, expected * r + d, atol=1e-5, rtol=1e-5)  # = x: running stats' normalisation
    torch.testing.assert_close(brn.running_mean, bn.train()(x).new_zeros(4) + 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(brn.running_var, bn.running_var)  # same running updates as BatchNorm
    # when batch and running statistics agree (r = 1, d = 0) it is BatchNorm; in eval mode it always is
    brn.running_mean.copy_(x.mean((0, 2, 3)))
    brn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    bn.load_state_dict(brn.state_dict())
    torch.testing.assert_close(brn.train()(x), bn.train()(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x))
    y.sum().backward()  # gradients flow through the batch statistics


def test_paper_fidelity_options_build_the_authors_norm_and_head():
    cfg = load_config("paper")
    net = SpatialAlignmentNet(cfg)
    audio_norms = [m for m in net.audio.blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(audio_norms) == 12 and all(isinstance(m, BatchRenorm2d) for m in audio_norms)
    assert isinstance(net.visual.reduce[1], BatchRenorm2d)
    assert not isinstance(net.visual.trunk.bn1, BatchRenorm2d)  # the ResNet trunk stays torchvision's
    head = net.audio.collapse
    assert len(head) == 1 and head[0].bias is not None and head[0].kernel_size == (8, 1)
    net.eval()
    with torch.no_grad():
        emb = net.embed_audio(torch.randn(2, net.front_end.channels, 128, 288))
    assert (emb == 0).float().mean() < 0.01  # no ReLU after the head: the embedding is not half zeros
    demo = SpatialAlignmentNet(load_config("demo"))
    assert len(demo.audio.collapse) == 3 and not any(isinstance(m, BatchRenorm2d) for m in demo.modules())
