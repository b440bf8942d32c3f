"""The clip contract on real rendered clips: flip and joint-flip semantics, features, sampling, bad files."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flipray.config import load_config
from flipray.pretext.data import (AudioFeatures, ClipDataset, ClipDecodeError, EpochSampler, collate, decode_audio,
                          decode_video, draw_params, flip_channels, item_params, joint_flip, make_sample,
                          peak_normalise, sample_seed, window_frame_indices, window_samples_range)
from flipray.dataset.manifest import read_manifest


def _sounding(meta):
    return [o for o in meta["objects"] if o["sounding"]]


def _side_window(root: Path, cfg, side: int):
    """The (clip, start_frame) whose only sounding object stays furthest on one side (+1 right, -1 left) for a
    whole window."""
    best, best_az = None, 8.0  # at least 8 degrees off centre throughout the window
    for row in read_manifest(root):
        meta = json.loads((root / row["meta"]).read_text())
        objs = _sounding(meta)
        if len(objs) != 1:
            continue
        az = np.array(objs[0]["azimuth_deg"])
        for start in range(row["num_frames"] - cfg.window_frames + 1):
            worst = (side * az[start:start + cfg.window_frames]).min()
            if worst > best_az:
                best, best_az = (row, meta, objs[0], start), worst
    assert best is not None, f"no single-source clip with a sounding object on side {side} in {root}"
    return best


def _energy(wave):
    return (wave ** 2).mean(dim=-1)


@pytest.mark.parametrize("side", [+1, -1])
def test_flip_and_joint_flip_semantics_on_rendered_clips(synth_root, side):
    cfg = load_config("paper")
    row, meta, obj, start = _side_window(synth_root, cfg, side)
    idx = window_frame_indices(cfg, start)
    frames = decode_video(synth_root / row["video"], idx)
    s0, s1 = window_samples_range(cfg, start)
    wave = decode_audio(synth_root / row["audio"], 16000)[:, s0:s1]
    near, far = (1, 0) if side > 0 else (0, 1)
    e = _energy(wave)
    assert e[near] > 1.2 * e[far], f"source on side {side}: the near channel should be louder, got {e.tolist()}"

    # The pretext transform: channels swapped, the picture untouched -> the loud channel is now the wrong one.
    flipped = flip_channels(wave)
    assert torch.equal(flipped[0], wave[1]) and torch.equal(flipped[1], wave[0])
    assert _energy(flipped)[far] > 1.2 * _energy(flipped)[near]

    # The joint flip: mirror the picture AND swap the channels -> object and sound agree again, on the other side.
    mframes, mwave = joint_flip(frames, wave)
    W = frames.shape[2]
    x0, y0, x1, y1 = obj["boxes"][idx[0]]
    mx0, mx1 = W - x1, W - x0
    assert torch.equal(mframes[0, y0:y1, mx0:mx1], frames[0, y0:y1, x0:x1].flip(1))
    assert np.sign((mx0 + mx1) / 2 - W / 2) == -side          # the mirrored object is on the other side...
    assert _energy(mwave)[far] > 1.2 * _energy(mwave)[near]   # ...and so is the louder channel


def test_samples_carry_the_label_and_the_level_difference(synth_root):
    cfg = load_config("paper")
    row, meta, obj, start = _side_window(synth_root, cfg, +1)
    frames = decode_video(synth_root / row["video"], window_frame_indices(cfg, start), cfg.data.resize)
    s0, s1 = window_samples_range(cfg, start)
    wave = decode_audio(synth_root / row["audio"], 16000)[:, s0:s1]
    features = AudioFeatures(cfg)
    base = draw_params(cfg, row["num_frames"], seed=0, epoch=0, index=0, train=False, swap=False)
    base.start_frame = start
    keep = make_sample(frames, wave, base, cfg)
    assert keep["video"].shape == (18, 3, 224, 224) and keep["audio"].shape == (2, cfg.window_samples)
    assert keep["label"].item() == 0.0 and keep["audio"].abs().max().item() == pytest.approx(1.0)  # peak-normalised
    # log-mel of the right channel is higher for a source on the right, most of all at high frequencies
    hi = features(keep["audio"])[:, 64:].mean(dim=(1, 2))
    assert hi[1] > hi[0] + 0.1
    base.swap = True
    swapped = make_sample(frames, wave, base, cfg)
    assert swapped["label"].item() == 1.0
    assert torch.allclose(swapped["audio"], keep["audio"].flip(0))
    assert torch.equal(swapped["video"], keep["video"])
    base.swap, base.joint_flip = False, True
    jf = make_sample(frames, wave, base, cfg)
    assert jf["label"].item() == 0.0 and torch.allclose(jf["audio"], keep["audio"].flip(0))
    assert torch.allclose(jf["video"], keep["video"].flip(-1))
    # evaluation crops the centre, no jitter, then ImageNet normalisation: (v / 255 - mean) / std per channel
    assert (base.crop_x, base.crop_y, base.brightness, base.contrast, base.saturation) == (16, 16, 1.0, 1.0, 1.0)
    centre = frames[:, 16:240, 16:240].permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(keep["video"], (centre - mean) / std, atol=1e-5)


def test_params_are_deterministic_per_seed_epoch_index():
    cfg = load_config("paper")
    a = draw_params(cfg, 60, seed=0, epoch=3, index=7, train=True)
    assert a == draw_params(cfg, 60, seed=0, epoch=3, index=7, train=True)
    others = [draw_params(cfg, 60, seed=0, epoch=e, index=7, train=True) for e in range(4, 40)]
    assert any(o != a for o in others)
    assert 0.25 < np.mean([o.swap for o in others]) < 0.75 and 0 <= a.start_frame <= 60 - 18  # p = 0.5, 36 draws
    assert {o.joint_flip for o in others} == {True, False}
    assert all(0 <= o.crop_x <= 32 and 0 <= o.crop_y <= 32 for o in others)
    ev = draw_params(cfg, 60, seed=0, epoch=0, index=7, train=False, swap=True)
    assert (ev.crop_x, ev.crop_y, ev.brightness, ev.joint_flip, ev.swap) == (16, 16, 1.0, False, True)
    with pytest.raises(ValueError, match="shorter than the 18-frame window"):
        draw_params(cfg, 10, 0, 0, 0, True)


def test_epoch_sampler_shards_are_disjoint_cover_and_resume():
    full = [i for _, i in EpochSampler(10, seed=1, epoch=2)]
    assert sorted(full) == list(range(10)) and full != list(range(10))
    assert full != [i for _, i in EpochSampler(10, seed=1, epoch=3)]
    r0 = [i for _, i in EpochSampler(10, seed=1, epoch=2, rank=0, world=2)]
    r1 = [i for _, i in EpochSampler(10, seed=1, epoch=2, rank=1, world=2)]
    assert len(r0) == len(r1) == 5 and not set(r0) & set(r1) and set(r0) | set(r1) == set(range(10))
    uneven = [EpochSampler(10, seed=1, rank=r, world=3) for r in range(3)]
    assert [len(s) for s in uneven] == [4, 4, 4]  # padded so DDP ranks step together
    items = [i for s in uneven for _, i in s]
    assert sorted(i for i in items if i >= 0) == list(range(10))  # each item once; pads are -1 - item
    assert len([i for i in items if i < 0]) == 2 and all(-1 - i in range(10) for i in items if i < 0)
    resumed = [i for _, i in EpochSampler(10, seed=1, epoch=2, start=6)]
    assert resumed == full[6:]
    assert all(e == 2 for e, _ in EpochSampler(10, seed=1, epoch=2))


def test_epoch_sampler_steps_are_the_same_samples_at_any_world_size_and_reshard_from_a_checkpoint():
    """Steps of 4 positions over 10 items: a step is the same set on 1, 2 or 4 ranks, and the remainder of an
    epoch after position 4 (a checkpoint of world size 2) splits exactly over 1 or 4 ranks."""
    full = EpochSampler(10, seed=5, epoch=1, step_size=4).order()
    assert len(full) == 12 and full[10:] == [-1 - i for i in full[:2]]  # the last step padded to 4 positions
    full = full[:10]
    steps = [set(full[s:s + 4]) for s in (0, 4, 8)]
    for world in (1, 2, 4):
        orders = [EpochSampler(10, seed=5, epoch=1, rank=r, world=world, step_size=4).order() for r in range(world)]
        assert len({len(o) for o in orders}) == 1  # the same number of micro-batches on every rank
        k = 4 // world
        for j, step in enumerate(steps):
            assert {i for o in orders for i in o[j * k:(j + 1) * k] if i >= 0} == step
        for start in (4, 8):
            rest = [i for r in range(world) for i in
                    EpochSampler(10, seed=5, epoch=1, rank=r, world=world, start=start, step_size=4).order() if i >= 0]
            assert sorted(rest) == sorted(full[start:])
    with pytest.raises(ValueError, match="not divisible"):
        EpochSampler(10, seed=5, world=3, step_size=4)


def test_bad_files_raise_errors_that_name_the_file(synth_root, tmp_path):
    row = read_manifest(synth_root)[0]
    flac = synth_root / row["audio"]
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes(flac.read_bytes()[: flac.stat().st_size // 3])
    with pytest.raises(ClipDecodeError, match="truncated.flac.*(truncated|cannot decode)"):
        decode_audio(truncated, 16000, expect_seconds=row["duration_s"])
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(b"\x1a\x45\xdf\xa3" + b"not a video" * 100)
    with pytest.raises(ClipDecodeError, match="garbage.webm: cannot decode video"):
        decode_video(garbage)
    video = synth_root / row["video"]
    cut = tmp_path / "cut.webm"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    with pytest.raises(ClipDecodeError, match="cut.webm"):
        decode_video(cut, expect_frames=row["num_frames"])
    with pytest.raises(ClipDecodeError, match=r"truncated.flac.*|audio has 1 channel"):
        mono = tmp_path / "mono.flac"
        import soundfile
        soundfile.write(mono, np.zeros(16000, dtype=np.float32), 16000)
        decode_audio(mono, 16000, channels=2)


@pytest.mark.parametrize("cache", [False, True])
def test_dataset_skips_and_counts_a_corrupt_clip(synth_root, tmp_path, cache):
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    rows = read_manifest(root, "train")
    bad = rows[0]
    (root / bad["video"]).write_bytes(b"garbage")
    cfg = load_config("demo", [f"data.root={root}", f"data.cache={str(cache).lower()}"])
    ds = ClipDataset(cfg, "train", train=True)
    samples = [ds[(0, i)] for i in range(len(ds))]
    batch = collate(samples)
    good = 2 * (len(rows) - 1)  # the demo trains each window as a pair (train.pair_negatives)
    assert batch["video"].shape == (good, 6, 3, cfg.data.crop, cfg.data.crop)
    assert batch["audio"].shape == (good, 2, cfg.window_samples)
    assert sorted(batch["label"].tolist()) == [0.0] * (good // 2) + [1.0] * (good // 2)
    assert batch["skipped"] == (0 if cache else 2)    # the cache drops it up front, lazy decoding on the fly (both
                                                      # items of its pair)
    assert list(ds.skipped) == [bad["clip_id"]] and "garbage" not in ds.skipped[bad["clip_id"]]
    assert bad["video"].split("/")[-1] in ds.skipped[bad["clip_id"]]
    assert bad["clip_id"] not in batch["clip_id"]


def test_the_ram_cache_holds_each_clips_own_decode_in_manifest_order_with_parallel_decoding(synth_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    rows = read_manifest(root, "train")
    (root / rows[2]["audio"]).write_bytes(b"garbage")  # a bad clip mid-chunk: skipped, the others keep their places
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three decoding threads over the chunks
    try:
        cached = ClipDataset(load_config("demo", [f"data.root={root}", "data.fetch_threads=1"]), "train", train=True)
    finally:
        torch.set_num_threads(threads)
    lazy = ClipDataset(load_config("demo", [f"data.root={root}", "data.cache=false"]), "train", train=True)
    assert [c["clip_id"] for c in cached.clips] == [r["clip_id"] for i, r in enumerate(rows) if i != 2]
    assert list(cached.skipped) == [rows[2]["clip_id"]]
    for clip, (frames, wave) in zip(cached.clips, cached.cache):
        ref_frames, ref_wave = lazy._decode(clip)
        assert torch.equal(frames, ref_frames) and torch.equal(wave, ref_wave), clip["clip_id"]


def test_paired_groups_stay_adjacent_in_one_step_at_any_world_size_and_unpaired_order_is_unchanged():
    """group=2 (train.pair_negatives): items 2k and 2k+1 are neighbours in every epoch's order and fall in the same
    step of 4 on 1, 2 or 4 ranks; group=1 is the order every earlier run trained on."""
    full = EpochSampler(12, seed=3, epoch=1, step_size=4, group=2).order()
    assert sorted(full) == list(range(12)) and full != list(range(12))
    assert all(full[j + 1] == full[j] + 1 and full[j] % 2 == 0 for j in range(0, 12, 2))
    assert full != EpochSampler(12, seed=3, epoch=2, step_size=4, group=2).order()
    for world in (1, 2, 4):
        orders = [EpochSampler(12, seed=3, epoch=1, rank=r, world=world, step_size=4, group=2).order()
                  for r in range(world)]
        k = 4 // world
        for j in range(3):  # step j holds whole pairs, whichever rank takes which half
            step = {i for o in orders for i in o[j * k:(j + 1) * k]}
            assert step == set(full[4 * j:4 * j + 4]) and {i ^ 1 for i in step} == step
    g = torch.Generator().manual_seed(sample_seed(3, 1, -1))
    assert EpochSampler(12, seed=3, epoch=1).order() == torch.randperm(12, generator=g).tolist()
    with pytest.raises(ValueError, match="groups of 2"):
        EpochSampler(12, seed=3, step_size=3, world=1, group=2)


def test_paired_negatives_train_each_window_as_recorded_then_swapped(synth_root):
    cfg = load_config("demo", [f"data.root={synth_root}", "data.cache=false"])
    assert cfg.train.pair_negatives  # the demo preset's default
    ds = ClipDataset(cfg, "train", train=True)
    assert len(ds) == 2 * len(ds.clips)
    for epoch, clip in ((0, 0), (3, 2)):
        (ca, pa), (cb, pb) = (item_params(cfg, ds.clips, 0, epoch, 2 * clip + side, True) for side in (0, 1))
        assert ca == cb == clip and (pa.swap, pb.swap) == (False, True)
        pb.swap = False
        assert pa == pb  # one draw: window, crop, jitter and joint flip shared
    a, b = ds[(0, 4)], ds[(0, 5)]
    assert a["clip_id"] == b["clip_id"] and (a["label"].item(), b["label"].item()) == (0.0, 1.0)
    assert torch.equal(a["video"], b["video"]) and torch.allclose(a["audio"], b["audio"].flip(0))
    unpaired = load_config("demo", [f"data.root={synth_root}", "train.pair_negatives=false"])
    assert len(ClipDataset(unpaired, "train", train=True)) == len(ds.clips)
    with pytest.raises(ValueError, match="batch_size must be even"):
        load_config("demo", ["train.batch_size=15"])


def test_eval_dataset_scores_every_clip_both_ways(synth_root):
    cfg = load_config("demo", [f"data.root={synth_root}", "data.cache=false", "data.eval_windows=1"])
    ds = ClipDataset(cfg, "train", train=False)
    assert len(ds) == 2 * len(ds.clips)
    a, b = ds[0], ds[1]
    assert a["clip_id"] == b["clip_id"] and (a["label"].item(), b["label"].item()) == (0.0, 1.0)
    assert torch.equal(a["video"], b["video"]) and torch.allclose(a["audio"], b["audio"].flip(0))
    assert torch.equal(ds[0]["audio"], a["audio"])  # deterministic


def test_eval_windows_score_several_fixed_windows_per_clip(synth_root):
    cfg = load_config("demo", [f"data.root={synth_root}", "data.cache=false", "data.eval_windows=3"])
    ds = ClipDataset(cfg, "train", train=False)
    assert len(ds) == 6 * len(ds.clips)
    items = [ds[i] for i in range(6)]
    assert {s["clip_id"] for s in items} == {ds.clips[0]["clip_id"]}
    assert [s["label"].item() for s in items] == [0.0, 1.0] * 3
    starts = [s["start_s"] for s in items[::2]]
    assert len(set(starts)) > 1  # the windows differ...
    assert [ds[i]["start_s"] for i in range(0, 6, 2)] == starts  # ...and are the same at every evaluation
    single = ClipDataset(load_config("demo", [f"data.root={synth_root}", "data.cache=false", "data.eval_windows=1"]),
                         "train", train=False)
    assert single[0]["start_s"] == starts[0]  # window 0 is the one a single-window evaluation uses


@pytest.mark.parametrize("task", ["mismatch", "shift"])
def test_baseline_pretext_tasks_alter_the_audio_as_defined(synth_root, task):
    """mismatch negatives hear another clip's audio window; shift negatives hear their own clip 1-2 s away (the
    synthetic test clips last 4 s, so the shift range is set to fit); positives are untouched. Checked against
    direct decodes of the files."""
    cfg = load_config("demo", [f"data.root={synth_root}", "data.cache=false", f"train.task={task}",
                               "data.shift_min_s=0.5", "data.shift_max_s=1.0"])
    ds = ClipDataset(cfg, "train", train=True)
    feats = AudioFeatures(cfg)
    seen_neg = seen_pos = 0
    for i in range(len(ds)):
        for epoch in range(3):
            ci, p = item_params(cfg, ds.clips, cfg.train.seed, epoch, i, train=True)
            sample = ds[(epoch, i)]
            assert sample["label"].item() == float(p.swap)
            audio_ci = p.audio_clip if p.audio_clip >= 0 else ci
            wave = decode_audio(synth_root / ds.clips[audio_ci]["audio"], 16000)
            s0, s1 = window_samples_range(cfg, p.start_frame + p.audio_shift)
            wave = wave[:, s0:s1]
            if p.joint_flip:
                wave = wave.flip(0)
            assert torch.allclose(feats(sample["audio"]), feats(peak_normalise(wave)), atol=1e-4)
            if not p.swap:
                seen_pos += 1
                assert p.audio_clip == -1 and p.audio_shift == 0
                continue
            seen_neg += 1
            if task == "mismatch":
                assert 0 <= p.audio_clip < len(ds.clips) and p.audio_clip != ci and p.audio_shift == 0
            else:
                assert p.audio_clip == -1 and 3 <= abs(p.audio_shift) <= 6  # 0.5-1.0 s at 6 fps
                a0 = p.start_frame + p.audio_shift
                assert 0 <= min(a0, p.start_frame) and max(a0, p.start_frame) + cfg.window_frames <= 24
    assert seen_neg > 5 and seen_pos > 5
    long_shift = load_config("demo", ["train.task=shift", "data.shift_min_s=5", "data.shift_max_s=6"])
    with pytest.raises(ValueError, match="room for a 5.0-s shift"):
        draw_params(long_shift, 24, 0, 0, 0, True, swap=True, n_clips=4)
