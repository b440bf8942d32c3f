"""`flipray check` and `flipray fix` on real encoded files made here: H.264+AAC mp4 at other sizes, frame rates and
sample rates than training, cut from test-split clips of the `demo_run` fixture's dataset, and channel-swapped copies.

    .venv/bin/python -m pytest tests/test_check.py -x -q

What is checked: verdicts are right at the rate the demo model's test accuracy predicts (an exact binomial bound,
computed from the accuracy, not a fixed number); `fix` keeps the video stream bit for bit, really swaps the audio and
flips the verdict; bad inputs get their documented one-line message and exit code; a batch on Ray gives the
in-process results; the library imports without Ray or MLflow.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from flipray import check, cli
from flipray.dataset.manifest import read_manifest

torch.set_num_threads(1)

N_CLIPS = 8      # test scenes, each as recorded and channel-swapped
ALPHA = 0.01     # chance that a model as good as its test accuracy fails the accuracy bound
# (vf, audio rate): a 4:3 pillarboxed frame at 25 fps and a larger square at 30 fps, AAC at 44.1 and 48 kHz; the
# content stays the centre square the model crops
FORMATS = [("fps=25,scale=240:240:flags=bicubic,pad=320:240:40:0", 44100), ("fps=30,scale=360:360", 48000)]


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


def _encode(video: Path, wave, sr: int, out: Path, vf: str, rate: int) -> Path:
    wav = out.with_suffix(".wav")
    sf.write(wav, wave, sr)
    _ffmpeg("-i", str(video), "-i", str(wav), "-map", "0:v", "-map", "1:a", "-vf", vf, *H264,
            "-c:a", "aac", "-ar", str(rate), "-b:a", "128k", "-shortest", str(out))
    wav.unlink()
    return out


def _video_md5(path: Path) -> str:
    """MD5 of the video stream's packets (no decoding): equal means the picture was copied bit for bit."""
    out = subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path), "-map", "0:v",
                          "-c", "copy", "-f", "md5", "-"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _min_correct(n: int, p: float, alpha: float) -> int:
    """The largest k with P(Binomial(n, p) < k) <= alpha: fewer than k right would be surprising for accuracy p."""
    k, tail = 0, 0.0
    while k < n and tail + math.comb(n, k) * p ** k * (1 - p) ** (n - k) <= alpha:
        tail += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        k += 1
    return k


@pytest.fixture(scope="module")
def videos(demo_run, tmp_path_factory) -> list[tuple[Path, Path]]:
    """(as recorded, channels swapped) mp4 pairs from the first N_CLIPS test scenes (one clip per scene)."""
    root, out = Path(demo_run["data"]), tmp_path_factory.mktemp("check-videos")
    clips, scenes = [], set()
    for c in read_manifest(root, "test"):
        if c["scene_id"] not in scenes:
            scenes.add(c["scene_id"])
            clips.append(c)
    pairs = []
    for i, c in enumerate(clips[:N_CLIPS]):
        wave, sr = sf.read(root / c["audio"], dtype="float32")
        vf, rate = FORMATS[i % len(FORMATS)]
        pairs.append(tuple(_encode(root / c["video"], w, sr, out / f"{c['clip_id']}{tag}.mp4", vf, rate)
                           for w, tag in ((wave, ""), (wave[:, ::-1], "_swapped"))))
    return pairs


@pytest.fixture(scope="module")
def model(demo_run):
    return check.load_check_model(str(demo_run["checkpoint"]))


@pytest.fixture(scope="module")
def results(videos, model) -> list[tuple[check.CheckResult, check.CheckResult]]:
    net, cfg = model
    flat = check.check_files([str(p) for pair in videos for p in pair], net, cfg, progress=False)
    return list(zip(flat[0::2], flat[1::2]))


