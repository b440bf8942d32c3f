"""The ingest job (flipray/dataset/ingest.py) on real encoded videos, into a real S3 endpoint (moto) through Ray tasks: the clips
that land and their format, the skip counts and reasons, re-runs that resume without re-transcoding, and the
YouTube-ASMR CSV mode.

    .venv/bin/python -m pytest tests/test_ingest.py -x -q
"""
from __future__ import annotations

import json
import shutil
import subprocess

import boto3
import numpy as np
import pytest
import soundfile as sf

from flipray import media
from flipray.dataset.manifest import MANIFEST_NAME, REQUIRED_FIELDS
from flipray.dataset.store import Store, sha256
from flipray.dataset.ingest import (ClipJob, Options, Source, folder_sources, ingest_clip, main, plan, run_ingest,
                                     transcode)
from flipray.pretext.data import decode_video

SKIPPED = {"mono audio": "mono.mp4", "no audio stream": "silent.mp4", "unreadable": "corrupt.mp4",
           "empty file": "empty.mkv", "too short": "short.mp4"}


def ffprobe_json(path, *args):
    out = subprocess.run(["ffprobe", "-v", "error", *args, "-of", "json", str(path)], capture_output=True,
                         check=True).stdout
    return json.loads(out)


@pytest.mark.slow
def test_counts_and_reasons(ingested, source_videos):
    _, report = ingested
    assert report["sources"] == 9  # notes.txt is not a video
    assert report["clips_ingested"] == 8 and report["clips_existing"] == 0 and report["clips_skipped"] == {}
    assert report["sources_skipped"] == {reason: 1 for reason in SKIPPED}
    assert {s["reason"]: s["source"] for s in report["skipped"]} == SKIPPED
    assert sum(report["splits"].values()) == 8


