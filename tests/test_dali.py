"""The DALI pretext pipeline (dali_pipelines/pretext.py, device="cpu") reading ingested clips from S3 (moto): batch
shapes and values, the flip labels, per-epoch shards, parity with the torchcodec loader, corrupt clips skipped and
counted, parallel external-source workers started with spawn.

    .venv/bin/python -m pytest tests/test_dali.py -x -q
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3
import pytest
import torch

from dali_pipelines.pretext import DaliClipLoader
from flipray.config import load_config
from flipray.pretext.data import (ILD_SCALE, IMAGENET_MEAN, IMAGENET_STD, AudioFeatures, ClipDataset, EpochSampler,
                                  collate, draw_params, pair_size)
from flipray.dataset.manifest import MANIFEST_NAME
from flipray.dataset.store import Store

pytestmark = pytest.mark.slow  # every test reads the `ingested` dataset (moto S3 + Ray)

# Full-size frames (the stored 256 px, no resize) cropped to 224, 6 of the window's 18 frames, 64 mels.
# One item per clip (train.pair_negatives off): the loader mechanics below count clips; the parity test's demo-default
# rows (overrides without it) train in pairs.
OVERRIDES = ["data.cache=false", "data.resize=256", "data.crop=224", "train.pair_negatives=false"]


def config(root: str):
    return load_config("demo", [f"data.root={root}", *OVERRIDES])


def run(loader) -> tuple[dict, list[dict]]:
    """All batches of one epoch, and their concatenation."""
    batches = list(loader)
    cat = {k: torch.cat([b[k] for b in batches if "video" in b]) for k in ("video", "audio", "label", "start_s")}
    cat["clip_id"] = [c for b in batches if "video" in b for c in b["clip_id"]]
    cat["skipped"] = sum(b["skipped"] for b in batches)
    return cat, batches


def reference(cfg, split: str, train: bool, epoch: int, rank: int = 0, world: int = 1) -> dict:
    """The torchcodec loader's samples in the same order: ClipDataset + EpochSampler."""
    ds = ClipDataset(cfg, split, train=train)
    return collate([ds[item] for item in EpochSampler(len(ds), cfg.train.seed, epoch, shuffle=train, rank=rank,
                                                      world=world, group=pair_size(cfg, train))])


def test_batches_have_the_contract_shapes_values_and_labels(ingested):
    root, _ = ingested
    cfg = config(root)
    train = Store(root).read_manifest("train")
    loader = DaliClipLoader(cfg, "train", train=True, batch_size=3, epoch=0)
    cat, batches = run(loader)
    assert [b["video"].shape for b in batches] == [(3, 6, 3, 224, 224), (1, 6, 3, 224, 224)]  # last batch partial
    assert [b["audio"].shape for b in batches] == [(3, 2, cfg.window_samples), (1, 2, cfg.window_samples)]
    assert cat["video"].dtype == cat["audio"].dtype == cat["label"].dtype == torch.float32
    assert cat["skipped"] == 0 and len(loader) == 2 and loader.skipped == {}
    assert sorted(cat["clip_id"]) == sorted(c["clip_id"] for c in train)
    lo = (-IMAGENET_MEAN / IMAGENET_STD).view(1, 1, 3, 1, 1)
    hi = ((1 - IMAGENET_MEAN) / IMAGENET_STD).view(1, 1, 3, 1, 1)
    assert torch.all(cat["video"] >= lo - 1e-5) and torch.all(cat["video"] <= hi + 1e-5)  # clamped, normalised
    assert cat["video"].std() > 0.3  # a picture, not a constant
    assert torch.isfinite(cat["audio"]).all()

    by_id = {c["clip_id"]: i for i, c in enumerate(Store(root).read_manifest("train"))}
    for k, clip_id in enumerate(cat["clip_id"]):
        p = draw_params(cfg, 60, cfg.train.seed, 0, by_id[clip_id], train=True)
        assert cat["label"][k] == float(p.swap)
        assert abs(cat["start_s"][k] * 6 - p.start_frame) < 1e-4 and 0 <= p.start_frame <= 60 - 18
        # The sources' loud 440 Hz tone is on the left: it ends up in channel 1 when the audio was swapped once
        # (the task's swap or the joint flip), in channel 0 when swapped twice or never.
        loud = cat["audio"][k].pow(2).mean(dim=1).argmax().item()
        assert loud == int(p.swap != p.joint_flip), (clip_id, p)


