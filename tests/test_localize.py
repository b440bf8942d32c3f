"""Sounding-object tracking (flipray/tasks/localize.py, jobs/localize.py): heads, YOLOv2 loss, targets, face pseudo-labels,
learning, and the Table 3 job end to end (locally and on Ray).

    .venv/bin/python -m pytest tests/test_localize.py -x -q
"""
from __future__ import annotations

import copy
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from flipray.tasks import detector as D
from flipray.tasks import localize as L
from flipray.config import load_config
from flipray.pretext.data import AudioFeatures
from flipray.tasks.base import load_clips
from flipray.pretext.models import SpatialAlignmentNet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pretext():
    """A random-init demo-shape pretext network and its config (the shapes matter here, not the weights)."""
    pcfg = load_config("demo")
    torch.manual_seed(0)
    return SpatialAlignmentNet(pcfg), pcfg


@pytest.fixture(scope="module")
def tracks(synth_root, pretext):
    _, pcfg = pretext
    clips, skipped = load_clips(str(synth_root), "train", pcfg.data.resize, pcfg.data.sample_rate)
    assert not skipped
    kept, dropped = L.prepare(clips, L.Config(), pcfg)
    assert kept and not dropped
    return kept


@pytest.fixture(scope="module")
def localize_checkpoint(tmp_path_factory, pretext):
    """A demo-shape pretext checkpoint file, as jobs.downstream reads them."""
    net, pcfg = pretext
    path = tmp_path_factory.mktemp("localize") / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "config": pcfg.to_dict()}, path)
    return path


def _batch(tracks, pretext, audio_mode, n=3):
    _, pcfg = pretext
    cfg = L.Config()
    g = torch.Generator().manual_seed(1)
    items = [(i,) + L.draw_pair(tracks[i], cfg, pcfg.data.fps, g) for i in range(n)]
    return L.make_batch(items, tracks, cfg, pcfg, AudioFeatures(pcfg), audio_mode, "cpu")


@pytest.mark.parametrize("method", ["flip", "stereo-audio", "mono-audio", "visual-context"])
def test_head_shapes_and_loss_on_a_tiny_batch(method, tracks, pretext):
    net, pcfg = pretext
    spec = L.METHODS[method]
    cfg = L.Config()
    anchors = torch.tensor([[0.12, 0.12], [0.2, 0.2], [0.27, 0.3]])
    model = D.LocalizationNet(copy.deepcopy(net), pcfg, cfg, spec["audio"], spec["visual"], anchors)  # fresh grads
    video, audio, boxes = _batch(tracks, pretext, spec["audio"])
    r = pcfg.data.resize
    assert video.shape == (3, 3, r, r)
    assert (audio is None) == (spec["audio"] is None)
    if audio is not None:
        assert audio.shape == (3, net.front_end.channels, pcfg.data.n_mels, 101)  # 1 s at hop 160, centred frames
        assert net.front_end.front_end == "ild-ipd-gcc"  # channel 1: the level difference
        if spec["audio"] == "mono":  # both channels the mono mix: no level difference
            assert torch.equal(audio[:, 1], torch.zeros_like(audio[:, 1]))
        else:
            assert audio[:, 1].abs().max() > 0.1
    expected = ({"visual"} if spec["visual"] else set()) | ({"audio"} if spec["audio"] else set())
    assert set(model.backbone) == expected

    out = model(video if spec["visual"] else None, audio)
    s = D.map_side(r) * 2 ** cfg.deconvs
    assert model.grid == s == 6
    assert out.shape == (3, 3, 5, s, s)
    pred, scores = D.decode(out, model.anchors)
    assert pred.shape == (3, 3 * s * s, 4) and scores.shape == (3, 3 * s * s)
    assert torch.all(pred[..., 2] >= pred[..., 0]) and torch.all((pred >= 0) & (pred <= 1))
    # objectness starts at the prior of one responsible anchor per frame (within a factor 3, which the input features'
    # scale moves it by: without the prior it would be ~0.5, 50x more)
    assert 1 / 3 < scores.mean().item() * (3 * s * s) < 3

    loss, parts = D.yolo_loss(out, boxes, model.anchors, cfg)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert set(parts) == {"xy", "wh", "obj", "noobj"} and parts["obj"] > 1  # the responsible anchors start near 0
    loss.backward()
    assert model.head["fuse"][0][0].weight.grad.abs().sum() > 0
    for name, sub in model.backbone.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.parameters()), name


