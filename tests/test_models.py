import pytest
import torch
import torchvision

from flipray.config import load_config
from flipray.pretext.models import SpatialAlignmentNet, audio_in_channels, count_parameters


def _inputs(cfg, batch=2):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, cfg.data.num_frames, 3, cfg.data.crop, cfg.data.crop, generator=g)
    channels = audio_in_channels(cfg.model.variant, 2, False, cfg.model.front_end)
    audio = torch.randn(batch, channels, cfg.data.n_mels, cfg.mel_frames, generator=g)
    return video, audio


@pytest.mark.slow  # 18 frames of 224 px through the full network and back (10 s on 2 cores)
def test_paper_preset_exact_shapes_forward_backward():
    cfg = load_config("paper")
    model = SpatialAlignmentNet(cfg)
    video, audio = _inputs(cfg)
    assert video.shape == (2, 18, 3, 224, 224) and audio.shape == (2, 7, 128, 288)  # ild-ipd-gcc: 7 feature maps
    feats = model.features(video, audio)
    assert feats["visual"].shape == (2, 16 * 7 * 7, 18)  # 16 x 7 x 7 map flattened, no pooling
    assert feats["audio"].shape == (2, 256, 18)          # 288 STFT frames / 16 = 18 steps, matching the video
    assert feats["fused"].shape == (2, 512, 18) and feats["pooled"].shape == (2, 512)
    logits = model(video, audio)
    assert logits.shape == (2,)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    n = count_parameters(model)
    assert 17_000_000 < n < 19_000_000, n  # ResNet-18 trunk (11.2M) + SE audio net + fusion


@pytest.mark.parametrize("variant,visual_dim,audio_dim", [
    ("base", 16 * 2 * 2, 64), ("pooled-visual", 128, 64), ("mono", 16 * 2 * 2, 128),
    ("gcc-phat", 16 * 2 * 2, 64), ("motion", 16 * 4 * 4, 64)])
def test_variant_shapes(variant, visual_dim, audio_dim):
    front_end = "logmel" if variant == "gcc-phat" else "ild-ipd-gcc"  # the paper's GCC ablation is on log-mels
    cfg = load_config("demo", [f"model.variant={variant}", f"model.front_end={front_end}", "data.resize=72",
                               "data.crop=64"])
    model = SpatialAlignmentNet(cfg)
    video, audio = _inputs(cfg, batch=3)
    feats = model.features(video, audio)
    assert feats["visual"].shape[:2] == (3, visual_dim)
    assert feats["audio"].shape == (3, audio_dim, 18)
    assert feats["fused"].shape == (3, cfg.model.fusion_dim, 18)
    assert model(video, audio).shape == (3,)
    with torch.no_grad():  # samples do not mix: a reshape that crossed batch and time would break this
        assert torch.allclose(model.eval()(video, audio)[1:], model(video[1:], audio[1:]), atol=1e-5)


def test_flattened_visual_map_keeps_position_pooled_does_not():
    crop64 = ["data.resize=72", "data.crop=64"]
    flat = SpatialAlignmentNet(load_config("demo", crop64)).visual.eval()
    pooled = SpatialAlignmentNet(load_config("demo", crop64 + ["model.variant=pooled-visual"])).visual.eval()
    video = torch.zeros(1, 6, 3, 64, 64)
    video[..., :, 8:24, 4:20] = 3.0  # a bright square on the left
    mirrored = video.flip(-1)
    with torch.no_grad():
        assert not torch.allclose(flat(video), flat(mirrored), atol=1e-4)
        # global average pooling cannot tell a scene from its mirror image (up to the conv kernels' asymmetry,
        # the pooled features of a mirrored input are far closer than the flattened ones)
        d_pool = (pooled(video) - pooled(mirrored)).abs().mean() / pooled(video).abs().mean()
        d_flat = (flat(video) - flat(mirrored)).abs().mean() / flat(video).abs().mean()
        assert d_pool < d_flat


def test_imagenet_init_loads_a_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = SpatialAlignmentNet(load_config("demo", ["model.visual_width=64", f"model.visual_init=imagenet:{path}"]))
    assert torch.equal(model.visual.trunk.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(model.visual.trunk.bn1.running_mean, reference.bn1.running_mean)
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision resnet18"):
        SpatialAlignmentNet(load_config("demo", ["model.visual_width=64", f"model.visual_init=imagenet:{path}"]))
    with pytest.raises(ValueError, match="visual_width=64"):
        load_config("demo", [f"model.visual_init=imagenet:{path}"])