def test_shards_of_an_epoch_are_disjoint_cover_the_split_and_reshuffle_per_epoch(ingested):
    root, _ = ingested
    cfg = config(root)
    clips = [c["clip_id"] for c in Store(root).read_manifest("train")]
    seen = {}
    for shard in (0, 1):
        loader = DaliClipLoader(cfg, "train", train=True, batch_size=2, shard_id=shard, num_shards=2, epoch=0)
        for epoch in (0, 1):  # one pipeline runs on into the next epoch
            cat, _ = run(loader)
            expected = EpochSampler(len(clips), cfg.train.seed, epoch, shuffle=True, rank=shard, world=2).order()
            assert cat["clip_id"] == [clips[i] for i in expected]
            seen[shard, epoch] = cat["clip_id"]
    for epoch in (0, 1):
        assert not set(seen[0, epoch]) & set(seen[1, epoch])
        assert sorted(seen[0, epoch] + seen[1, epoch]) == sorted(clips)
    assert [seen[0, 0], seen[1, 0]] != [seen[0, 1], seen[1, 1]]  # a new order per epoch

    resumed, _ = run(DaliClipLoader(cfg, "train", train=True, batch_size=2, epoch=1, start=1))
    assert resumed["clip_id"] == [clips[i] for i in EpochSampler(len(clips), cfg.train.seed, 1).order()[1:]]


@pytest.mark.parametrize("train,overrides", [(True, OVERRIDES), (False, OVERRIDES),
                                             (True, ["data.cache=false"]),  # the demo's 88-px resize + crop 80
                                             (True, ["data.cache=false", "train.task=mismatch"]),
                                             (False, ["data.cache=false", "train.task=shift"])])
def test_parity_with_the_torchcodec_loader(ingested, train, overrides):
    """Same clip, window and augmentation seed -> same tensors: the waveform to FLAC-decoding float precision, and so
    the model's front-end features (mean log-mel, level difference, IPD, GCC-PHAT of the default `ild-ipd-gcc`)
    within the stated tolerance; frames to the codec's tolerance (DALI's YUV->RGB conversion interpolates chroma
    differently from torchcodec's). The rows without OVERRIDES train in pairs (the demo default)."""
    root, _ = ingested
    cfg = load_config("demo", [f"data.root={root}", *overrides])
    split = "train" if train else "val"
    ref = reference(cfg, split, train, epoch=1)
    got, _ = run(DaliClipLoader(cfg, split, train=train, batch_size=4, epoch=1))
    assert got["clip_id"] == ref["clip_id"] and torch.equal(got["label"], ref["label"])
    assert torch.allclose(got["start_s"], ref["start_s"])
    assert got["video"].shape == ref["video"].shape and got["audio"].shape == ref["audio"].shape

    assert (got["audio"] - ref["audio"]).abs().max() < 1e-5  # both decode the same FLAC (libFLAC vs FFmpeg)
    front = AudioFeatures(cfg)  # the model's front end: the same module for both loaders
    assert front.front_end == "ild-ipd-gcc"
    gf, rf = front(got["audio"]), front(ref["audio"])
    logmel_err = (left_right(gf) - left_right(rf)).abs()
    loud = left_right(rf) > -6  # log10 power above 1e-6; below that both sides round float noise near the floor
    assert logmel_err[loud].max() < 2e-3 and logmel_err.max() < 0.05
    # phase features (bounded by ~1) where there is energy; the phase of near-silent bands and frames is noise
    ipd_err = (gf[:, 2:4] - rf[:, 2:4]).abs()[loud.all(1, keepdim=True).expand(-1, 2, -1, -1)]
    loud_frames = loud.all(1).any(1)  # (B, T)
    gcc_err = (gf[:, 4:] - rf[:, 4:]).abs().amax(dim=(1, 2))[loud_frames]
    assert ipd_err.max() < 2e-3 and gcc_err.max() < 2e-3

    # Normalised units (1 = 0.225 of full scale): measured mean 0.03-0.05, median 0.001, 99th percentile 0.7 at
    # the test pictures' saturated colour edges, where the two conversions interpolate chroma differently.
    video_err = (got["video"] - ref["video"]).abs()
    assert video_err.mean() < 0.08 and (video_err > 0.5).float().mean() < 0.04
    # The tolerance still catches a wrong choice: the same frames mirrored are far off (measured 2-4).
    assert (got["video"] - ref["video"].flip(-1)).abs().mean() > 10 * video_err.mean()