def test_loss_and_decoding_agree_on_a_perfect_prediction():
    """Encoding the true boxes into the head's output gives ~zero loss, and decoding it gives the boxes back."""
    cfg = L.Config()
    anchors = torch.tensor([[0.1, 0.1], [0.25, 0.2]])
    s = 6
    gts = [torch.tensor([[0.10, 0.20, 0.30, 0.38]]), torch.tensor([[0.55, 0.5, 0.8, 0.74], [0.02, 0.7, 0.12, 0.8]])]
    out = torch.full((2, 2, 5, s, s), -12.0)
    for i, gt in enumerate(gts):
        for box in gt:
            wh, centre = box[2:] - box[:2], (box[:2] + box[2:]) / 2 * s
            a = int(D.shape_iou(wh[None], anchors).argmax())
            x, y = centre.long().tolist()
            offset = centre - centre.floor()
            out[i, a, :2, y, x] = torch.log(offset / (1 - offset))
            out[i, a, 2:4, y, x] = torch.log(wh / anchors[a])
            out[i, a, 4, y, x] = 12.0
    loss, parts = D.yolo_loss(out, gts, anchors, cfg)
    assert loss.item() < 1e-3
    noisy, _ = D.yolo_loss(out + 0.5 * torch.randn_like(out), gts, anchors, cfg)
    assert noisy.item() > 100 * loss.item()
    boxes, scores = D.decode(out, anchors)
    for i, gt in enumerate(gts):
        top = boxes[i][scores[i].argsort(descending=True)[:len(gt)]]
        assert torch.allclose(top.sort(0).values, gt.sort(0).values, atol=1e-4)


def test_kmeans_anchors_find_the_box_shapes():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[0.1, 0.1], [0.2, 0.3], [0.4, 0.25]])
    wh = torch.cat([c * (1 + 0.03 * torch.randn(200, 2, generator=g)) for c in shapes])
    anchors = D.kmeans_anchors(wh, 3)
    assert anchors.shape == (3, 2)
    assert torch.allclose(anchors, shapes, atol=0.01)  # sorted by area, as the clusters are
    with pytest.raises(ValueError, match="at least 5"):
        D.kmeans_anchors(wh[:4], 5)


def test_targets_windows_and_moving_subset(synth_root, tracks, pretext):
    _, pcfg = pretext
    cfg = L.Config()
    for tc in tracks:
        meta, n = tc.clip.meta, tc.clip.frames.shape[0]
        sounding = [o for o in meta["objects"] if o["sounding"]]
        assert len(tc.targets) == n
        t = tc.frames[0]
        expect = torch.tensor([o["boxes"][t] for o in sounding], dtype=torch.float32) / 256
        assert torch.allclose(tc.targets[t], expect)
        # the 1-s window fits: 3..n-3 at 6 fps
        assert tc.frames == list(range(3, n - 2))
        motion = sounding[0]["motion"]
        if motion in ("static", "up-down"):
            assert not tc.moving
        if motion == "left-right":
            assert tc.moving
        wins = L.eval_windows(tc, cfg, pcfg.data.fps)
        assert [t for t, _ in wins] == list(range(3, n - 2, 3))  # every 0.5 s
        assert all(abs(r - t) >= n // 2 and 0 <= r < n for t, r in wins)
    assert any(tc.moving for tc in tracks) and not all(tc.moving for tc in tracks)

    # a training draw keeps its reference frame >= 2 s (capped at half the clip) from the target; a mirror flips the
    # boxes and swaps the channels
    g = torch.Generator().manual_seed(0)
    tc = tracks[0]
    feats = AudioFeatures(pcfg)
    for _ in range(20):
        t, ref, mirror = L.draw_pair(tc, cfg, pcfg.data.fps, g)
        assert abs(ref - t) >= 12 and t in tc.frames
    v, a, b = L.sample_inputs(tc, 10, 0, False, "stereo", pcfg, feats, 1.0)
    vm, am, bm = L.sample_inputs(tc, 10, 0, True, "stereo", pcfg, feats, 1.0)
    assert torch.allclose(vm, v.flip(-1))
    # the mirror swaps the waveform's channels before the front end (demo: ild-ipd-gcc, 7 channels), so the features
    # do not just trade places: the mean log-mel stays and the level difference is negated, the phase difference keeps
    # its cos and negates its sin, and each GCC-PHAT map mirrors in lag (index n_mels/2 + k <-> n_mels/2 - k; index 0,
    # lag -n_mels/2, has no partner in the map)
    assert feats.front_end == "ild-ipd-gcc" and a.shape[0] == 7 and a[3].abs().max() > 0.1 and a[1].abs().max() > 0.1
    assert torch.allclose(am[0], a[0], atol=1e-5) and torch.allclose(am[1], -a[1], atol=1e-5)
    assert torch.allclose(am[2], a[2], atol=1e-5) and torch.allclose(am[3], -a[3], atol=1e-5)
    assert torch.allclose(am[4:, 1:], a[4:, 1:].flip(-2), atol=1e-4)
    assert torch.allclose(bm[:, [0, 2]], 1 - b[:, [2, 0]]) and torch.equal(bm[:, [1, 3]], b[:, [1, 3]])


def _face_frames():
    """Grace Hopper's portrait (matplotlib's sample data) pasted at three places on a grey 256-px canvas, and one
    canvas with no face."""
    import matplotlib.cbook
    from PIL import Image
    face = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((96, 112)))
    frames = np.full((4, 256, 256, 3), 128, np.uint8)
    for k, x in enumerate([10, 80, 150]):
        frames[k, 60:172, x:x + 96] = face
    return frames