@pytest.mark.slow
def test_verdicts_on_reencoded_videos_match_the_test_accuracy(videos, model, results, demo_run):
    from torchcodec.decoders import AudioDecoder, VideoDecoder
    _, cfg = model
    for orig, _ in videos[:len(FORMATS)]:  # the inputs really differ from the training clips (256 px, 6 fps, 16 kHz)
        vm, am = VideoDecoder(str(orig)).metadata, AudioDecoder(str(orig)).metadata
        assert (vm.width, round(vm.average_fps)) in ((320, 25), (360, 30)) and am.sample_rate in (44100, 48000)
    windows = len(check.window_starts(60, 10 * cfg.data.sample_rate, cfg, 1.0))  # a 10-s clip, 1-s hop
    for orig, swapped in results:
        assert orig.error is None and swapped.error is None
        assert orig.windows == swapped.windows == windows == 8
        assert len(orig.timeline) == windows and orig.duration_s == pytest.approx(10.0, abs=0.1)
        # the four-view average makes a swapped copy score 1 - P of the original, up to what AAC changes
        assert orig.p_swapped + swapped.p_swapped == pytest.approx(1.0, abs=0.1)
    verdicts = [(o.verdict, s.verdict) for o, s in results]
    right = sum((o == "correct") + (s == "swapped") for o, s in verdicts)
    # a clip and its swapped copy are the same content scored twice: count clips, not videos, for the bound
    acc = demo_run["report"]["flip_accuracy"]["test"]["acc"]
    need = 2 * _min_correct(N_CLIPS, acc, ALPHA)
    assert right >= need, f"{right}/{2 * N_CLIPS} verdicts right, need {need} (test accuracy {acc:.3f}): {verdicts}"
    p_orig = sum(o.p_swapped for o, _ in results) / len(results)
    p_swap = sum(s.p_swapped for _, s in results) / len(results)
    assert p_swap - p_orig > 0.5


def _weakest_window(orig: check.CheckResult, swapped: check.CheckResult) -> float:
    """How far the least sure scored window of a clip (either copy) is on the right side of 0.5."""
    return min([0.5 - p for _, p in orig.timeline if p is not None] +
               [p - 0.5 for _, p in swapped.timeline if p is not None])


@pytest.mark.slow
def test_a_swapped_stretch_is_found_where_it_is(videos, results, model, demo_run, tmp_path, capsys):
    """An edit: 10 s as recorded, 10 s swapped, 10 s as recorded -> undecidable, with the swapped stretch located,
    and exit code 1 (a script trusting the exit code must not miss an edited video)."""
    net, cfg = model
    right = [j for j in range(len(videos)) if (results[j][0].verdict, results[j][1].verdict) == ("correct", "swapped")]
    # fewer than 3 of 8 clips right has probability < 1e-4 for a model at the demo's >= 90% test accuracy: a failure
    # here is a broken model or check, not bad luck
    assert len(right) >= 3, f"only clips {right} of {len(videos)} got both verdicts right"
    # the surest of them, the surest swapped in the middle: a clip right only on average (the synthetic set's harder
    # microphone setups) has windows the model itself calls the other way, and check reports those faithfully as a
    # break in the stretch; this test is about locating a stretch, test_verdicts_* about how often the model is right
    b, a, c = sorted(right, key=lambda j: _weakest_window(*results[j]), reverse=True)[:3]
    # concat wants one size and frame rate: every part in FORMATS[0] (the other format's square scaled into it)
    parts = [f"[{k}:v]{FORMATS[0][0] if j % len(FORMATS) else 'null'},setsar=1[v{k}];"
             f"[{k}:a]aresample={FORMATS[0][1]}[a{k}];" for k, j in enumerate((a, b, c))]
    edit = tmp_path / "edit.mp4"
    _ffmpeg("-i", str(videos[a][0]), "-i", str(videos[b][1]), "-i", str(videos[c][0]), "-filter_complex",
            "".join(parts) + "[v0][a0][v1][a1][v2][a2]concat=n=3:v=1:a=1[v][a]", "-map", "[v]", "-map", "[a]",
            *H264, "-c:a", "aac", "-b:a", "128k", str(edit))
    [r] = check.check_files([str(edit)], net, cfg, progress=False)
    assert r.verdict == "undecidable" and r.windows == 28
    [(start, end)] = r.swapped_segments
    assert start == pytest.approx(10.0, abs=2.0) and end == pytest.approx(20.0, abs=2.0)
    assert f"swapped in {start:.1f}-{end:.1f} s" in check.describe(r)
    capsys.readouterr()
    assert cli.main(["check", str(edit), "--model", str(demo_run["checkpoint"])]) == check.EXIT_SWAPPED
    assert f"swapped in {start:.1f}-{end:.1f} s" in capsys.readouterr().out


