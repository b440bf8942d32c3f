import pytest
import torch
import torchvision

from flipray.config import load_config
from flipray.pretext.models import AttentionFusion, SpatialAlignmentNet, audio_in_channels, count_parameters


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


def test_attention_fusion_reads_the_side_from_the_attended_column():
    """One head, one key channel: the audio's query picks the cell holding the object, `where` is that cell's column."""
    fusion = AttentionFusion(visual_channels=1, map_h=3, map_w=3, audio_dim=1, heads=1, key_dim=1)
    with torch.no_grad():
        for layer in (fusion.keys, fusion.queries, fusion.sides):
            layer.weight.fill_(1.0)
            layer.bias.zero_()
        fusion.queries.weight.fill_(10.0)
    cells = torch.zeros(1, 1, 9, 2)
    cells[0, 0, 3] = 5.0                        # row 1, column 0: the left edge
    audio = torch.ones(1, 1, 2)                 # heard on the right: side tanh(1)
    out = fusion(cells, audio)
    assert torch.allclose(out["attention"].sum(-1), torch.ones(1, 1, 2))
    assert out["attention"][0, 0, :, 3].min() > 0.99
    assert torch.allclose(out["where"], torch.full((1, 1, 2), -1.0), atol=0.02)
    assert torch.allclose(out["fused"], -torch.tanh(torch.ones(1, 1, 2)), atol=0.02)  # picture and sound disagree
    mirrored = cells.unflatten(2, (3, 3)).flip(3).flatten(2, 3)  # the object in the right column
    assert torch.allclose(fusion(mirrored, audio)["fused"], torch.tanh(torch.ones(1, 1, 2)), atol=0.02)


def test_attention_fusion_learns_which_object_sounds():
    """Two objects, one sounding: the audio carries the sounding one's class and its side; the label is whether the
    side disagrees with where that object is. Chance before training; learned in a few hundred Adam steps."""
    g = torch.Generator().manual_seed(0)

    def batch(n=128):
        pos = torch.rand(n, 9, generator=g).argsort(dim=1)[:, :2]  # two different cells per scene: A's and B's
        cells = torch.zeros(n, 4, 9, 3)
        cells[torch.arange(n), 0, pos[:, 0]] = 1.0                   # class A's look
        cells[torch.arange(n), 1, pos[:, 1]] = 1.0                   # class B's look
        sounding = torch.randint(0, 2, (n,), generator=g)
        column = (pos[torch.arange(n), sounding] % 3 - 1).float()    # -1 left, 0 centre, +1 right
        label = torch.randint(0, 2, (n,), generator=g).float()
        audio = torch.zeros(n, 4, 3)
        audio[torch.arange(n), sounding] = 1.0                        # which class sounds
        audio[:, 2] = (column * (1 - 2 * label))[:, None]             # the side it is heard on, swapped if label
        audio[:, 3] = 1.0
        keep = column != 0  # a sounding object on the centre line has no side to swap
        return cells[keep], audio[keep], label[keep]

    torch.manual_seed(0)
    fusion = AttentionFusion(visual_channels=4, map_h=3, map_w=3, audio_dim=4, heads=2)
    classifier = torch.nn.Linear(2, 1)
    cells, audio, label = batch(512)

    def accuracy():
        with torch.no_grad():
            logit = classifier(fusion(cells, audio)["fused"].mean(-1)).squeeze(-1)
        return ((logit > 0).float() == label).float().mean().item()

    before = accuracy()
    opt = torch.optim.Adam([*fusion.parameters(), *classifier.parameters()], lr=0.02)
    for _ in range(300):
        c, a, y = batch()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            classifier(fusion(c, a)["fused"].mean(-1)).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 0.35 < before < 0.65
    assert accuracy() > 0.95


def test_attend_fusion_in_the_network_and_where_it_is_refused():
    cfg = load_config("demo", ["model.fusion=attend", "model.fusion_heads=3"])
    model = SpatialAlignmentNet(cfg).eval()
    video, audio = _inputs(cfg, batch=3)
    feats = model.features(video, audio)
    assert feats["attention"].shape == (3, 3, 18, 9)  # 80-px crop: a 3 x 3 map
    assert feats["pooled"].shape == (3, 3) and model(video, audio).shape == (3,)
    with torch.no_grad():  # samples do not mix
        assert torch.allclose(model(video, audio)[1:], model(video[1:], audio[1:]), atol=1e-5)
    for bad, match in [("model.variant=motion", "per-frame map"), ("model.variant=pooled-visual", "per-frame map"),
                       ("train.task=shift", "train.task=flip"), ("model.fusion_heads=0", "fusion_heads")]:
        with pytest.raises(ValueError, match=match):
            load_config("demo", ["model.fusion=attend", bad])
    with pytest.raises(ValueError, match="model.fusion must be one of"):
        load_config("demo", ["model.fusion=sum"])