def test_face_pseudo_labels_on_a_wide_video_squashed_square(tmp_path):
    """Ingest squashes a 16:9 picture into a square (picture_aspect 1.778 in the sidecar): its faces are 0.56 as wide
    as they are tall, which the cascade (trained on upright faces) misses or boxes square. Stretched back by the
    sidecar's aspect, every face is found, its box as narrow as the face in the stored frame."""
    pytest.importorskip("cv2", reason="opencv-python-headless is pinned in pyproject.toml")
    import matplotlib.cbook
    from PIL import Image
    face = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((96, 112)))
    xs = [20, 150, 300]
    wide = np.full((3, 256, 456, 3), 128, np.uint8)
    for k, x in enumerate(xs):
        wide[k, 60:172, x:x + 96] = face
    squashed = np.stack([np.asarray(Image.fromarray(f).resize((256, 256), Image.BILINEAR)) for f in wide])
    truth = L.face_pseudo_labels(wide)  # the faces in the 456-px frames, as displayed
    assert all(b is not None for b in truth)
    as_stored = L.face_pseudo_labels(squashed)
    assert None in as_stored or all(abs((b[2] - b[0]) / (b[3] - b[1]) - 1) < 0.05 for b in as_stored)
    stretched = L.face_pseudo_labels(squashed, aspect=456 / 256)
    for b, t in zip(stretched, truth):
        assert b is not None
        assert (b[2] - b[0]) / (b[3] - b[1]) == pytest.approx(256 / 456, abs=0.05)  # narrow, as the stored face
        assert (b[0] + b[2]) / 2 == pytest.approx((t[0] + t[2]) / 2 * 256 / 456, abs=4)
        assert (b[1] + b[3]) / 2 == pytest.approx((t[1] + t[3]) / 2, abs=4)
    # clip_targets reads the aspect from the sidecar of an ingested clip
    (tmp_path / "clips").mkdir()
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt",
                    "rgb24", "-s", "256x256", "-r", "6", "-i", "-", "-c:v", "libvpx-vp9", "-crf", "20", "-b:v", "0",
                    "-pix_fmt", "yuv444p", str(tmp_path / "clips" / "wide.webm")], input=squashed.tobytes(),
                   check=True)
    clip = L.Clip({"clip_id": "wide", "video": "clips/wide.webm"}, {"objects": [], "picture_aspect": 1.7812},
                  _resize(squashed, 88), torch.zeros(2, 16000))
    targets = [t[0] for t in L.clip_targets(clip, L.Config(data_root=str(tmp_path))) if len(t)]
    assert len(targets) >= 2  # through VP9 a squashed face is a marginal find for the cascade
    for t in targets:  # narrow boxes: the sidecar's aspect was applied (the cascade's own boxes are square)
        assert (t[2] - t[0]) / (t[3] - t[1]) == pytest.approx(256 / 456, abs=0.05)
        assert any(abs((t[0] + t[2]) / 2 - (b[0] + b[2]) / 512) < 4 / 256 for b in stretched)
    with pytest.raises(ValueError, match="aspect must be a positive"):
        L.face_pseudo_labels(squashed, aspect=0.0)