@pytest.mark.slow
def test_fix_swaps_the_audio_back_and_copies_the_video(videos, results, demo_run, tmp_path, capsys):
    from torchcodec.decoders import AudioDecoder
    # the clip the model gets right most surely, so "the verdict flips" tests fix, not the model's weak spots
    right = [j for j, (o, s) in enumerate(results) if (o.verdict, s.verdict) == ("correct", "swapped")]
    assert right, "no clip got both verdicts right"
    i = min(right, key=lambda j: results[j][0].p_swapped)
    orig, swapped = videos[i]
    fixed = tmp_path / "fixed.mp4"
    assert cli.main(["fix", str(swapped), "--out", str(fixed)]) == 0
    assert _video_md5(fixed) == _video_md5(swapped)
    a_in, a_out = (AudioDecoder(str(p)) for p in (swapped, fixed))
    assert (a_out.metadata.codec, a_out.metadata.sample_rate) == ("aac", a_in.metadata.sample_rate)
    w_in, w_out = a_in.get_all_samples().data, a_out.get_all_samples().data
    n = min(w_in.shape[1], w_out.shape[1])
    corr = torch.corrcoef(torch.stack([w_in[0, :n], w_in[1, :n], w_out[0, :n], w_out[1, :n]]))
    assert corr[2, 1] > 0.98 and corr[3, 0] > 0.98  # out left = in right and the other way round
    assert corr[2, 1] > corr[2, 0] + 0.01  # ... and not just a copy of two nearly equal channels

    capsys.readouterr()
    assert cli.main(["check", str(fixed), "--model", str(demo_run["checkpoint"]), "--json"]) == 0
    [after] = json.loads(capsys.readouterr().out)
    assert after["verdict"] == "correct" and after["p_swapped"] < 0.5 - check.CheckOptions.margin
    broken = tmp_path / "broken.mp4"  # fixing a correct file breaks it: the verdict flips the other way
    assert cli.main(["fix", str(orig), "--out", str(broken)]) == 0
    assert cli.main(["check", str(broken), "--model", str(demo_run["checkpoint"])]) == check.EXIT_SWAPPED
    assert "channels look SWAPPED" in capsys.readouterr().out
    assert cli.main(["fix", str(orig), "--out", str(broken)]) == check.EXIT_UNCHECKED  # no silent overwrite
    assert "exists" in capsys.readouterr().err


def _bad_inputs(folder: Path) -> dict[str, tuple[str, str]]:
    """{file: (reason code, words its message must contain)}."""
    d = "testsrc2=s=320x240:r=25:d=4"
    stereo = "aevalsrc=0.5*sin(2*PI*440*t)|0.2*sin(2*PI*3000*t):s=48000:d={d}"
    aac = ["-c:a", "aac", "-shortest"]
    _ffmpeg("-f", "lavfi", "-i", d, *H264, str(folder / "no_audio.mp4"))
    _ffmpeg("-f", "lavfi", "-i", d, "-f", "lavfi", "-i", "sine=f=440:r=44100:d=4", *H264, *aac,
            str(folder / "mono.mp4"))
    _ffmpeg("-f", "lavfi", "-i", d, "-f", "lavfi", "-i", "sine=f=440:r=44100:d=4", "-ac", "2", *H264, *aac,
            str(folder / "dual_mono.mp4"))
    _ffmpeg("-f", "lavfi", "-i", d, "-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-t", "4", *H264, *aac,
            str(folder / "silent.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=0.5", "-f", "lavfi", "-i", stereo.format(d=0.5), *H264,
            *aac, str(folder / "short.mp4"))
    (folder / "notes.mp4").write_text("not a video, whatever its name says\n")
    return {"no_audio.mp4": ("no-audio", "no audio stream"), "mono.mp4": ("mono", "mono audio"),
            "dual_mono.mp4": ("dual-mono", "dual mono"), "silent.mp4": ("silent", "silent audio"),
            "short.mp4": ("too-short", "shorter than one 2.87-s window"),
            "notes.mp4": ("not-a-video", "not a video ffmpeg can read")}


@pytest.mark.slow
def test_bad_inputs_get_one_line_each_and_exit_codes(videos, demo_run, tmp_path, capsys):
    bad = _bad_inputs(tmp_path)
    ckpt = str(demo_run["checkpoint"])
    for name, (_, words) in bad.items():
        assert cli.main(["check", str(tmp_path / name), "--model", ckpt]) == check.EXIT_UNCHECKED, name
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / name}: cannot check: ") and words in lines[0]
    # a batch: one swapped video and every bad input -> both exit bits, a JSON object per input, in order
    paths = [str(videos[0][1])] + [str(tmp_path / name) for name in bad]
    assert cli.main(["check", *paths, "--model", ckpt, "--json"]) == check.EXIT_SWAPPED | check.EXIT_UNCHECKED
    objs = json.loads(capsys.readouterr().out)
    assert [o["path"] for o in objs] == paths
    assert objs[0]["error"] is None and objs[0]["verdict"] == "swapped"
    for o, (reason, words) in zip(objs[1:], bad.values()):
        assert (o["reason"], o["verdict"], o["p_swapped"], o["windows"]) == (reason, "undecidable", None, 0)
        assert words in o["error"]
    assert cli.main(["fix", str(tmp_path / "mono.mp4"), "--out", str(tmp_path / "x.mp4")]) == check.EXIT_UNCHECKED
    assert "mono audio" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_no_model_says_how_to_get_one(videos, tmp_path, monkeypatch, capsys):
    video = str(videos[0][0])
    assert cli.main(["check", video, "--model", str(tmp_path / "none.pt")]) == check.EXIT_NO_MODEL
    assert "none.pt" in capsys.readouterr().err
    store = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert cli.main(["check", video]) == check.EXIT_NO_MODEL  # the default: the newest registered model
    err = capsys.readouterr().err
    assert "make demo" in err and str(store) in err and "--model" in err
    assert not store.exists()  # looking did not create an empty store


