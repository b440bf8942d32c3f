"""The synthetic scene generator (flipray/synth/scenes.py): interaural cues of every sounding class, the clip files and their
ground truth against docs/clip-format.md, determinism across worker counts, the manifest and its splits."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.ndimage import binary_dilation

from flipray.synth import scenes as synth
from flipray.dataset.manifest import REQUIRED_FIELDS, SPLITS, read_manifest

SR = 16000
SMALL = dict(duration_s=3.0, size=128)  # short, small clips keep the file fast


def gcc_phat_lag(left, right, max_lag, upsample=16):
    """Samples (to 1/upsample) by which `left` trails `right`: the GCC-PHAT peak within +-max_lag."""
    n = len(left) + len(right)
    cross = np.fft.rfft(left, n) * np.conj(np.fft.rfft(right, n))
    cc = np.fft.irfft(cross / (np.abs(cross) + 1e-12), n * upsample)
    m = int(max_lag * upsample)
    return (np.argmax(np.concatenate([cc[-m:], cc[:m + 1]])) - m) / upsample


def ild_db(stereo, lo_hz, hi_hz):
    """Right-over-left energy (dB) in a frequency band."""
    power = np.abs(np.fft.rfft(stereo)) ** 2
    f = np.fft.rfftfreq(stereo.shape[-1], 1 / SR)
    band = (f >= lo_hz) & (f < hi_hz)
    return 10 * np.log10(power[1, band].sum() / power[0, band].sum())


def ffprobe(path, *entries):
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries", ":".join(entries), "-of", "json",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_blockwise_filter_is_exact_for_constant_responses():
    x = np.random.default_rng(0).standard_normal(SR + 123)
    shape = (len(x) // synth.HOP + 2, synth.NFFT // 2 + 1)
    assert np.allclose(synth.filter_blockwise(x, np.ones(shape)), x)
    w = 2 * np.pi * np.fft.rfftfreq(synth.NFFT, 1 / SR)
    delayed = synth.filter_blockwise(x, np.broadcast_to(np.exp(-1j * w * 2.5 / SR), shape))  # 2.5 samples
    assert gcc_phat_lag(delayed, x, 8) == pytest.approx(2.5, abs=0.07)


@pytest.mark.parametrize("cls", sorted(synth.SOUNDING_CLASSES))
def test_binaural_cues_for_every_sounding_class(cls):
    family = synth.SOUNDING_CLASSES[cls][0]
    mono = synth.source_signal(family, 2 * SR, SR, np.random.default_rng(7))
    head_radius = 0.0875
    theta = np.radians(30)
    woodworth = head_radius / 343.0 * (theta + np.sin(theta)) * SR  # 4.2 samples
    right, left = (synth.render_binaural(mono, az, SR, head_radius) for az in (30.0, -30.0))
    assert np.allclose(left, right[::-1]), "a mirrored source must give mirrored channels"
    for stereo, side in ((right, 1), (left, -1)):
        lag = gcc_phat_lag(stereo[0], stereo[1], max_lag=12)
        assert side * lag > 0, "the far ear must lag"
        # Woodworth's delay, plus a little low-frequency phase lag from the head-shadow filter
        assert 0.9 * woodworth < abs(lag) < 1.3 * woodworth, (lag, woodworth)
        high, low = side * ild_db(stereo, 2000, 8000), side * ild_db(stereo, 100, 1000)
        assert side * (np.sum(stereo[1] ** 2) - np.sum(stereo[0] ** 2)) > 0, "the near ear is louder"
        assert high > 4.0, f"ILD {high:.1f} dB in 2-8 kHz: the head shadow must be several dB at 30 deg"
        assert -0.5 < low < high - 2.0, f"ILD {low:.1f} dB below 1 kHz must be small and below the high-band one"


def test_every_sound_family_sounds_in_short_clips():
    """A sounding object's sound is never silent, even in the shortest clip (1 s): clicks come in spells, and a 1-s
    clip could fall between hits (8 of 300 draws did; with --no-noise the clip's peak normalisation then divided by
    zero). Unit RMS every time."""
    for family in synth.FAMILIES:
        for seed in range(300 if family == "clicks" else 20):
            x = synth.source_signal(family, 16000, 16000, np.random.default_rng(seed))
            assert abs(np.sqrt(np.mean(x ** 2)) - 1) < 1e-6, (family, seed)


def test_moving_source_moves_in_the_audio():
    mono = synth.source_signal("noise", 4 * SR, SR, np.random.default_rng(1))
    stereo = synth.render_binaural(mono, np.linspace(-60, 60, 4 * SR), SR, 0.08)
    first, last = stereo[:, :SR], stereo[:, -SR:]
    assert ild_db(first, 2000, 8000) < -4 and ild_db(last, 2000, 8000) > 4
    assert gcc_phat_lag(first[0], first[1], 12) < -3 and gcc_phat_lag(last[0], last[1], 12) > 3


def capture(kind, **params):
    base = {"binaural": {"head_radius_m": 0.0875}, "spaced": {"spacing_m": 0.4}, "phone": {"spacing_m": 0.12},
            "near-coincident": {"spacing_m": 0.17, "angle_deg": 55.0}}.get(kind, {})
    return {"type": kind, **base, **params}


@pytest.mark.parametrize("kind,spacing", [("spaced", 0.10), ("spaced", 0.40), ("spaced", 0.60), ("phone", 0.12),
                                          ("near-coincident", 0.17)])
@pytest.mark.parametrize("azimuth", [-50.0, -20.0, 35.0])
def test_pairs_delay_is_time_of_flight_between_the_capsules(kind, spacing, azimuth):
    """Spaced, phone and near-coincident pairs: the cross-correlation peak lag is d sin(theta) / c (the capsule on
    the source's side hears it first); omni capsules add no level difference, cardioids aimed apart do."""
    mono = synth.source_signal("noise", 2 * SR, SR, np.random.default_rng(3))
    stereo = synth.render_capture(mono, azimuth, SR, capture(kind, spacing_m=spacing))
    expected = spacing * np.sin(np.radians(azimuth)) / 343.0 * SR  # samples by which left trails right
    lag = gcc_phat_lag(stereo[0], stereo[1], max_lag=32)
    assert lag == pytest.approx(expected, abs=0.15), (lag, expected)
    level = ild_db(stereo, 100, 8000)
    if kind == "near-coincident":
        assert np.sign(level) == np.sign(azimuth) and abs(level) > 1.0  # the capsule aimed at it is louder
    else:
        assert abs(level) < 0.2  # omni: time only


@pytest.mark.parametrize("layout", ["xy", "ms"])
@pytest.mark.parametrize("azimuth", [-40.0, -10.0, 25.0])
def test_coincident_pairs_have_zero_delay_and_the_level_difference_of_the_side(layout, azimuth):
    mono = synth.source_signal("speech", 2 * SR, SR, np.random.default_rng(4))
    params = {"angle_deg": 45.0} if layout == "xy" else {"ms_width": 0.7}
    stereo = synth.render_capture(mono, azimuth, SR, capture("coincident", layout=layout, **params))
    n = stereo.shape[1]
    cc = np.fft.irfft(np.fft.rfft(stereo[0], 2 * n) * np.conj(np.fft.rfft(stereo[1], 2 * n)))
    assert np.argmax(np.abs(cc)) == 0  # zero delay: the channels are scaled copies (no phase difference)
    assert np.allclose(stereo[0] / np.abs(stereo[0]).max(), stereo[1] / np.abs(stereo[1]).max(), atol=1e-6)
    level = ild_db(stereo, 100, 8000)
    assert np.sign(level) == np.sign(azimuth) and abs(level) > 0.5  # right louder for a source on the right


def test_binaural_heads_vary_and_keep_their_cues():
    """Head size scales the ITD; an ear set back changes the level difference; a mirrored head mirrors the sound."""
    mono = synth.source_signal("noise", 2 * SR, SR, np.random.default_rng(5))
    small, big = (synth.render_capture(mono, 30.0, SR, capture("binaural", head_radius_m=r)) for r in (0.07, 0.10))
    lag_small, lag_big = (gcc_phat_lag(s[0], s[1], 12) for s in (small, big))
    assert 0 < lag_small < lag_big and lag_big / lag_small == pytest.approx(0.10 / 0.07, rel=0.15)
    sym = synth.render_capture(mono, 30.0, SR, capture("binaural"))
    back = synth.render_capture(mono, 30.0, SR, capture("binaural", ear_offset_deg=[0.0, 15.0]))
    assert ild_db(back, 2000, 8000) < ild_db(sym, 2000, 8000) - 0.5  # the right ear set back: less of a boost
    assert ild_db(back, 2000, 8000) > 2.0  # but still on the right


def test_mics_option_restricts_the_draw_and_the_sidecar_records_the_setup(tmp_path):
    cfg = synth.SynthConfig(mics=("spaced", "coincident"))
    drawn = [synth.draw_capture(np.random.default_rng(i), cfg) for i in range(60)]
    assert {c["type"] for c in drawn} == {"spaced", "coincident"}
    assert all(0.10 <= c["spacing_m"] <= 0.60 for c in drawn if c["type"] == "spaced")
    assert {c["layout"] for c in drawn if c["type"] == "coincident"} == {"xy", "ms"}
    every = {synth.draw_capture(np.random.default_rng(i), synth.SynthConfig())["type"] for i in range(80)}
    assert every == set(synth.MIC_TYPES)
    with pytest.raises(ValueError, match="mics must be a non-empty subset"):
        synth.SynthConfig(mics=("shotgun",))
    synth.main(["--out", str(tmp_path), "--clips", "2", "--seed", "1", "--duration", "1", "--size", "64",
                "--workers", "1", "--mics", "phone"])
    for row in read_manifest(tmp_path):
        meta = json.loads((tmp_path / row["meta"]).read_text())
        assert meta["render"]["capture"]["type"] == "phone" and 0.02 <= meta["render"]["capture"]["spacing_m"] <= 0.16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six default-style clips (3 scenes), a third of them through the AAC round trip."""
    root = tmp_path_factory.mktemp("synth")
    return root, synth.generate(root, 6, seed=11, workers=1, lossy_audio_prob=0.5, **SMALL)


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    """Single-source binaural clips without noise or reverb, where the louder channel must follow the object."""
    root = tmp_path_factory.mktemp("synth_clean")
    return root, synth.generate(root, 8, seed=5, workers=1, noise=False, reverb_prob=0.0, two_source_prob=0.0,
                                mics=("binaural",), **SMALL)


def sidecars(root, rows):
    return [json.loads((root / row["meta"]).read_text()) for row in rows]


def test_clip_files_follow_the_contract(dataset):
    root, rows = dataset
    assert [row["clip_id"] for row in rows] == ["s000000_c0", "s000000_c1", "s000001_c0", "s000001_c1",
                                                "s000002_c0", "s000002_c1"]
    for row, meta in zip(rows, sidecars(root, rows)):
        probe = ffprobe(root / row["video"], "stream=codec_type,codec_name,width,height,r_frame_rate,nb_read_frames,"
                                             "pix_fmt", "frame=key_frame")
        assert [s["codec_type"] for s in probe["streams"]] == ["video"], "no audio stream in the webm"
        video = probe["streams"][0]
        assert (video["codec_name"], video["width"], video["height"], video["pix_fmt"]) == ("vp9", 128, 128, "yuv420p")
        assert video["r_frame_rate"] == "6/1" and int(video["nb_read_frames"]) == row["num_frames"] == 18
        keyframes = [i for i, frame in enumerate(probe["frames"]) if frame["key_frame"]]
        assert keyframes == [0, 6, 12], "one keyframe per second"
        info = sf.info(root / row["audio"])
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SR, 2, 3 * SR, "PCM_16")
        audio, _ = sf.read(root / row["audio"])
        assert 0.1 < np.abs(audio).max() < 1.0, "peak-normalised, never clipping"

        assert {k: meta[k] for k in ("clip_id", "scene_id", "duration_s", "fps", "num_frames", "sample_rate",
                                     "channels")} == {k: row[k] for k in ("clip_id", "scene_id", "duration_s", "fps",
                                                                          "num_frames", "sample_rate", "channels")}
        assert meta["source"] == "synthetic" and (meta["width"], meta["height"]) == (128, 128)
        assert 50 <= meta["camera"]["hfov_deg"] <= 100
        capture = meta["render"]["capture"]
        assert capture["type"] in synth.MIC_TYPES
        if capture["type"] == "binaural":
            assert 0.07 <= capture["head_radius_m"] == meta["render"]["head_radius_m"] <= 0.10
        else:
            assert meta["render"]["head_radius_m"] is None and 0 <= capture["spacing_m"] <= 0.6
        assert {"rt60_s", "snr_db", "lossy_audio"} <= meta["render"].keys()
        assert 1 <= sum(o["sounding"] for o in meta["objects"]) <= 2
        for obj in meta["objects"]:
            assert obj["class"] in synth.SOUNDING_CLASSES or (obj["class"] in synth.SILENT_CLASSES
                                                             and not obj["sounding"])
            assert obj["motion"] in synth.MOTIONS
            assert len(obj["boxes"]) == len(obj["azimuth_deg"]) == len(obj["elevation_deg"]) == meta["num_frames"]
            boxes = np.array(obj["boxes"])
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert any(meta["render"]["lossy_audio"] for meta in sidecars(root, rows))


def test_manifest_and_splits(dataset):
    root, rows = dataset
    assert read_manifest(root) == rows
    for row in rows:
        assert set(REQUIRED_FIELDS) <= row.keys() and row["split"] in SPLITS
        assert row["scene_id"] == row["clip_id"].split("_")[0]
        assert all((root / row[k]).is_file() for k in ("video", "audio", "meta"))
    scenes = {split: {r["scene_id"] for r in rows if r["split"] == split} for split in SPLITS}
    assert sum(len(s) for s in scenes.values()) == len({r["scene_id"] for r in rows}) == 3, "no scene in two splits"


def test_box_side_azimuth_and_louder_channel_agree(clean_dataset):
    root, rows = clean_dataset
    checked = agreed = 0
    for row, meta in zip(rows, sidecars(root, rows)):
        audio, _ = sf.read(root / row["audio"])
        (source,) = [o for o in meta["objects"] if o["sounding"]]
        hfov = np.radians(meta["camera"]["hfov_deg"])
        for obj in meta["objects"]:
            boxes = np.array(obj["boxes"], dtype=float)
            dx = (boxes[:, 0] + boxes[:, 2]) / 2 - 64
            dy = 64 - (boxes[:, 1] + boxes[:, 3]) / 2
            az, el = np.array(obj["azimuth_deg"]), np.array(obj["elevation_deg"])
            assert np.allclose(az, np.degrees(np.arctan(dx / 64 * np.tan(hfov / 2))), atol=0.01), "pinhole model"
            assert (np.sign(az) == np.sign(dx)).all() and (np.sign(el) == np.sign(dy)).all()
        if source["motion"] in ("static", "up-down"):
            assert np.abs(source["azimuth_deg"]).min() >= synth.SynthConfig().min_offcentre_deg - 0.5
        for i, az in enumerate(source["azimuth_deg"]):  # the channel on the object's side is louder, frame by frame
            window = audio[max(0, int((i / 6 - 0.25) * SR)):int((i / 6 + 0.25) * SR)].T
            if abs(az) >= 8 and np.mean(window ** 2) > 1e-5:
                checked += 1
                agreed += np.sign(ild_db(window, 2000, 8000)) == np.sign(az)
    assert checked >= 40 and agreed / checked >= 0.9, (agreed, checked)


def test_moving_objects_move_and_static_ones_do_not(dataset, clean_dataset):
    motions = set()
    for root, rows in (dataset, clean_dataset):
        for meta in sidecars(root, rows):
            for obj in meta["objects"]:
                boxes = np.array(obj["boxes"], dtype=float)
                centre_range = np.ptp((boxes[:, :2] + boxes[:, 2:]) / 2, axis=0)  # (x, y) over the clip
                motions.add(obj["motion"])
                if obj["motion"] == "static":
                    assert (centre_range == 0).all()
                else:
                    axes = {"left-right": [0], "up-down": [1], "diagonal": [0, 1]}[obj["motion"]]
                    assert (centre_range[axes] > 10).all(), (obj["motion"], centre_range)
                    if obj["motion"] != "diagonal":
                        assert centre_range[1 - axes[0]] == 0
    assert {"static", "left-right"} <= motions, "the fixtures should cover static and moving objects"


def test_same_seed_same_dataset_whatever_the_workers(dataset, tmp_path):
    root, rows = dataset
    synth.main(["--out", str(tmp_path), "--clips", "6", "--seed", "11", "--duration", "3", "--size", "128",
                "--lossy-audio-prob", "0.5", "--workers", "2"])
    assert read_manifest(tmp_path) == rows
    for row in rows:
        assert sf.read(tmp_path / row["audio"])[0].tobytes() == sf.read(root / row["audio"])[0].tobytes()
        for key in ("audio", "meta", "video"):
            assert (tmp_path / row[key]).read_bytes() == (root / row[key]).read_bytes(), (row["clip_id"], key)
    other = synth.generate(tmp_path / "other", 1, seed=12, workers=1, **SMALL)
    assert sf.read(tmp_path / "other" / other[0]["audio"])[0].tobytes() != sf.read(root / rows[0]["audio"])[0].tobytes()


def test_thirty_fps_and_config_checks(tmp_path):
    (row,) = synth.generate(tmp_path, 1, seed=0, workers=1, fps=30, duration_s=1.0, size=64)
    probe = ffprobe(tmp_path / row["video"], "stream=r_frame_rate,nb_read_frames", "frame=key_frame")
    assert probe["streams"][0]["r_frame_rate"] == "30/1" and int(probe["streams"][0]["nb_read_frames"]) == 30
    assert [i for i, frame in enumerate(probe["frames"]) if frame["key_frame"]] == [0]
    meta = json.loads((tmp_path / row["meta"]).read_text())
    assert row["num_frames"] == 30 and all(len(obj["boxes"]) == 30 for obj in meta["objects"])
    with pytest.raises(ValueError):
        synth.SynthConfig(size=255)
    with pytest.raises(ValueError):
        synth.SynthConfig(reverb_prob=1.5)


def decode_frames(path, size, width=None, count=None):
    """RGB frames (n, size, width or size, 3) as floats: every frame, or the first `count`."""
    limit = ["-frames:v", str(count)] if count else []
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), *limit, "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, width or size, 3).astype(float)


def twin_sets(tmp_path, seed: int, opts: dict, cli: list[str], key: str, value) -> list[tuple[dict, dict, Path, Path]]:
    """The same seed rendered twice, by `synth.generate(**opts)` and by `flipray synth` with `cli` (the same options
    plus the one under test, SynthConfig `key` = `value`); asserts that both share the manifest, every FLAC byte for
    byte and every object's record, and returns (row, sidecar, plain root, other root) per clip for the pictures."""
    a, b = tmp_path / "plain", tmp_path / "other"
    rows = synth.generate(a, 4, seed=seed, workers=1, **opts)
    synth.main(["--out", str(b), "--clips", "4", "--seed", str(seed), "--workers", "1", *cli])
    assert read_manifest(b) == rows
    twins = []
    for row in rows:
        assert (a / row["audio"]).read_bytes() == (b / row["audio"]).read_bytes()
        meta_a, meta_b = (json.loads((root / row["meta"]).read_text()) for root in (a, b))
        assert meta_a["objects"] == meta_b["objects"] and meta_b["generator"]["config"][key] == value
        twins.append((row, meta_a, a, b))
    return twins


def test_novel_looks_change_the_objects_pictures_and_nothing_else(tmp_path):
    """--novel-look-prob 1: the same scenes, motions and audio as the class looks of the same seed; only the objects'
    pixels differ (the held-out "objects never seen" sets of docs/stereo.md rely on it)."""
    opts = dict(duration_s=1.0, size=128, two_source_prob=1.0, max_distractors=0)
    cli = ["--duration", "1", "--size", "128", "--two-source-prob", "1", "--max-distractors", "0",
           "--novel-look-prob", "1"]
    for row, meta, a, b in twin_sets(tmp_path, 7, opts, cli, "novel_look_prob", 1.0):
        frame_a, frame_b = (decode_frames(root / row["video"], 128, count=1)[0] for root in (a, b))
        inside = np.zeros((128, 128), bool)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["boxes"][0]
            inside[max(y0, 0):y1, max(x0, 0):x1] = True
        background = ~binary_dilation(inside, iterations=4)  # a few pixels off the boxes: the codec's blocks spill
        assert np.abs(frame_a - frame_b)[background].mean() < 2.0
        assert np.abs(frame_a - frame_b)[inside].mean() > 15.0, row["clip_id"]
    with pytest.raises(ValueError, match="novel_look_prob must be a probability"):
        synth.SynthConfig(novel_look_prob=2.0)


def test_clutter_paints_static_things_into_the_backdrop_and_changes_nothing_else(tmp_path):
    """--clutter-prob 1: the same scenes, objects, motions and audio as the same seed without it; the backdrop, the
    same in every frame, holds things at full contrast (the held-out "cluttered scenes" set of docs/stereo.md)."""
    opts = dict(duration_s=1.0, size=128, max_distractors=0, clips_per_scene=1)
    cli = ["--duration", "1", "--size", "128", "--max-distractors", "0", "--clips-per-scene", "1",
           "--clutter-prob", "1"]
    for row, meta_a, a, b in twin_sets(tmp_path, 5, opts, cli, "clutter_prob", 1.0):
        frames_a, frames_b = (decode_frames(root / row["video"], 128) for root in (a, b))
        outside = np.ones((128, 128), bool)
        for obj in meta_a["objects"]:
            for x0, y0, x1, y1 in obj["boxes"]:
                outside[max(y0, 0):y1, max(x0, 0):x1] = False
        outside = ~binary_dilation(~outside, iterations=4)  # a few pixels off the boxes: the codec's blocks spill
        diff = np.abs(frames_a - frames_b).mean(-1)[:, outside]  # (frames, pixels off every object)
        assert (diff > 40).mean() > 0.05, row["clip_id"]  # things painted in at full contrast, not a colour shift
        changed = diff[0] > 40
        assert np.abs(frames_b[-1] - frames_b[0]).mean(-1)[outside][changed].mean() < 3  # and they stay put
    with pytest.raises(ValueError, match="clutter_prob must be a probability"):
        synth.SynthConfig(clutter_prob=1.5)


def test_head_detail_notches_each_ear_and_lengthens_the_low_frequency_delay():
    """render_binaural's `detail`: each ear's notch where its angle to the source puts it, as deep as drawn, and a
    low-frequency time difference larger than the sphere's by (lf_itd_gain - 1) x Woodworth's."""
    sr, az = 16000, 40.0  # a source 40 deg right: 130 deg off the left ear's axis, 50 deg off the right ear's
    x = np.random.default_rng(0).standard_normal(2 * sr)
    detail = {"lf_itd_gain": 1.5, "notches": [[[4500.0, 10.0, 12.0, 4.0]], [[7000.0, -10.0, 12.0, 4.0]]],
              "ripple_db": [[0.0] * 8, [0.0] * 8]}
    sphere, head = synth.render_binaural(x, az, sr), synth.render_binaural(x, az, sr, detail=detail)
    f = np.fft.rfftfreq(sphere.shape[1], 1 / sr)
    ratio_db = 20 * np.log10(np.abs(np.fft.rfft(head)) / np.abs(np.fft.rfft(sphere)))  # (ears, F): the added response

    def at(ear, hz):
        return ratio_db[ear, np.abs(f - hz) < 20].mean()
    assert at(0, 4500 + 10 * 40) == pytest.approx(-12, abs=1.0) and at(1, 7000 + 10 * 40) == pytest.approx(-12, abs=1.0)
    assert at(0, 7400) > -3 and at(1, 4900) > -3  # each ear's notch is its own
    assert abs(at(0, 1000)) < 0.5 and abs(at(1, 1000)) < 0.5

    def low_delay_ms(stereo):  # left-to-right group delay, the cross-spectrum's phase slope over 200-600 Hz
        middle = stereo[:, sr // 4:-sr // 4]
        spec, hz = np.fft.rfft(middle), np.fft.rfftfreq(middle.shape[1], 1 / sr)
        band = (hz >= 200) & (hz <= 600)
        return -np.polyfit(2 * np.pi * hz[band], np.unwrap(np.angle(spec[0, band] * spec[1, band].conj())), 1)[0] * 1e3
    woodworth_ms = 0.0875 / 343 * (np.radians(az) + np.sin(np.radians(az))) * 1e3
    extra = low_delay_ms(head) - low_delay_ms(sphere)
    r = 400 / 1500  # the band's middle over the taper's corner: d(w tau(f))/dw there is (1 - r^2) / (1 + r^2)^2 x
    assert extra == pytest.approx(0.5 * woodworth_ms * (1 - r ** 2) / (1 + r ** 2) ** 2, rel=0.1)  # (g - 1) tau


def test_head_detail_changes_binaural_clips_audio_and_nothing_else(tmp_path):
    """--head-detail-prob 1: every binaural clip's head has a `detail` in its sidecar and new audio; the other clips,
    every picture and every object are those of the same seed without it."""
    opts = dict(duration_s=1.0, size=64, max_distractors=0, clips_per_scene=1, mics=("binaural", "spaced"))
    a, b = tmp_path / "plain", tmp_path / "heads"
    rows = synth.generate(a, 6, seed=2, workers=1, **opts)
    synth.main(["--out", str(b), "--clips", "6", "--seed", "2", "--workers", "1", "--duration", "1", "--size", "64",
                "--max-distractors", "0", "--clips-per-scene", "1", "--mics", "binaural,spaced",
                "--head-detail-prob", "1"])
    assert read_manifest(b) == rows
    kinds = []
    for row in rows:
        meta_a, meta_b = (json.loads((root / row["meta"]).read_text()) for root in (a, b))
        capture_a, capture_b = meta_a["render"]["capture"], meta_b["render"]["capture"]
        kinds.append(capture_a["type"])
        assert meta_a["objects"] == meta_b["objects"] and "detail" not in capture_a
        assert {k: v for k, v in capture_b.items() if k != "detail"} == capture_a
        assert (a / row["video"]).read_bytes() == (b / row["video"]).read_bytes()
        same_audio = (a / row["audio"]).read_bytes() == (b / row["audio"]).read_bytes()
        if capture_a["type"] == "binaural":
            assert not same_audio and 1.2 <= capture_b["detail"]["lf_itd_gain"] <= 1.6
        else:
            assert same_audio and "detail" not in capture_b
    assert set(kinds) == {"binaural", "spaced"}
    with pytest.raises(ValueError, match="head_detail_prob must be a probability"):
        synth.SynthConfig(head_detail_prob=-0.1)


def test_sync_pulse_grows_each_sounding_object_with_its_own_sound(tmp_path):
    """--sync-pulse 0.5: a sounding object is 1.5x its size in its loudest frame and follows its sound's loudness
    frame by frame; silent objects, the audio and the rest of the picture are those of the same seed without it."""
    opts = dict(duration_s=2.0, size=128, two_source_prob=0.0, max_distractors=1, noise=False, reverb_prob=0.0,
                clips_per_scene=1)
    rows = synth.generate(tmp_path / "plain", 4, seed=11, workers=1, **opts)
    synth.main(["--out", str(tmp_path / "pulsed"), "--clips", "4", "--seed", "11", "--duration", "2", "--size", "128",
                "--two-source-prob", "0", "--max-distractors", "1", "--no-noise", "--reverb-prob", "0",
                "--clips-per-scene", "1", "--sync-pulse", "0.5", "--workers", "1"])
    silent_seen = 0
    for row in rows:
        a, b = tmp_path / "plain", tmp_path / "pulsed"
        assert (a / row["audio"]).read_bytes() == (b / row["audio"]).read_bytes()
        plain, pulsed = (json.loads((root / row["meta"]).read_text())["objects"] for root in (a, b))
        for obj_a, obj_b in zip(plain, pulsed):
            if not obj_a["sounding"]:
                assert obj_b["boxes"] == obj_a["boxes"]
                silent_seen += 1
                continue
            width = np.array([x1 - x0 for x0, _, x1, _ in obj_b["boxes"]], float)
            base = obj_a["boxes"][0][2] - obj_a["boxes"][0][0]
            assert all(x1 - x0 == base for x0, _, x1, _ in obj_a["boxes"])
            audio, sr = sf.read(b / row["audio"])
            loudness = synth.frame_loudness(audio.mean(1), sr, 6, len(width))
            inside = [0 < x0 and x1 < 128 for x0, _, x1, _ in obj_b["boxes"]]
            loudest = int(np.argmax(width))  # its own sound's loudest frame (the recording mixes in the room)
            if inside[loudest]:
                assert width[loudest] == round(base * 1.5)
            assert width.min() >= base and np.corrcoef(width, loudness)[0, 1] > 0.9, (row["clip_id"], width)
            # the picture: the grown object covers background that the plain one leaves; nothing else changes
            frame_a, frame_b = (decode_frames(root / row["video"], 128)[loudest] for root in (a, b))
            mask = lambda box: np.pad(np.ones((box[3] - box[1], box[2] - box[0]), bool),
                                      ((box[1], 128 - box[3]), (box[0], 128 - box[2])))
            small, big = mask(obj_a["boxes"][loudest]), mask(obj_b["boxes"][loudest])
            ring = big & ~binary_dilation(small, iterations=2)
            far = ~binary_dilation(big, iterations=4)
            for other in plain:
                if other is not obj_a:
                    far &= ~binary_dilation(mask(other["boxes"][loudest]), iterations=4)
            # (the ring's corners are background around a round object: compare with the codec noise elsewhere)
            noise = np.abs(frame_a - frame_b)[far].mean()
            assert noise < 2.0 and np.abs(frame_a - frame_b)[ring].mean() > 5 * max(noise, 1.0), row["clip_id"]
    assert silent_seen  # the seed has at least one distractor to compare
    with pytest.raises(ValueError, match="sync_pulse must be"):
        synth.SynthConfig(sync_pulse=1.5)


def test_wide_frames_put_objects_and_their_sound_where_the_wider_camera_sees_them(tmp_path):
    """--width 256 at --size 128: 16:9-ish clips whose objects roam the whole width; an object's azimuth sign is its
    side of the frame's centre column, and its sound comes from that side."""
    rows = synth.generate(tmp_path, 4, seed=5, workers=1, duration_s=2.0, size=128, width=256, two_source_prob=0.0,
                          max_distractors=0, noise=False, reverb_prob=0.0, mics=("coincident",))
    xs = []
    for row in rows:
        meta = json.loads((tmp_path / row["meta"]).read_text())
        assert (meta["width"], meta["height"]) == (256, 128)
        assert len(decode_frames(tmp_path / row["video"], 128, 256)) == 12
        obj = meta["objects"][0]
        for (x0, y0, x1, y1), az in zip(obj["boxes"], obj["azimuth_deg"]):
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 128
            assert np.sign(az) == np.sign((x0 + x1) / 2 - 128)
            xs.append((x0 + x1) / 2)
        audio, _ = sf.read(tmp_path / row["audio"])
        level = 10 * np.log10((audio[:, 1] ** 2).sum() / (audio[:, 0] ** 2).sum())  # coincident: level only
        assert np.sign(level) == np.sign(np.mean(obj["azimuth_deg"])), row["clip_id"]
    assert max(xs) > 128 + 64 or min(xs) < 128 - 64  # objects reach beyond a centre 128 x 128 crop
    with pytest.raises(ValueError, match="width must be 0"):
        synth.SynthConfig(size=128, width=100)


def test_image_source_reflections_arrive_when_and_from_where_the_room_sends_them():
    """Each of the six first-order reflections of an impulse arrives at the extra path's delay, with the amplitude
    of 1/distance times the wall's coefficient, and from its image's side: the far side wall's reflection of a
    source on the right reaches a spaced pair's left capsule first."""
    room = synth.draw_shoebox(np.random.default_rng(4), 8.0, synth.SynthConfig())
    n, at = 4 * SR, 1000
    impulse = np.zeros(n)
    impulse[at] = 1.0
    capture = {"type": "spaced", "spacing_m": 0.5, "pattern": "omni"}
    out = synth.image_source_reflections(impulse, 40.0, 0.0, SR, capture, room, 2.0)
    dims, mic, beta = np.array(room["room_dims_m"]), np.array(room["mic_m"]), room["wall_reflection"]
    assert 0.5 <= beta <= 0.9 and dims[0] == 8.0 and np.all((mic > 0) & (mic < dims))
    src = mic + 2.0 * np.array([np.sin(np.radians(40)), np.cos(np.radians(40)), 0.0])
    arrivals = []
    for axis in range(3):
        for wall in (0.0, dims[axis]):
            image = src.copy()
            image[axis] = 2 * wall - src[axis]
            v = image - mic
            dist = np.linalg.norm(v)
            arrivals.append((at + (dist - 2.0) / 343.0 * SR, beta * 2.0 / dist, v[0] / dist))
    # arrivals within 60 samples of another overlap in the window below; the room drawn here keeps 3 of 6 apart,
    # the far wall's among them
    apart = [a for a in arrivals if all(abs(a[0] - b[0]) > 60 for b in arrivals if b is not a)]
    assert len(apart) >= 3 and arrivals[0] in apart
    for lag, gain, lateral in apart:
        span = slice(int(lag) - 30, int(lag) + 31)
        energy = np.sqrt(np.sum(out[:, span] ** 2, axis=1))  # a fractional delay spreads the impulse, keeps its energy
        assert np.all(np.abs(energy - gain) < 0.1 * gain), (lag, gain, energy)
        first_left, first_right = (int(np.argmax(np.abs(out[c, span]))) for c in (0, 1))
        expected = 0.5 * lateral / 343.0 * SR  # samples by which the left capsule trails
        assert abs((first_left - first_right) - expected) <= 1.5, (lag, lateral, first_left, first_right)
    far_wall = arrivals[0]  # x = 0, the left wall: its image is left of the camera although the source is right
    assert far_wall[2] < -0.3


def test_image_source_rooms_change_only_the_reverberant_clips_audio(tmp_path):
    """--reflections image-source: the same scenes, pictures and dry clips as the diffuse rooms of the same seed;
    reverberant clips get the room's first-order reflections, and the sidecar says which room."""
    opts = dict(duration_s=1.0, size=64, max_distractors=0, reverb_prob=0.5, two_source_prob=0.5)
    rows = synth.generate(tmp_path / "diffuse", 6, seed=11, workers=1, **opts)
    synth.main(["--out", str(tmp_path / "image"), "--clips", "6", "--seed", "11", "--duration", "1", "--size", "64",
                "--max-distractors", "0", "--reverb-prob", "0.5", "--two-source-prob", "0.5",
                "--reflections", "image-source", "--workers", "1"])
    assert read_manifest(tmp_path / "image") == rows
    kinds = set()
    for row in rows:
        a, b = (tmp_path / "diffuse", tmp_path / "image")
        meta_a, meta_b = (json.loads((root / row["meta"]).read_text()) for root in (a, b))
        assert (a / row["video"]).read_bytes() == (b / row["video"]).read_bytes()
        same_audio = (a / row["audio"]).read_bytes() == (b / row["audio"]).read_bytes()
        reverberant = meta_a["render"]["rt60_s"] is not None
        kinds.add(reverberant)
        assert same_audio == (not reverberant), row["clip_id"]
        assert ("image_source" in meta_b["render"]) == reverberant and "image_source" not in meta_a["render"]
        if reverberant:  # one room per clip, a distance per sounding object
            sounding = sum(o["sounding"] for o in meta_b["objects"])
            assert len(meta_b["render"]["image_source"]["source_distance_m"]) == sounding
        assert meta_b["generator"]["config"]["reflections"] == "image-source"
    assert kinds == {True, False}
    with pytest.raises(ValueError, match="reflections must be one of diffuse, image-source"):
        synth.SynthConfig(reflections="shoebox")


def test_novel_sounds_change_the_sounding_objects_audio_and_nothing_else(tmp_path):
    """--novel-sound-prob 1: every sounding object sounds like a family no class has (the sidecar names it), from
    the same side; pictures, boxes and the rest of the sidecar are those of the same seed with class sounds."""
    opts = dict(duration_s=2.0, size=64, two_source_prob=0.0, max_distractors=1, noise=False, reverb_prob=0.0,
                mics=("coincident",))
    known = synth.generate(tmp_path / "classes", 6, seed=9, workers=1, **opts)
    synth.main(["--out", str(tmp_path / "novel"), "--clips", "6", "--seed", "9", "--duration", "2", "--size", "64",
                "--two-source-prob", "0", "--max-distractors", "1", "--no-noise", "--reverb-prob", "0",
                "--mics", "coincident", "--novel-sound-prob", "1", "--workers", "1"])
    assert read_manifest(tmp_path / "novel") == known
    families = set()
    for row in known:
        a, b = tmp_path / "classes", tmp_path / "novel"
        meta_a, meta_b = (json.loads((root / row["meta"]).read_text()) for root in (a, b))
        assert (a / row["video"]).read_bytes() == (b / row["video"]).read_bytes()
        for obj_a, obj_b in zip(meta_a["objects"], meta_b["objects"]):
            assert {**obj_a, "family": None} == {**obj_b, "family": None}
            if obj_b["sounding"]:
                assert obj_a["family"] in synth.FAMILIES and obj_b["family"] in synth.NOVEL_FAMILIES
                families.add(obj_b["family"])
        audio_a, audio_b = (sf.read(root / row["audio"])[0].T for root in (a, b))
        assert np.linalg.norm(audio_a - audio_b) > 0.5 * np.linalg.norm(audio_a), row["clip_id"]  # another sound
        # the same place heard by the same coincident pair: the same level difference frame by frame, whatever sounds
        gaps = []
        for i in range(meta_a["num_frames"]):
            span = slice(max(0, int((i / 6 - 0.25) * SR)), int((i / 6 + 0.25) * SR))
            windows = audio_a[:, span], audio_b[:, span]
            if min(np.mean(w ** 2) for w in windows) > 1e-5:
                gaps.append(abs(ild_db(windows[0], 100, 7000) - ild_db(windows[1], 100, 7000)))
        # (a static object: equal; a moving one moves within a window, where each sound weighs the frames its own
        # way: up to 0.6 dB here, against 3 dB or more for the other side)
        bound = 0.05 if meta_a["objects"][0]["motion"] == "static" else 0.75
        assert len(gaps) >= 3 and np.median(gaps) < bound, (row["clip_id"], gaps)
    assert len(families) >= 2
    with pytest.raises(ValueError, match="novel_sound_prob must be a probability"):
        synth.SynthConfig(novel_sound_prob=-0.1)


# A process holding a dataset folder's write lock, as a `flipray synth` or ingest run into it does; "write" on its stdin
# makes it render four clips into the folder before it lets go.
_LOCK_HOLDER = textwrap.dedent("""
    import sys
    from flipray.dataset.manifest import manifest_lock
    from flipray.synth import scenes
    with manifest_lock(sys.argv[1]):
        print("held", flush=True)
        if sys.stdin.readline().strip() == "write":
            scenes.generate(sys.argv[1], 4, seed=1, duration_s=1.0, size=64, workers=1)
""")


def test_a_run_into_a_folder_another_run_is_writing_waits_for_it_and_keeps_its_clips(tmp_path):
    """Two runs into one folder at once: the second waits for the first (one line says for whom), then plans from
    the first's manifest, so neither drops the other's clips (before the lock, a smaller run that started while a
    larger one was rendering wrote its manifest last and unlisted the larger one's clips). A holder that is killed
    leaves no lock behind."""
    root = tmp_path / "ds"

    def hold():
        proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(root)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "held\n"
        return proc

    def manifest():
        return (root / "manifest.jsonl").read_bytes() if (root / "manifest.jsonl").exists() else None

    def synth_waiting_for(holder, clips):
        before = manifest()
        run = subprocess.Popen([sys.executable, "-m", "flipray.synth.scenes", "--out", str(root), "--clips",
                                str(clips), "--seed", "1", "--duration", "1", "--size", "64", "--workers", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert run.stderr.readline() == (f"{root}: another process is writing this dataset (pid {holder.pid}); "
                                         f"waiting for it to finish\n")
        time.sleep(0.5)
        assert run.poll() is None and manifest() == before  # still waiting, nothing written
        return run

    holder = hold()
    run = synth_waiting_for(holder, 2)
    holder.kill()  # the kernel drops a dead process's lock
    holder.wait()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert [r["clip_id"] for r in read_manifest(root)] == ["s000000_c0", "s000000_c1"]

    holder = hold()
    run = synth_waiting_for(holder, 1)
    holder.stdin.write("write\n")
    holder.stdin.close()
    assert holder.wait(timeout=120) == 0
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert f"{root}: 4 clips of this seed and config already there, kept; 0 to make" in out
    fresh = synth.generate(tmp_path / "fresh", 4, seed=1, duration_s=1.0, size=64, workers=1)
    assert read_manifest(root) == fresh  # the holder's four clips stay listed after the smaller run's write


def test_a_cut_off_runs_temporary_files_are_removed_by_the_next_run(tmp_path):
    """A run cut off by a full disk or a kill can leave flipray.atomic's temporary files in clips/ (the pool is
    terminated mid-write); the next run into the folder removes those of synth's clips, and nothing else."""
    root = tmp_path / "ds"
    (root / "clips").mkdir(parents=True)
    leftovers = [".s000000_c0.webm-k2j3h4.webm", ".s000001_c1.flac-x7y8.tmp", ".p000002_c0.json-abc.tmp"]
    others = [".hidden-notes", "notes.txt", ".s000000_c0.webm"]
    for name in leftovers + others:
        (root / "clips" / name).write_bytes(b"partial")
    synth.generate(root, 2, seed=1, duration_s=1.0, size=64, workers=1)
    names = {p.name for p in (root / "clips").iterdir()}
    assert not names & set(leftovers) and set(others) <= names


def test_a_dataset_there_is_kept_and_one_made_otherwise_is_refused(tmp_path):
    """`flipray synth --out` into a folder that holds a dataset: the same seed and config keep every listed clip
    untouched (again: nothing made; more --clips: added; fewer: all still listed; a listed clip whose file is gone:
    made again); another seed or config, or clips no generator made, are refused before anything is written."""
    from flipray.overrides import UsageError
    tiny = dict(duration_s=1.0, size=64, workers=1)
    root = tmp_path / "ds"
    rows = synth.generate(root, 4, seed=1, **tiny)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (root / "clips").iterdir()}
    manifest = (root / "manifest.jsonl").read_bytes()
    for seed, options, reason in [(2, {}, "s000000_c0: seed 1, not 2"),
                                  (1, {"two_source_prob": 0.5}, "s000000_c0: another config (two_source_prob)")]:
        with pytest.raises(UsageError) as refused:
            synth.generate(root, 2, seed=seed, **tiny, **options)
        assert f"holds a dataset of 4 clips made otherwise ({reason}); writing here would" in str(refused.value)
    assert (root / "manifest.jsonl").read_bytes() == manifest
    assert synth.generate(root, 4, seed=1, **tiny) == rows  # the same command: nothing made
    assert synth.generate(root, 2, seed=1, **tiny) == rows  # fewer: every listed clip stays listed
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (root / "clips").iterdir()} == files
    more = synth.generate(root, 6, seed=1, **tiny)
    assert [r["clip_id"] for r in more] == [f"s{s:06d}_c{k}" for s in range(3) for k in range(2)]
    assert all(files[p] == (p.read_bytes(), p.stat().st_mtime_ns) for p in files)  # the first four untouched
    assert more == synth.generate(tmp_path / "fresh", 6, seed=1, **tiny)  # as a fresh run of 6 (splits included)
    (root / rows[1]["audio"]).unlink()
    (root / rows[2]["meta"]).unlink()
    assert synth.generate(root, 2, seed=1, **tiny) == more  # both made again
    assert (root / rows[1]["audio"]).is_file() and (root / rows[2]["meta"]).is_file()
    # a dataset made before a knob existed (synth.ADDED_LATER) is kept by a run at the knob's neutral value only
    for row in more:
        sidecar = json.loads((root / row["meta"]).read_text())
        for knob in synth.ADDED_LATER:
            del sidecar["generator"]["config"][knob]
        (root / row["meta"]).write_text(json.dumps(sidecar))
    before = {p: p.stat().st_mtime_ns for p in (root / "clips").iterdir()}
    assert synth.generate(root, 6, seed=1, **tiny) == more
    assert {p: p.stat().st_mtime_ns for p in (root / "clips").iterdir()} == before
    for knob in synth.ADDED_LATER:
        with pytest.raises(UsageError, match=rf"another config \({knob}\)"):
            synth.generate(root, 6, seed=1, **{knob: 0.5}, **tiny)
    # a dataset of user clips (ingest's sidecars have no generator record) is refused the same way
    sidecar = json.loads((root / rows[0]["meta"]).read_text())
    del sidecar["generator"]
    (root / rows[0]["meta"]).write_text(json.dumps(sidecar))
    with pytest.raises(UsageError, match="s000000_c0: its sidecar has no generator record"):
        synth.generate(root, 6, seed=1, **tiny)