def _resize(frames: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    return x.round().byte().permute(0, 2, 3, 1).contiguous()


def test_face_pseudo_labels_follow_the_face(tmp_path):
    pytest.importorskip("cv2", reason="opencv-python-headless is pinned in pyproject.toml")
    frames = _face_frames()
    boxes = L.face_pseudo_labels(frames)
    assert boxes[3] is None
    found = [b for b in boxes[:3] if b is not None]
    assert len(found) == 3
    for b, x in zip(found, [10, 80, 150]):
        assert x - 5 <= b[0] and b[2] <= x + 101 and 55 <= b[1] < b[3] <= 177  # inside the pasted portrait
    assert found[1][0] - found[0][0] == pytest.approx(70, abs=4)
    assert found[2][0] - found[1][0] == pytest.approx(70, abs=4)
    # at the demo's 88 px the faces (~15 px) are too small for the cascade: clip_targets labels the stored frames
    small = _resize(frames, 88)
    assert L.face_pseudo_labels(small) == [None] * 4
    # a clip without sidecar objects (an ingested real video) gets its targets from the faces of its stored frames
    (tmp_path / "clips").mkdir()
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt",
                    "rgb24", "-s", "256x256", "-r", "6", "-i", "-", "-c:v", "libvpx-vp9", "-crf", "20", "-b:v", "0",
                    "-pix_fmt", "yuv444p", str(tmp_path / "clips" / "real.webm")], input=frames.tobytes(), check=True)
    clip = L.Clip({"clip_id": "real", "video": "clips/real.webm"}, {"objects": []}, small, torch.zeros(2, 16000))
    targets = L.clip_targets(clip, L.Config(data_root=str(tmp_path)))
    assert [len(t) for t in targets] == [1, 1, 1, 0]
    assert torch.allclose(targets[1][0], torch.tensor(found[1], dtype=torch.float32) / 256, atol=3 / 256)
    assert L.is_moving(clip, targets, L.Config())  # the face moves 140 px of 256 left to right
    assert [len(t) for t in L.clip_targets(clip, L.Config(pseudo_labels="none"))] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="uint8 RGB"):
        L.face_pseudo_labels(frames[..., 0])