@pytest.mark.slow
def test_plot_and_json(videos, results, demo_run, tmp_path, capsys):
    import matplotlib.image
    swapped = videos[0][1]
    out = tmp_path / "timeline.png"
    cli.main(["check", str(swapped), "--model", str(demo_run["checkpoint"]), "--json", "--plot", str(out)])
    [obj] = json.loads(capsys.readouterr().out)
    assert set(obj) >= {"path", "verdict", "p_swapped", "windows", "agree_fraction", "error"}
    assert obj["p_swapped"] == pytest.approx(results[0][1].p_swapped, abs=1e-4)
    assert obj["windows"] == len(obj["timeline"]) == 8
    assert 0.5 <= obj["agree_fraction"] <= 1.0
    img = matplotlib.image.imread(out)
    assert img.shape[1] == 1100 and 300 < img.shape[0] < 800 and img.std() > 0.05  # a picture, not a blank page


@pytest.mark.slow
def test_ray_batch_gives_the_in_process_results(ray_local, videos, results, model):
    net, cfg = model
    paths = [str(p) for p in videos[1]]
    on_ray = check.check_files(paths, net, cfg, use_ray=True, progress=False)
    for got, want in zip(on_ray, results[1]):
        assert (got.path, got.verdict, got.windows) == (want.path, want.verdict, want.windows)
        assert got.p_swapped == pytest.approx(want.p_swapped, abs=1e-3)