def test_parity_on_wide_clips_squashed_whole(tmp_path, monkeypatch):
    """Clips stored wider than tall (`flipray synth --width`, a user's own clip-format dataset) are squashed whole by
    both loaders, as flipray.pretext.data.resize_square's default fit: the sidecar's boxes and azimuths describe the
    whole frame. The same windows cropped to their centre square instead are far off."""
    from flipray import pretext
    from flipray.synth.scenes import generate
    generate(tmp_path, 6, seed=4, workers=2, duration_s=3.0, size=128, width=256, clips_per_scene=1)
    cfg = load_config("demo", [f"data.root={tmp_path}", "data.cache=false"])
    ref = reference(cfg, "train", True, epoch=0)
    got, _ = run(DaliClipLoader(cfg, "train", train=True, batch_size=4, epoch=0))
    assert got["clip_id"] == ref["clip_id"] and got["video"].shape == ref["video"].shape
    video_err = (got["video"] - ref["video"]).abs()
    assert video_err.mean() < 0.08 and (video_err > 0.5).float().mean() < 0.04  # the ingested clips' tolerance

    decode = pretext.data.decode_video
    monkeypatch.setattr(pretext.data, "decode_video", lambda *a, **k: decode(*a, **{**k, "fit": "crop"}))
    cropped = reference(cfg, "train", True, epoch=0)
    assert (got["video"] - cropped["video"]).abs().mean() > 3 * video_err.mean()


def test_fit_square_and_no_autograph_file_left_behind(tmp_path, monkeypatch):
    """The pipeline's resize stage: a frame at the size comes out unchanged, a tall one as its centre square, a wide
    one squashed whole. Building the pipeline leaves no AutoGraph module in the temp folder (a killed Ray worker
    cannot delete it at exit)."""
    import tempfile
    import numpy as np
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def
    from dali_pipelines.pretext import build_pipeline, fit_square
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where AutoGraph would write its generated module
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (2, 60, 40, 3), dtype=np.uint8)
    wide = np.repeat(np.arange(80, dtype=np.uint8)[None, None, :, None] * 3, 40, axis=1).repeat(2, 0).repeat(3, 3)
    batch = [square, tall, np.ascontiguousarray(tall[:, 10:50]), wide]

    @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None)
    def fit():
        return fit_square(fn.external_source(source=lambda: batch, batch=True, layout="FHWC"), 40)

    pipe = fit()
    pipe.build()
    out = [np.array(t) for t in pipe.run()[0]]
    assert all(o.shape == (2, 40, 40, 3) for o in out)
    assert np.array_equal(out[0], square)
    assert np.array_equal(out[1], out[2]) and not np.array_equal(out[1], square)
    # squashed, not cropped: the ramp over 80 columns keeps its ends (a centre crop would start at 60 levels)
    assert out[3][0, 0, 0, 0] <= 3 and out[3][0, 0, -1, 0] >= 230
    build_pipeline(load_config("demo"), source=lambda info: None, device="cpu", batch_size=1)
    compiled = [m for name, m in sys.modules.items() if name.startswith("__autograph_generated_file")]
    assert compiled  # this build's, or an earlier one's in this process (AutoGraph compiles a function once)
    assert [m.__file__ for m in compiled if Path(m.__file__).exists()] == []
    assert list(tmp_path.glob("__autograph_generated_file*")) == []