@pytest.mark.slow
def test_training_overfits_a_batch(tracks, pretext):
    """The full model, its YOLOv2 loss and the decoder learn together: 60 AdamW steps on 8 fixed samples bring the
    loss down tenfold and every top box onto its true box, from top boxes that missed before."""
    net, pcfg = pretext
    cfg = L.Config()
    torch.manual_seed(0)
    video, audio, boxes = _batch(tracks, pretext, "stereo", n=8)
    wh = torch.cat([tc.targets[t][:, 2:] - tc.targets[t][:, :2] for tc in tracks for t in tc.frames])
    model = D.LocalizationNet(copy.deepcopy(net), pcfg, cfg, "stereo", True, D.kmeans_anchors(wh, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def top_iou():
        model.eval()
        with torch.no_grad():
            pred, scores = D.decode(model(video, audio), model.anchors)
        model.train()
        return torch.stack([D.box_iou(pred[i, scores[i].argmax()][None], boxes[i]).max() for i in range(len(boxes))])

    before = top_iou()
    losses = []
    for _ in range(60):
        loss, _ = D.yolo_loss(model(video, audio), boxes, model.anchors, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = top_iou()
    assert losses[-1] < 0.1 * losses[0]
    assert before.mean() < 0.3 and torch.all(after > 0.5) and after.mean() > before.mean() + 0.5, (before, after)


@pytest.mark.slow
def test_run_trial_contract(synth_root, localize_checkpoint):
    """run_trial trains on one split and scores another: the epoch loss falls, report() sees every epoch, and the
    result has the contract's keys with one per-clip value per eval clip."""
    cfg = L.Config(data_root=str(synth_root), method="flip", pretext=str(localize_checkpoint), pretrained=False,
                   eval_split="train", epochs=4, samples_per_clip=8, batch_size=16, lr=3e-3, lr_backbone=3e-4,
                   threads=1, eval_every=2)
    reports = []
    result = L.run_trial(cfg, report=lambda epoch, m: reports.append((epoch, m)))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert [e for e, _ in reports] == [1, 2, 3, 4]
    assert "ap50" in reports[1][1] and "ap50" not in reports[2][1] and "ap50" in reports[3][1]
    pcfg = load_config("demo")
    clips, _ = load_clips(str(synth_root), "train", pcfg.data.resize, pcfg.data.sample_rate)
    tracks, _ = L.prepare(clips, cfg, pcfg)
    windows = [(ci, t) for ci, tc in enumerate(tracks) for t, _ in L.eval_windows(tc, cfg, pcfg.data.fps)]
    assert result["clip_ids"] == [tc.clip.clip_id for tc in tracks]
    assert result["eval_windows"] == len(windows) and result["moving_clips"] == sum(tc.moving for tc in tracks)
    m, per = result["metrics"], result["per_clip"]
    assert set(m) == set(L.TABLE["metrics"])
    assert min(per["iou"]) - 1e-6 <= m["iou"] <= max(per["iou"]) + 1e-6  # the windows' mean lies among the clips'
    assert set(per) == {"ap50", "iou", "x_err", "y_err"} and all(len(v) == len(tracks) for v in per.values())
    assert np.mean(per["iou"]) == pytest.approx(m["iou"], rel=0.2)  # clips have similar window counts
    assert result["figures"] == {}  # no out_dir: nothing written


def _job_args(synth_root, ckpt, out, *extra):
    return ["--data", str(synth_root), "--preset", "demo", "--out", str(out), "--no-mlflow",
            "--pretext", f"flip={ckpt}", "--pretext", f"mismatch={ckpt}", "--pretext", f"shift={ckpt}",
            "--set", "epochs=1", "--set", "samples_per_clip=1", "--set", "figure_clips=1", *extra]


@pytest.mark.slow
def test_job_writes_the_table(synth_root, localize_checkpoint, tmp_path):
    from jobs.localize import main
    summary = main(_job_args(synth_root, localize_checkpoint, tmp_path, "--local",
                             "--methods", "flip,frozen-scratch,visual-context"))
    out = tmp_path / "localize"
    table = json.loads((out / "localize.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["flip", "frozen-scratch", "visual-context"]
    assert table["metrics"] == L.TABLE["metrics"] and table["paired_metric"] == "iou"
    assert "Table 3" in (out / "localize.md").read_text()
    for row in table["rows"]:
        iou = row["per_clip"]["iou"]  # the set's IOU averages the windows of these clips: it lies among them
        assert min(iou) - 1e-6 <= row["metrics"]["iou"] <= max(iou) + 1e-6 and 0 <= row["metrics"]["ap50"] <= 100
        assert len(row["per_clip"]["iou"]) == len(row["clip_ids"]) == 2  # the test split: 2 clips
        assert row["metrics"]["iou_moving"] is not None  # one of them moves diagonally
    assert table["config"]["frozen-scratch"]["pretrained"] is False
    assert table["config"]["flip"]["pretrained"] is True
    for m in ("flip", "frozen-scratch", "visual-context"):
        result = json.loads((out / m / "result.json").read_text())
        assert (out / m / "tracking.png").stat().st_size > 10_000 and (out / m / "curves.png").exists()
        assert len(result["anchors"]) == 3 and result["history"][0]["epoch"] == 1
    assert set(summary["results"]) == {"flip", "frozen-scratch", "visual-context"}


@pytest.mark.slow
def test_job_whose_mlflow_server_is_gone_at_its_end_keeps_the_table_and_says_so(synth_root, localize_checkpoint,
                                                                               mlflow_servers, tmp_path, capsys):
    """The MLflow server answers when the job starts and is stopped while its method trains: the job waits
    --mlflow-wait-s for it, then exits 1 with one line naming the table it wrote, which is whole on disk. The runs a
    job could not end are ended by the next job with the same --out."""
    import threading
    import time

    from mlflow import MlflowClient

    from cluster import local
    from jobs.localize import main
    server = mlflow_servers[0]
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")  # the server's store, read directly

    # The job copies its pretext checkpoint after its last MLflow call before training (the experiment's kind tag);
    # the experiment's creation alone came too early: once the server was stopped before the tag was set.
    copied = tmp_path / "out" / "localize" / "pretext" / "flip" / "checkpoint.pt"

    def stop_once_started():
        deadline = time.time() + 120
        while not copied.exists() and time.time() < deadline:
            time.sleep(0.05)
        local.stop(server)

    watcher = threading.Thread(target=stop_once_started, daemon=True)
    watcher.start()
    args = [a for a in _job_args(synth_root, localize_checkpoint, tmp_path / "out") if a != "--no-mlflow"]
    with pytest.raises(SystemExit) as gone:
        main([*args, "--local", "--methods", "stereo-audio", "--tracking-uri", server.url, "--mlflow-wait-s", "1"])
    watcher.join(120)
    table = tmp_path / "out" / "localize" / "localize.md"
    assert str(gone.value) == (f"localize table written ({table}, results in {table.parent}) but MLflow at "
                               f"{server.url} did not answer within 1 s, so it is not logged there; `python -m "
                               f"jobs.report --runs {tmp_path / 'out'}` assembles the tables without MLflow")
    assert "Table 3" in table.read_text()
    [row] = json.loads((table.parent / "localize.json").read_text())["rows"]
    assert row["method"] == "stereo-audio" and len(row["per_clip"]["iou"]) == 2
    experiment = store.get_experiment_by_name("flipray-downstream").experiment_id
    assert store.search_runs([experiment]) == []
    note = table.parent / "mlflow-unfinished.json"  # what it had begun logging: nothing, the server was already gone
    assert json.loads(note.read_text()) == {"tracking_uri": server.url, "runs": []}

    # Had the server gone after the job's first runs, they would stay RUNNING there: the note lists them, and the
    # next job with this --out, its server back on the port and store, ends them before logging its own table.
    cut_off = [store.create_run(experiment).info.run_id for _ in range(3)]
    store.set_terminated(cut_off[1])  # ended before the server went: left alone
    store.delete_run(cut_off[2])  # deleted in the UI since: left alone, as a run id the store never had
    note.write_text(json.dumps({"tracking_uri": server.url, "runs": [*cut_off, "0" * 32]}))
    mlflow_servers.append(local.start_mlflow(tmp_path / "mlflow", port=server.port))
    summary = main([*args, "--local", "--methods", "stereo-audio", "--tracking-uri", server.url])
    assert [store.get_run(r).info.status for r in cut_off] == ["KILLED", "FINISHED", "RUNNING"]
    assert store.get_run(cut_off[0]).data.tags["flipray.unfinished"] == "true"
    assert all("flipray.unfinished" not in store.get_run(r).data.tags for r in cut_off[1:])
    assert f"{table.parent}: ended 1 MLflow run(s) an earlier job began logging to {server.url}" in capsys.readouterr().out
    assert not note.exists() and store.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_job_on_ray(synth_root, localize_checkpoint, tmp_path, ray_local):
    from jobs.localize import main
    summary = main(_job_args(synth_root, localize_checkpoint, tmp_path, "--methods", "stereo-audio"))
    table = json.loads((tmp_path / "localize" / "localize.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["stereo-audio"]
    # the Ray task gives the in-process result: same seed, same clips, same numbers
    here = main(_job_args(synth_root, localize_checkpoint, tmp_path / "here", "--local", "--methods", "stereo-audio"))
    [row] = json.loads((tmp_path / "here" / "localize" / "localize.json").read_text())["rows"]
    assert table["rows"][0]["per_clip"]["iou"] == pytest.approx(row["per_clip"]["iou"], rel=1e-4, abs=1e-6)
    assert summary["results"]["stereo-audio"]["iou"] == pytest.approx(here["results"]["stereo-audio"]["iou"],
                                                                      rel=1e-4)