def test_library_imports_without_ray_or_mlflow():
    code = ("import sys, flipray.check, flipray.cli; "
            "print(sorted({'ray', 'mlflow'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_scoring_runs_features_and_model_on_the_check_device():
    """`flipray check --device cuda` puts the model (and its audio front end) on the GPU: the CPU waveforms must
    follow (they did not: "stft input and window must be on the same device"). `meta` stands in for the GPU; the
    probe runs the real network, front end included, there and hands back CPU scores."""
    from flipray.config import load_config
    from flipray.pretext.models import SpatialAlignmentNet

    cfg = load_config("demo", ["data.num_frames=3", "data.resize=40", "data.crop=32", "data.n_mels=32",
                               "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32",
                               "model.fusion_dim=32"])

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.seen = SpatialAlignmentNet(cfg).to("meta"), []

        def forward(self, video, audio):
            self.seen.append((video.device.type, audio.device.type))
            return torch.zeros(self.net(video, audio).shape[0])  # meta has no values: 0 logits, P = 0.5

    n = cfg.window_frames + 6
    media = check.Media(frames=torch.zeros(n, 40, 40, 3, dtype=torch.uint8), frame_pos={i: i for i in range(n)},
                        wave=torch.randn(2, round(n / cfg.data.fps * cfg.data.sample_rate)), starts=[0, 6],
                        duration_s=n / cfg.data.fps, grid_frames=n)
    probe = Probe()
    p = check.score_windows(probe, cfg, media, [0, 6], check.CheckOptions(device="meta", batch_size=1))
    assert probe.seen == [("meta", "meta")] * 2 and p == [0.5, 0.5]


def test_frame_fits_of_a_wide_video_keep_or_lose_its_sides():
    """--frame-fit: a wide frame's leftmost columns (where a sounding object at the side would be) are cut by "crop",
    kept by "pad" (bars of the frame's mean colour above and below) and by "squash" (full height)."""
    from flipray.pretext.data import resize_square

    frame = torch.full((1, 16, 32, 3), 100, dtype=torch.uint8)
    frame[0, :, :4] = torch.tensor([250, 0, 0], dtype=torch.uint8)  # a red object on the left eighth
    crop, pad, squash = (resize_square(frame, 16, fit)[0].int() for fit in ("crop", "pad", "squash"))
    red = lambda img: (img[..., 0] > 200) & (img[..., 1] < 60)
    assert not red(crop).any() and (crop == 100).all()
    mean = frame.float().mean(dim=(0, 1, 2)).round().int()  # (4 red columns + 28 grey) / 32
    assert (pad[:3] == mean).all() and (pad[-3:] == mean).all()  # 32 wide -> 16: the 16 rows become 8, padded 4 + 4
    assert red(pad[4:12, :2]).all() and not red(pad[4:12, 3:]).any()
    assert red(squash[:, :2]).all() and not red(squash[:, 3:]).any()
    assert torch.equal(resize_square(frame, None), squash[None].to(torch.uint8))  # the default; no size: its height
    tall = frame.transpose(1, 2)  # red on top: a tall frame is centre-cropped whatever the fit (its width is whole)
    assert all(torch.equal(resize_square(tall, 16, fit), tall[:, 8:24]) for fit in ("crop", "pad", "squash"))
    with pytest.raises(ValueError, match="frame fit must be one of crop, pad, squash"):
        resize_square(frame, 16, "stretch")


def test_check_fits_a_wide_video_as_told(tmp_path):
    """The frames `flipray check` scores from a 2:1 video: padded to a square with --frame-fit pad (bars of one colour
    above and below, the whole width kept), cropped to its centre with crop, squashed whole by default."""
    from flipray.config import load_config

    cfg = load_config("demo")
    wide = tmp_path / "wide.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x160:rate=25:duration=4", "-f", "lavfi", "-i",
            "sine=frequency=440:sample_rate=48000:duration=4", "-filter_complex", "[1:a][1:a]amerge=inputs=2[a]",
            "-map", "0:v", "-map", "[a]", *H264, "-c:a", "aac", str(wide))
    padded, cropped, squashed = (check._decode(str(wide), None, cfg, check.CheckOptions(**fit)).frames.int()
                                 for fit in (dict(frame_fit="pad"), dict(frame_fit="crop"), {}))
    assert padded.shape[1:] == cropped.shape[1:] == squashed.shape[1:] == (cfg.data.resize, cfg.data.resize, 3)
    # squashed: the whole frame, so its top rows are the pattern's top rows, as wide as the padded picture's
    top = (cfg.data.resize - cfg.data.resize // 2) // 2
    assert (squashed[:, 0].float() - padded[:, top + 1].float()).abs().mean() < \
        (squashed[:, 0].float() - cropped[:, 0].float()).abs().mean()
    bar = cfg.data.resize // 4 - 2  # 160 of 320 rows are picture: a quarter above, a quarter below, less the blur
    assert (padded[:, :bar] - padded[:, :1, :1]).abs().max() <= 1  # one colour per frame
    assert (padded[:, -bar:] - padded[:, -1:, -1:]).abs().max() <= 1
    assert (cropped[:, :bar] - cropped[:, :1, :1]).abs().amax(dim=(1, 2, 3)).min() > 30  # test pattern up there