def left_right(features: torch.Tensor) -> torch.Tensor:
    """(B, 2, n_mels, T) L, R log-mels back from the default front end's mean and scaled level difference."""
    mid, side = features[:, 0], features[:, 1] / ILD_SCALE
    return torch.stack([mid + side / 2, mid - side / 2], dim=1)


def _copy_prefix(src_root: str, dst_prefix: str) -> str:
    bucket, prefix = src_root[5:].split("/", 1)
    s3 = boto3.client("s3")
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        s3.copy_object(Bucket=bucket, Key=dst_prefix + obj["Key"][len(prefix):],
                       CopySource={"Bucket": bucket, "Key": obj["Key"]})
    return f"s3://{bucket}/{dst_prefix}"


def test_corrupt_and_missing_clips_are_skipped_and_counted(ingested, tmp_path):
    root = _copy_prefix(ingested[0], "corrupt-copy")
    store = Store(root)
    train = store.read_manifest("train")
    cfg = config(root)
    garbage = store.get(train[0]["video"])[:200] + bytes(range(256)) * 40  # WebM header, then junk
    store.put(train[0]["video"], garbage)   # fails its checksum
    store.delete(train[1]["audio"])         # missing object
    loader = DaliClipLoader(cfg, "train", train=True, batch_size=2, epoch=0)
    cat, batches = run(loader)
    assert cat["skipped"] == 2 and sorted(cat["clip_id"]) == sorted(c["clip_id"] for c in train[2:])
    assert loader.skipped == {train[0]["clip_id"]: "checksum mismatch (corrupt object)",
                              train[1]["clip_id"]: "object missing or unreadable"}
    assert all(b["video"].shape[0] + b["skipped"] == 2 for b in batches if "video" in b)

    # Without checksums (a local dataset), the junk reaches the decoder: the loader finds the clip, skips it and
    # rebuilds the pipeline at that batch.
    local = tmp_path / "ds"
    (local / "clips").mkdir(parents=True)
    rows = []
    for row in train:
        for key in ("video", "audio", "meta"):
            if key == "audio" and row is train[1]:
                continue
            (local / row[key]).write_bytes(store.get(row[key]))
        rows.append({k: v for k, v in row.items() if not k.endswith("_sha256")})
    (local / train[1]["audio"]).write_bytes(store.get(train[2]["audio"]))  # whole again
    (local / MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    loader = DaliClipLoader(load_config("demo", [f"data.root={local}", *OVERRIDES]), "train", train=True,
                            batch_size=2, epoch=0)
    cat, _ = run(loader)
    assert cat["skipped"] == 1 and len(cat["clip_id"]) == 3
    assert loader.skipped == {train[0]["clip_id"]: "decoder failed"}


def test_parallel_workers_start_with_spawn_and_give_the_same_batches(ingested):
    root, _ = ingested
    cfg = config(root)
    inline, _ = run(DaliClipLoader(cfg, "train", train=True, batch_size=2, epoch=2))
    parallel, _ = run(DaliClipLoader(cfg, "train", train=True, batch_size=2, epoch=2, py_workers=1))
    assert parallel["clip_id"] == inline["clip_id"]
    assert torch.equal(parallel["video"], inline["video"]) and torch.equal(parallel["audio"], inline["audio"])


def test_the_loader_is_a_config_value(ingested):
    root, _ = ingested
    from dali_pipelines.pretext import make_split_loader
    ids = {}
    for name in ("torchcodec", "dali"):
        cfg = load_config("demo", [f"data.root={root}", f"data.loader={name}", "data.num_workers=0", *OVERRIDES])
        loader = make_split_loader(cfg, "train", train=True, batch_size=2, shard_id=1, num_shards=2, epoch=3)
        assert isinstance(loader, DaliClipLoader) == (name == "dali")
        ids[name] = [c for batch in loader for c in batch["clip_id"]]
    assert ids["dali"] == ids["torchcodec"] and len(ids["dali"]) == 2