@pytest.mark.slow
def test_clips_land_in_the_training_format(ingested, tmp_path):
    root, report = ingested
    store = Store(root)
    rows = store.read_manifest()
    assert report["manifest"] == store.url(MANIFEST_NAME)
    assert sorted(r["scene_id"] for r in rows) == sorted(["bars"] * 2 + ["cam_a"] * 2 + ["portrait"] * 2 +
                                                         [rows[-1]["scene_id"]] * 2)
    assert any(r["scene_id"].startswith("street-b-") for r in rows)  # "street b.mp4": sanitised + hashed
    assert sorted(store.list()) == sorted([MANIFEST_NAME] + [r[k] for r in rows for k in ("video", "audio", "meta")])
    scenes_by_split = {}
    for r in rows:
        scenes_by_split.setdefault(r["scene_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in scenes_by_split.values())  # no source video in two splits

    for row in rows[:3] + rows[-1:]:
        assert all(k in row for k in REQUIRED_FIELDS) and row["source"].startswith("ingest:")
        assert (row["num_frames"], row["fps"], row["sample_rate"], row["channels"]) == (60, 6, 16000, 2)
        video, audio = store.get(row["video"]), store.get(row["audio"])
        assert sha256(video) == row["video_sha256"] and sha256(audio) == row["audio_sha256"]
        (tmp_path / "v.webm").write_bytes(video)
        (tmp_path / "a.flac").write_bytes(audio)
        info = ffprobe_json(tmp_path / "v.webm", "-show_streams")["streams"]
        assert [(s["codec_name"], s["width"], s["height"], s["r_frame_rate"]) for s in info] == \
            [("vp9", 256, 256, "6/1")]  # one stream: no audio in the video file
        flags = [p["flags"] for p in ffprobe_json(tmp_path / "v.webm", "-show_packets")["packets"]]
        assert len(flags) == 60 and [i for i, f in enumerate(flags) if "K" in f] == list(range(0, 60, 6))
        wave, sr = sf.read(tmp_path / "a.flac", dtype="float32")
        assert sr == 16000 and wave.shape[1] == 2 and wave.shape[0] >= 0.95 * 160000
        assert abs(row["duration_s"] - wave.shape[0] / sr) < 1e-3
        rms = np.sqrt((wave ** 2).mean(axis=0))
        assert rms[0] > 10 * rms[1]  # the fixture's loud tone is on the left: channel 0 stays left
        sidecar = json.loads(store.get(row["meta"]))
        assert sidecar["objects"] == [] and sidecar["width"] == 256 and sidecar["ingest"]["file"] in \
            row["source"]


@pytest.mark.slow
def test_rerun_resumes_without_transcoding_or_duplicates(ingested, source_videos):
    root, _ = ingested
    store = Store(root)
    before = store.read_manifest()
    bucket, prefix = root[5:].split("/", 1)
    stamps = {o["Key"]: o["LastModified"] for o in
              boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    report = run_ingest(root, videos=str(source_videos[0]), progress=False)
    assert report["clips_ingested"] == 0 and report["clips_existing"] == 8
    assert store.read_manifest() == before
    after = {o["Key"]: o["LastModified"] for o in
             boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert after.keys() == stamps.keys()
    assert all(after[k] == stamps[k] for k in stamps if not k.endswith(MANIFEST_NAME))  # no clip re-uploaded


def banded_video(path, width: int, height: int, sar: str = "1") -> Source:
    """A 1-s video with a red band over the left tenth of the picture and a green one over its top tenth, stereo;
    `sar` its pixels' aspect (4/3: a 240x180 picture displayed at 320x180)."""
    bands = (f"color=c=blue:s={width}x{height}:r=12:d=1,drawbox=x=0:y=0:w={width // 10}:h={height}:color=red:t=fill,"
             f"drawbox=x={width // 10}:y=0:w={width}:h={height // 10}:color=green:t=fill,setsar={sar}")
    media.ffmpeg(["-f", "lavfi", "-i", bands, "-f", "lavfi", "-i", "aevalsrc=0.5*sin(2*PI*440*t)|0.1*sin(2*PI*440*t)"
                  ":s=44100:d=1", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                  "-shortest", str(path)])
    return Source(str(path), path.name, path.stem)


def test_a_wide_video_is_squashed_whole_or_cropped_as_told(tmp_path):
    """--frame-fit: a 2:1 picture squashed whole keeps its left tenth (red) in the clip's left tenth; cropped to its
    centre square, it loses it. A tall picture is cropped to its centre square either way (its top tenth, green,
    goes; the red left band stays)."""
    wide, tall = banded_video(tmp_path / "wide.mp4", 320, 160), banded_video(tmp_path / "tall.mp4", 160, 320)
    red = lambda f: (f[..., 0] > 180) & (f[..., 1] < 80) & (f[..., 2] < 80)
    green = lambda f: (f[..., 1] > 100) & (f[..., 0] < 80) & (f[..., 2] < 80)
    for fit in ("squash", "crop"):
        for source in (wide, tall):
            out = tmp_path / f"{fit}-{source.scene_id}"
            out.mkdir()
            webm, _, n_frames, n_samples = transcode(ClipJob("c", source, 0.0, 0), out,
                                                     Options(size=64, frame_fit=fit, clip_s=1.0))
            frame = decode_video(webm)[0]
            assert frame.shape == (64, 64, 3) and (n_frames, n_samples) == (6, 16000)
            if source is tall:
                assert red(frame[:, :5]).float().mean() > 0.9 and not green(frame).any()
            elif fit == "squash":  # 32 of 320 px -> 6.4 of 64: the first 5 columns red, top 6 rows green beside them
                assert red(frame[:, :5]).float().mean() > 0.9 and not red(frame[:, 8:]).any()
                assert green(frame[:5, 8:]).float().mean() > 0.9
            else:  # the centre 160 px of 320: no red band; the green top tenth of 160 rows is 6.4 of 64
                assert not red(frame).any() and green(frame[:5]).float().mean() > 0.9
    with pytest.raises(ValueError, match="frame fit must be one of squash, crop"):
        Options(frame_fit="pad")


def test_the_sidecar_says_how_wide_a_picture_the_square_frames_show(tmp_path):
    """picture_aspect (width over height as displayed, of what the square frames show) lets the face detector
    stretch a squashed frame back: 2:1 squashed 2.0, cropped 1.0; a tall picture 1.0 either way; a 240x180 picture
    of 4:3 pixels (displayed 16:9) 1.7778 squashed, and its centre 180x180 storage pixels, 1.3333 cropped; a wide
    picture with a 90-degree display rotation (a phone held upright) is tall, 1.0."""
    sources = [banded_video(tmp_path / "wide.mp4", 320, 160), banded_video(tmp_path / "tall.mp4", 160, 320),
               banded_video(tmp_path / "ana.mp4", 240, 180, sar="4/3")]
    upright = tmp_path / "upright.mp4"  # the wide one with a 90-degree display rotation: tall as decoded
    media.ffmpeg(["-i", sources[0].path, "-c", "copy", "-metadata:s:v:0", "rotate=90", str(upright)])
    sources.append(Source(str(upright), upright.name, upright.stem))
    expected = {"squash": [2.0, 1.0, 1.7778, 1.0], "crop": [1.0, 1.0, 1.3333, 1.0]}
    for fit, aspects in expected.items():
        opts = Options(size=64, frame_fit=fit, clip_s=1.0)
        assert [plan(source, opts)[0].picture_aspect for source in sources] == aspects
    store = Store(tmp_path / "ds")
    assert ingest_clip(plan(sources[0], opts)[0], store, opts)["status"] == "ingested"  # crop, the loop's last
    assert json.loads(store.get("clips/wide_0000000.json"))["picture_aspect"] == 1.0
    squash = Options(size=64, frame_fit="squash", clip_s=1.0)
    assert ingest_clip(plan(sources[0], squash)[0], store, squash)["status"] == "ingested"
    assert json.loads(store.get("clips/wide_0000000.json"))["picture_aspect"] == 2.0


def test_a_clip_made_with_another_frame_fit_is_made_again(tmp_path):
    """A re-run skips a stored clip only if it was made as asked: a clip cropped before is squashed on a run with
    --frame-fit squash (sidecars from before the option say nothing and were cropped)."""
    job, store = ClipJob("w_0000000", banded_video(tmp_path / "w.mp4", 320, 160), 0.0, 0), Store(tmp_path / "ds")
    opts = {fit: Options(size=64, frame_fit=fit, clip_s=1.0) for fit in ("squash", "crop")}
    assert ingest_clip(job, store, opts["crop"])["status"] == "ingested"
    assert json.loads(store.get("clips/w_0000000.json"))["frame_fit"] == "crop"
    assert ingest_clip(job, store, opts["crop"])["status"] == "exists"
    sidecar = json.loads(store.get("clips/w_0000000.json"))
    del sidecar["frame_fit"]
    store.put("clips/w_0000000.json", json.dumps(sidecar).encode())
    assert ingest_clip(job, store, opts["crop"])["status"] == "exists"
    cropped = store.get("clips/w_0000000.webm")
    assert ingest_clip(job, store, opts["squash"])["status"] == "ingested"
    assert json.loads(store.get("clips/w_0000000.json"))["frame_fit"] == "squash"
    assert store.get("clips/w_0000000.webm") != cropped


def test_scene_ids_are_unique_and_clean(tmp_path):
    for name in ("a.mp4", "a.mkv", "b c.webm", "sub/d.mov", "e.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    ids = {s.name: s.scene_id for s in folder_sources(tmp_path)}
    assert set(ids) == {"a.mp4", "a.mkv", "b c.webm", "sub/d.mov"}
    assert len(set(ids.values())) == 4
    assert all(i.replace("-", "").replace("_", "").isalnum() for i in ids.values())
    assert ids["a.mp4"].startswith("a-") and ids["b c.webm"].startswith("b-c-")


@pytest.mark.slow
def test_youtube_asmr_csv_into_a_folder_and_resume_after_a_lost_sidecar(source_videos, ray_local, tmp_path,
                                                                          capsys):
    src, _ = source_videos
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    # A whole 20.5-s video downloaded for a 5-16 s row (cut there), and a 20.5-s file that is the segment itself.
    shutil.copy(src / "cam_a.mp4", downloads / "AAAAAAAAAAA_5000_16000.mp4")
    shutil.copy(src / "bars.mkv", downloads / "B-BBBBBBBBB_100000_125000.mkv")
    (tmp_path / "list.csv").write_text("# YouTube-ASMR style list\n"
                                       "ytid, ts_start, ts_end\n"
                                       "AAAAAAAAAAA, 5.0, 16.0\n"
                                       "# a comment between rows\n"
                                       "B-BBBBBBBBB, 100, 125\n"
                                       "CCCCCCCCCCC, 0, 30\n"
                                       "DDDDDDDDDDD, soon, 30\n")
    out = tmp_path / "asmr"
    args = ["--csv", str(tmp_path / "list.csv"), "--videos", str(downloads), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed.strip().splitlines()[-1])
    assert report["clips_ingested"] == 3
    assert report["sources_skipped"] == {"not downloaded": 1, "bad CSV row": 1}
    assert "skipped CCCCCCCCCCC_0_30000: not downloaded" in printed and "list.csv:7: bad CSV row" in printed
    rows = Store(out).read_manifest()
    assert [r["clip_id"] for r in rows] == ["AAAAAAAAAAA_0005000", "B-BBBBBBBBB_0100000", "B-BBBBBBBBB_0110000"]
    assert {r["scene_id"] for r in rows} == {"AAAAAAAAAAA", "B-BBBBBBBBB"}
    meta = json.loads((out / rows[0]["meta"]).read_text())
    assert meta["ingest"]["start_s"] == 5.0 and meta["ingest"]["ytid"] == "AAAAAAAAAAA"
    assert json.loads((out / rows[1]["meta"]).read_text())["ingest"]["start_s"] == 0.0  # the file is the segment

    # A run killed after a clip's video went up but before its sidecar: only that clip is made again.
    (out / rows[2]["meta"]).unlink()
    (out / MANIFEST_NAME).unlink()
    report = run_ingest(str(out), videos=str(downloads), csv_path=str(tmp_path / "list.csv"),
                        opts=Options(), progress=False)
    assert (report["clips_ingested"], report["clips_existing"]) == (1, 2)
    assert [r["clip_id"] for r in Store(out).read_manifest()] == [r["clip_id"] for r in rows]


@pytest.mark.slow
def test_synthetic_dataset_goes_through_the_same_upload(bucket, tmp_path, capsys):
    from flipray.synth import scenes as synth
    synth.generate(tmp_path / "synth", 2, seed=1, workers=1, duration_s=3.0, size=64)
    out = f"s3://{bucket}/synth"
    for ingested, existing in ((2, 0), (0, 2)):  # the second run finds every object in place
        assert main(["--dataset", str(tmp_path / "synth"), "--out", out]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (report["clips_ingested"], report["clips_existing"]) == (ingested, existing)
    rows = Store(out).read_manifest()
    assert [r["source"] for r in rows] == ["synthetic"] * 2 and all(r["video_sha256"] for r in rows)
