"""360-degree clips with first-order ambisonics (flipray/foa.py, flipray/synth/scenes360.py) and the rotate pretext task:
the rotation and its inverse, plane waves decoded where the rotation sends them, the panorama roll turning the same
way as the sound field, the synthetic clips' ground truth, and the rotate task's samples and joint augmentations."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from flipray import foa

from flipray.synth import scenes360 as synth360
from flipray.config import load_config
from flipray.pretext.data import AudioFeatures, ClipDataset, SampleParams, collate, decode_video, draw_params
from flipray.dataset.manifest import read_manifest

SR = 16000


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clean360(tmp_path_factory):
    """6 clean 360 clips (no reverb, no noise, one sounding object each, silent distractors), 3 s, 128 x 64."""
    root = tmp_path_factory.mktemp("clean360")
    synth360.generate(root, clips=6, seed=4, workers=1, height=64, duration_s=3.0, reverb_prob=0.0, noise=False,
                      two_source_prob=0.0, max_distractors=1, motion_probs=(0.5, 0.3, 0.2))
    return root


def noise(n=SR, seed=0):
    return np.random.default_rng(seed).standard_normal(n)


def object_column(frame_mask):
    """Circular mean column (float, pixel centres at .5) of a boolean (H, W) mask."""
    w = frame_mask.shape[1]
    cols = np.nonzero(frame_mask)[1] + 0.5
    ang = 2 * np.pi * cols / w
    return (np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()) / (2 * np.pi) * w) % w


def column_distance(a, b, width):
    d = abs(a - b) % width
    return min(d, width - d)


def test_rotating_by_theta_then_minus_theta_is_the_identity():
    rng = np.random.default_rng(0)
    wave = rng.standard_normal((3, 4, 2000))
    for theta in (0.0, 10.0, 90.0, 137.5, 180.0, -73.0, 400.0):
        rotated = foa.rotate_foa(wave, theta)
        np.testing.assert_allclose(foa.rotate_foa(rotated, -theta), wave, atol=1e-12)
        np.testing.assert_array_equal(rotated[:, 0], wave[:, 0])  # W unchanged
        np.testing.assert_array_equal(rotated[:, 2], wave[:, 2])  # Z unchanged
        if theta % 360:
            assert not np.allclose(rotated, wave)  # X and Y do change
        np.testing.assert_allclose(foa.rotate_foa(foa.rotate_foa(wave, theta), 25.0),
                                   foa.rotate_foa(wave, theta + 25.0), atol=1e-12)
    t = torch.from_numpy(wave).float()
    torch.testing.assert_close(foa.rotate_foa(foa.rotate_foa(t, 33.0), -33.0), t, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="4 channels"):
        foa.rotate_foa(wave[:, :2], 90.0)


def test_plane_wave_rotated_by_theta_decodes_at_azimuth_plus_theta():
    s = noise()
    left = foa.encode(s, 90.0)  # the convention: +90 = left -> all of the gradient in Y (ACN channel 1)
    np.testing.assert_allclose(left[1], s, atol=1e-12)
    np.testing.assert_allclose(left[3], 0.0, atol=1e-12)
    for az, el in ((0.0, 0.0), (30.0, 10.0), (-120.0, -25.0), (170.0, 40.0)):
        wave = foa.encode(s, az, el)
        got_az, got_el = foa.intensity_doa(wave, SR)
        assert foa.angular_error(got_az, az) < 0.5 and abs(got_el - el) < 0.5
        for theta in (10.0, 90.0, -45.0, 180.0, 250.0):
            got_az, got_el = foa.intensity_doa(foa.rotate_foa(wave, theta), SR)
            assert foa.angular_error(got_az, az + theta) < 0.5, (az, theta, got_az)
            assert abs(got_el - el) < 0.5  # rotation about the vertical axis keeps the elevation
    # mirroring left-right: a -> -a
    assert foa.angular_error(foa.intensity_doa(foa.mirror_foa(foa.encode(s, 70.0)), SR)[0], -70.0) < 0.5


def test_panorama_roll_turns_the_picture_the_way_rotate_foa_turns_the_sound():
    height, width = 64, 128
    look = synth360.SOUNDING_CLASSES["shaker"][1]
    rgb, cover = synth360.sprite(look, 12, 10, np.random.default_rng(0))
    for az in (0.0, 45.0, 100.0, -150.0, 175.0):  # 175: the sprite straddles the seam
        frame = np.zeros((height, width, 3), np.uint8)
        synth360.draw_object(frame, rgb, cover, az, 0.0)
        assert column_distance(object_column(frame.sum(-1) > 0), foa.panorama_column(az, width), width) < 0.6
        for theta in (45.0, 90.0, -90.0, 180.0, 14 * 360 / width):
            rolled = foa.roll_panorama(frame, theta)
            # where the picture now shows the object = where the rotated sound field now puts the source
            heard = foa.intensity_doa(foa.rotate_foa(foa.encode(noise(), az), theta), SR)[0]
            assert column_distance(object_column(rolled.sum(-1) > 0), foa.panorama_column(heard, width), width) < 0.6
            assert column_distance(object_column(rolled.sum(-1) > 0), foa.panorama_column(az + theta, width),
                                   width) < 0.6
    # the directions themselves: left of centre is left (+90 at a quarter of the width), behind at the seam
    assert foa.panorama_column(90.0, width) == width / 4 and foa.panorama_column(-90.0, width) == 3 * width / 4
    assert foa.column_azimuth(width / 4, width) == 90.0
    frames = torch.from_numpy(np.stack([frame, frame]))
    torch.testing.assert_close(foa.roll_panorama(frames, 90.0), torch.roll(frames, -width // 4, dims=2))
    with pytest.raises(ValueError, match="whole number of columns"):
        foa.roll_panorama(frame, 1.0)


def test_panorama_resize_keeps_the_whole_sphere():
    frame = np.zeros((1, 64, 128, 3), np.uint8)
    rgb, cover = synth360.sprite(synth360.SOUNDING_CLASSES["bell"][1], 16, 16, np.random.default_rng(1))
    synth360.draw_object(frame[0], rgb, cover, 120.0, 20.0)
    small = foa.resize_panorama(torch.from_numpy(frame), 32)
    assert small.shape == (1, 32, 64, 3)
    mask = small[0].float().sum(-1).numpy() > 60
    assert column_distance(object_column(mask), foa.panorama_column(120.0, 64), 64) < 1.0


def test_logmel_alone_cannot_hear_a_half_turn_intensity_channels_can():
    cfg = load_config("demo", ["train.task=rotate", "data.foa_intensity=false"])
    wave = torch.from_numpy(foa.encode(noise(46000), 60.0, 10.0)).float()
    turned = foa.rotate_foa(wave, 180.0)
    logmel = AudioFeatures(cfg)
    assert logmel(wave).shape == (4, 64, 288)
    torch.testing.assert_close(logmel(turned), logmel(wave), atol=1e-4, rtol=0)  # |X|, |Y| unchanged by 180 deg
    cfg = load_config("demo", ["train.task=rotate"])
    feats, feats_turned = AudioFeatures(cfg)(wave), AudioFeatures(cfg)(turned)
    assert feats.shape == (7, 64, 288)
    iy, iz, ix = feats[4:].mean(dim=(1, 2)).tolist()  # the intensity channels point at the source: Y, Z, X order
    assert iy > 0 and ix > 0 and iz > 0  # 60 deg left of front, a little up
    np.testing.assert_allclose(np.degrees(np.arctan2(iy, ix)), 60.0, atol=2.0)
    torch.testing.assert_close(feats_turned[4], -feats[4], atol=1e-4, rtol=0)  # Y and X flip sign, Z stays
    torch.testing.assert_close(feats_turned[6], -feats[6], atol=1e-4, rtol=0)
    torch.testing.assert_close(feats_turned[5], feats[5], atol=1e-4, rtol=0)


def test_synth360_clips_follow_the_contract_and_their_ground_truth(clean360):
    rows = read_manifest(clean360)
    assert len(rows) == 6 and {r["channels"] for r in rows} == {4}
    moved = 0
    for row in rows:
        meta = json.loads((clean360 / row["meta"]).read_text())
        assert meta["conventions"] == foa.CONVENTIONS and "90 = left" in meta["conventions"]
        assert "W,Y,Z,X" in meta["conventions"] and "SN3D" in meta["conventions"]
        assert (meta["width"], meta["height"], meta["channels"]) == (128, 64, 4)
        wave, sr = sf.read(clean360 / row["audio"], always_2d=True)
        assert wave.shape == (3 * SR, 4) and sr == SR
        frames = decode_video(clean360 / row["video"], panorama=True)
        assert frames.shape == (18, 64, 128, 3)
        src = next(o for o in meta["objects"] if o["sounding"])
        assert len(src["azimuth_deg"]) == len(src["boxes"]) == 18
        # the sound comes from where the object is drawn: 1/6-s audio around frame i vs the sidecar's azimuth
        for i in (3, 9, 15):
            seg = wave[round((i / 6 - 1 / 12) * SR):round((i / 6 + 1 / 12) * SR)].T
            assert foa.angular_error(foa.intensity_doa(seg, SR)[0], src["azimuth_deg"][i]) < 8.0
            x0, y0, x1, y1 = src["boxes"][i]
            centre = ((x0 + x1) / 2) % 128
            assert column_distance(centre, foa.panorama_column(src["azimuth_deg"][i], 128), 128) <= 1.0
        if src["motion"] != "static":
            moved += 1
            assert foa.angular_error(src["azimuth_deg"][0], src["azimuth_deg"][-1]) > 5.0
        else:
            assert len(set(src["azimuth_deg"])) == 1
    assert moved >= 1  # the fixture's seed gives moving and static sources


def test_rotate_task_samples_labels_and_joint_augmentation(clean360):
    cfg = load_config("demo", ["train.task=rotate", f"data.root={clean360}", "data.rotations_deg=[90, 180, 270]",
                               "data.joint_flip_p=0.5"])
    assert cfg.data.audio_channels == 4  # implied by the task
    params = [draw_params(cfg, 18, 0, 0, i, train=True) for i in range(400)]
    negatives = [p for p in params if p.swap]
    assert 150 < len(negatives) < 250
    assert {p.rotation_deg for p in negatives} == {90.0, 180.0, 270.0}
    assert all(p.rotation_deg == 0 for p in params if not p.swap)
    cols = 2 * cfg.data.crop
    assert all(abs(p.roll_deg * cols / 360 - round(p.roll_deg * cols / 360)) < 1e-9 for p in params)
    assert len({p.roll_deg for p in params}) > 50 and {p.crop_x for p in params} == {0}

    ds = ClipDataset(cfg, "train", train=True)
    batch = collate([ds[(0, i)] for i in range(len(ds))])
    assert batch["video"].shape[1:] == (6, 3, 80, 160) and batch["audio"].shape[1:] == (4, cfg.window_samples)
    assert AudioFeatures(cfg)(batch["audio"]).shape[1:] == (7, 64, 288)  # the model's front end, on its device
    assert set(batch["label"].tolist()) <= {0.0, 1.0}

    # One clip with a static source: after the sample's transforms, where the picture shows the object and where
    # the audio says the sound is agree for positives (joint roll + mirror) and differ by theta for negatives.
    row = next(r for r in read_manifest(clean360)
               if next(o for o in json.loads((clean360 / r["meta"]).read_text())["objects"]
                       if o["sounding"])["motion"] == "static")
    meta = json.loads((clean360 / row["meta"]).read_text())
    src = next(o for o in meta["objects"] if o["sounding"])
    frames = decode_video(clean360 / row["video"], panorama=True)[:1]
    wave = torch.from_numpy(sf.read(clean360 / row["audio"], always_2d=True)[0].T).float()
    mask0 = np.zeros(frames.shape[1:3], bool)
    x0, y0, x1, y1 = src["boxes"][0]
    mask0[y0:y1, np.arange(x0, x1) % 128] = True
    for flip in (False, True):
        for roll in (0.0, 45.0, 135.0, 270.0):
            for swap, rotation in ((False, 0.0), (True, 90.0), (True, 180.0)):
                p = SampleParams(0, 0, 0, 1.0, 1.0, 1.0, flip, swap, rotation_deg=rotation, roll_deg=roll)
                f, w = foa.transform_sample(frames, wave, p)
                m, _ = foa.transform_sample(torch.from_numpy(mask0)[None, :, :, None], wave, p)
                seen = foa.column_azimuth(object_column(m[0, :, :, 0].numpy()), 128)
                heard = foa.intensity_doa(w.numpy(), SR)[0]
                assert foa.angular_error(heard, seen + rotation) < 5.0, (flip, roll, swap, seen, heard)
                expect = (-src["azimuth_deg"][0] if flip else src["azimuth_deg"][0]) + roll
                assert foa.angular_error(seen, expect) < 3.0
                if swap:
                    np.testing.assert_allclose(w.numpy(), foa.rotate_foa(
                        foa.transform_sample(frames, wave, SampleParams(0, 0, 0, 1, 1, 1, flip, False,
                                                                        roll_deg=roll))[1].numpy(), rotation),
                        atol=1e-5)

    ev = ClipDataset(cfg, "val", train=False)  # every clip as recorded (0) and rotated (1)
    assert [ev[i]["label"].item() for i in range(len(ev))] == [0.0, 1.0] * (len(ev) // 2)


def test_config_checks_and_dali_refuses_360_clips():
    with pytest.raises(ValueError, match="audio_channels=2"):
        load_config("demo", ["data.audio_channels=4"])  # flip needs stereo
    with pytest.raises(ValueError, match="rotations_deg"):
        load_config("demo", ["train.task=rotate", "data.rotations_deg=[0]"])
    with pytest.raises(ValueError, match="stereo clips"):
        load_config("demo", ["train.task=rotate", "model.variant=mono"])
    assert load_config("demo").data.audio_channels == 2
    pytest.importorskip("nvidia.dali")
    from dali_pipelines.pretext import build_pipeline
    with pytest.raises(ValueError, match="torchcodec"):
        build_pipeline(load_config("demo", ["train.task=rotate"]), source=None)


def test_synth360_keeps_a_dataset_there_and_refuses_another(clean360):
    """The same plan as `flipray synth` (flipray.synth.scenes.plan_clips): the same command again makes nothing;
    another seed is refused before anything is written."""
    from flipray.dataset.manifest import read_manifest
    from flipray.overrides import UsageError
    rows = read_manifest(clean360)
    stamps = {p: p.stat().st_mtime_ns for p in (clean360 / "clips").iterdir()}
    options = dict(workers=1, height=64, duration_s=3.0, reverb_prob=0.0, noise=False, two_source_prob=0.0,
                   max_distractors=1, motion_probs=(0.5, 0.3, 0.2))
    assert synth360.generate(clean360, clips=6, seed=4, **options) == rows
    with pytest.raises(UsageError, match="made otherwise .*seed 4, not 5"):
        synth360.generate(clean360, clips=6, seed=5, **options)
    assert read_manifest(clean360) == rows and {p: p.stat().st_mtime_ns for p in stamps} == stamps
