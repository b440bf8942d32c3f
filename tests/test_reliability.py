"""Bad inputs and faults (docs/reliability.md): every bad file gets one line and the batch goes on, exit codes mean what
the README says, a user's file is replaced only by an atomic rename of a complete result, a dataset never loses clips,
paths from manifests and CSVs stay inside their root, local services bind to 127.0.0.1, dead services fail fast.

    .venv/bin/python -m pytest tests/test_reliability.py -x -q -m "not slow"

The bad files are made here with ffmpeg. `flipray check` runs with a real SpatialAlignmentNet whose classifier is
zeroed: P(swapped) is exactly 0.5 for every window, so a checked file's verdict (undecidable, no segments) and the
exit code are known without training a model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flipray import check, cli, media
from flipray.dataset import ingest
from flipray.dataset.manifest import MANIFEST_NAME, read_manifest
from flipray.dataset.store import Store, upload_dataset

REPO = Path(__file__).resolve().parents[1]
H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
AAC = ["-c:a", "aac", "-b:a", "128k"]
STEREO = "aevalsrc=0.5*sin(2*PI*440*t)|0.3*sin(2*PI*660*t+1):s=48000:d={d}"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def make_video(path: Path, seconds: float = 5, audio: str | None = STEREO, extra: tuple = (), size="320x240",
               fps: int = 25) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=s={size}:r={fps}:d={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", audio.format(d=seconds), *AAC]
    _ffmpeg(*args, *H264, *extra, str(path))
    return path


def bad_inputs(folder: Path) -> dict[str, str]:
    """{file: the reason code `flipray check` must give}: every bad input of docs/reliability.md."""
    folder.mkdir(parents=True, exist_ok=True)
    make_video(folder / "no_audio.mp4", 4, audio=None)
    _ffmpeg("-f", "lavfi", "-i", STEREO.format(d=4), *AAC, str(folder / "audio_only.m4a"))
    make_video(folder / "mono.mp4", 4, audio="sine=f=440:r=44100:d={d}")
    make_video(folder / "six.mp4", 4, audio="sine=f=440:r=48000:d={d}", extra=("-ac", "6"))
    make_video(folder / "dual_mono.mp4", 4, audio="sine=f=440:r=44100:d={d}", extra=("-ac", "2"))
    make_video(folder / "silent.mp4", 4, audio="anullsrc=r=48000:cl=stereo:d={d}")
    make_video(folder / "short.mp4", 0.5)
    # a half-downloaded file: the index at the front (+faststart) promises 10 s, half the bytes are there
    whole = make_video(folder / "whole.mp4", 10, size="640x360", fps=30, extra=("-movflags", "+faststart"))
    data = whole.read_bytes()
    (folder / "half.mp4").write_bytes(data[:len(data) // 2])
    whole.unlink()
    (folder / "notes.mp4").write_text("not a video, whatever its name says\n")
    (folder / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 80)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "a-folder.mp4").mkdir()
    return {"no_audio.mp4": "no-audio", "audio_only.m4a": "no-video", "mono.mp4": "mono", "six.mp4": "channels",
            "dual_mono.mp4": "dual-mono", "silent.mp4": "silent", "short.mp4": "too-short", "half.mp4": "corrupt",
            "notes.mp4": "not-a-video", "garbage.mp4": "not-a-video", "empty.mp4": "empty",
            "missing.mp4": "missing", "a-folder.mp4": "missing"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    make_video(folder / "good.mp4", 5)
    make_video(folder / "good2.mkv", 4)
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    make_video(folder / "a" / "clip.mp4", 4)
    make_video(folder / "b" / "clip.mp4", 4)
    return folder


@pytest.fixture(scope="module")
def bad(files) -> dict[str, str]:
    return bad_inputs(files / "bad")


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory) -> Path:
    """A demo-preset checkpoint whose classifier is zeroed: P(swapped) = 0.5 for every window."""
    from flipray.config import load_config
    from flipray.pretext.models import SpatialAlignmentNet
    cfg = load_config("demo")
    net = SpatialAlignmentNet(cfg)
    torch.nn.init.zeros_(net.classifier.weight)
    torch.nn.init.zeros_(net.classifier.bias)
    path = tmp_path_factory.mktemp("model") / "flat.pt"
    torch.save({"model": net.state_dict(), "config": cfg.to_dict()}, path)
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`flipray ARGS` in a child process (a traceback or a hang there cannot take the test run with it)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flipray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


# ---------------------------------------------------------------------------------------------------------------------
# flipray check

def test_batch_over_every_bad_input_gives_both_verdicts_one_line_each_and_exit_2(files, bad, flat_model, capsys):
    """Issue 15 #1 and the batch test: good.mp4, every bad input, good2.mkv. The command in a child process; its
    --json output in this one (the same main)."""
    paths = [str(files / "good.mp4")] + [str(files / "bad" / name) for name in bad] + [str(files / "good2.mkv")]
    proc = run_cli("check", *paths, "--model", str(flat_model))
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(paths), proc.stdout
    assert lines[0].startswith(f"{paths[0]}: undecidable (P(swapped) 0.50") and "5.0 s" in lines[0]
    assert lines[-1].startswith(f"{paths[-1]}: undecidable (P(swapped) 0.50") and "4.0 s" in lines[-1]
    for path, line in zip(paths[1:-1], lines[1:-1]):
        assert line.startswith(f"{path}: cannot check: "), line
    assert proc.returncode == check.EXIT_UNCHECKED  # 2: nothing swapped, some inputs could not be checked
    code = cli.main(["check", *paths, "--model", str(flat_model), "--json"])
    objs = json.loads(capsys.readouterr().out)
    assert [o["reason"] for o in objs[1:-1]] == list(bad.values())
    assert objs[0]["error"] is None and objs[-1]["error"] is None
    assert objs[0]["p_swapped"] == objs[-1]["p_swapped"] == 0.5 and objs[0]["swapped_segments"] == []
    assert code == check.EXIT_UNCHECKED


def test_file_names_that_start_with_a_dash(files, flat_model, tmp_path, monkeypatch, capsys):
    """`flipray check -- -take.mp4` in the file's folder: ffprobe read "-take.mp4" as an option and the video was
    "not a video ffmpeg can read"; `flipray fix --out=-fixed.mp4 -- -take.mp4` writes and swaps."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-take.mp4").write_bytes((files / "good.mp4").read_bytes())
    assert media.probe("-take.mp4").video_size == media.probe(files / "good.mp4").video_size
    assert cli.main(["check", "--model", str(flat_model), "--json", "--", "-take.mp4"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["error"] is None and result["p_swapped"] == 0.5 and result["windows"] > 0
    assert cli.main(["fix", "--out=-fixed.mp4", "--", "-take.mp4"]) == 0
    capsys.readouterr()
    from torchcodec.decoders import AudioDecoder
    before, after = (AudioDecoder(name).get_all_samples().data for name in ("-take.mp4", "-fixed.mp4"))
    n = min(before.shape[1], after.shape[1])
    corr = torch.corrcoef(torch.cat([before[:, :n], after[:, :n]]))
    assert corr[2, 1] > 0.98 and corr[3, 0] > 0.98 and corr[2, 1] > corr[2, 0] + 0.01  # left and right traded


def test_half_downloaded_faststart_file_is_reported_cut_short(bad, files, flat_model):
    net, cfg = check.load_check_model(str(flat_model))
    r = check.check_file(files / "bad" / "half.mp4", net, cfg)
    assert r.reason == "corrupt" and r.verdict == "undecidable" and r.p_swapped is None
    assert "cut short" in r.error or "cannot decode" in r.error


def test_exit_code_counts_a_partly_swapped_video_as_swapped():
    """Issue 15 #7: an edit (undecidable, swapped in one stretch) must not exit 0."""
    edit = check.CheckResult("edit.mp4", verdict="undecidable", p_swapped=0.45, windows=28, agree_fraction=0.64,
                             duration_s=30.0,
                             swapped_segments=[[9.9, 19.9]])
    fine = check.CheckResult("fine.mp4", verdict="correct", p_swapped=0.1, windows=8)
    assert check.exit_code([fine]) == 0
    assert check.exit_code([fine, edit]) == check.EXIT_SWAPPED
    unreadable = check.CheckResult("x.mp4", error="no such file", reason="missing")
    assert check.exit_code([edit, unreadable]) == check.EXIT_SWAPPED | check.EXIT_UNCHECKED
    assert "swapped in 9.9-19.9 s" in check.describe(edit)


@pytest.mark.parametrize("payload", ["list", "tensor", "string-config", "no-weights", "wrong-config", "sqlite",
                                     "pickled-object"])
def test_malformed_checkpoints_exit_4_with_one_line(payload, files, tmp_path, capsys):
    """Issue 15 #6; also a file that is no checkpoint at all (the MLflow database given as --model) and a pickle of an
    object, which torch.load(weights_only=True) refuses with a many-line message that suggests weights_only=False."""
    bad_ckpt = tmp_path / f"{payload}.pt"
    if payload == "sqlite":  # a database with MLflow's experiments table, as flipray.tracking.check_store knows one
        import sqlite3
        with contextlib.closing(sqlite3.connect(bad_ckpt)) as db:
            db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
            db.commit()
    elif payload == "pickled-object":
        torch.save(argparse.Namespace(config={}, model={}), bad_ckpt)
    else:
        torch.save({"list": [1, 2, 3], "tensor": torch.zeros(3), "string-config": {"model": {}, "config": "demo"},
                    "no-weights": {"config": {"data": {}}},
                    "wrong-config": {"model": {}, "config": {"data": {"no_such_field": 1}, "model": {}, "train": {}}},
                    }[payload], bad_ckpt)
    assert cli.main(["check", str(files / "good.mp4"), "--model", str(bad_ckpt)]) == check.EXIT_NO_MODEL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad_ckpt) in err[0] and "not a" in err[0], err
    assert "weights_only` set to `False`" not in err[0] and "will likely succeed" not in err[0]
    assert ("--tracking-uri sqlite:///" in err[0]) == (payload == "sqlite")  # the MLflow store given as --model


def test_plot_into_a_missing_folder_and_same_stem_inputs(files, flat_model, tmp_path, capsys):
    """Issue 15 #8: the folder is made; a/clip.mp4 and b/clip.mp4 get a plot each."""
    out = tmp_path / "new" / "deeper" / "timeline.png"
    code = cli.main(["check", str(files / "a" / "clip.mp4"), str(files / "b" / "clip.mp4"), "--model",
                     str(flat_model), "--plot", str(out)])
    assert code == 0
    pngs = sorted(p.name for p in out.parent.iterdir())
    assert pngs == ["timeline-clip-2.png", "timeline-clip.png"]
    for name in pngs:
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out.parent / name).stat().st_mode & 0o777 == _umask_mode()
    err = capsys.readouterr().err
    assert err.count("timeline: ") == 2


def test_plot_that_cannot_be_written_is_one_line_and_exit_2(files, flat_model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # --plot a-file/t.png: its folder cannot be made
    code = cli.main(["check", str(files / "good.mp4"), "--model", str(flat_model), "--plot", str(blocker / "t.png")])
    assert code == check.EXIT_UNCHECKED
    assert "cannot write the timeline" in capsys.readouterr().err


@pytest.mark.slow  # waits out Ray's connection attempt
def test_ray_at_an_address_that_does_not_answer_fails_fast_and_checks_here(files, flat_model):
    """Issue 15 #9: RAY_ADDRESS names a cluster that is gone. Before: ray.init waited for minutes."""
    address = f"127.0.0.1:{_free_port()}"
    proc = run_cli("check", str(files / "good.mp4"), "--model", str(flat_model), "--ray", timeout=120,
                   env={"RAY_ADDRESS": address})
    assert f"cannot reach the Ray cluster at {address} (from RAY_ADDRESS)" in proc.stderr, proc.stderr[-2000:]
    assert "checking in this process" in proc.stderr
    assert proc.stdout.startswith(f"{files / 'good.mp4'}: undecidable") and proc.returncode == 0


@pytest.mark.slow  # waits out MLflow's connection attempt
def test_dead_mlflow_server_fails_fast_saying_what_was_tried(files):
    """Issue 15 #9: before, MLflow retried for 278 s."""
    uri = f"http://127.0.0.1:{_free_port()}"
    proc = run_cli("check", str(files / "good.mp4"), "--tracking-uri", uri, timeout=120)
    assert proc.returncode == check.EXIT_NO_MODEL, proc.stderr[-2000:]
    assert f"no MLflow server answers at {uri} (tried GET {uri}/health" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_health_check_answered_by_something_that_is_not_http_is_not_healthy():
    """cluster.local waits for a service by asking its health URL; when another process holds the port (a rehearsal
    saw one of Ray's own ports land on the one picked for MLflow, which answered in gRPC bytes) the check is a "no"
    that the wait goes on from, not an http.client.BadStatusLine out of `up`."""
    import threading

    from cluster import local
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def answer_in_binary():
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00@\xfe binary, not HTTP\r\n")
    thread = threading.Thread(target=answer_in_binary, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        assert local._http_get(f"{url}/health") == (0, b"")
        assert local.mlflow_healthy(url) is False
    finally:
        thread.join(10)
        server.close()


def test_s3_that_does_not_answer_is_one_line_before_a_job_starts(files, tmp_path):
    """An S3 endpoint that does not answer (a stopped MinIO, a wrong AWS_ENDPOINT_URL): before, ingest started Ray
    and failed every clip ("task failed (ray::clip_task() (pid=...))" with terminal colour codes), and training
    failed with a botocore traceback; now one line names the option, the endpoint and the error, exit 2, and
    nothing starts."""
    endpoint = f"http://127.0.0.1:{_free_port()}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    (tmp_path / "videos").mkdir()
    shutil.copy(files / "good.mp4", tmp_path / "videos")
    for args, option in ((["ingest", "--videos", str(tmp_path / "videos"), "--out", "s3://flipray/ds"],
                          "--out s3://flipray/ds"),
                         (["ingest", "--videos", "s3://flipray/raw/", "--out", str(tmp_path / "ds")],
                          "--videos s3://flipray/raw"),
                         (["train-pretext", "--set", "data.root=s3://flipray/ds", "--set",
                           f"train.out_dir={tmp_path / 'runs'}"], "data.root s3://flipray/ds")):
        proc = run_cli(*args, timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"flipray {args[0]}: ")]
        assert len(line) == 1 and line[0].startswith(f"flipray {args[0]}: {option}: cannot reach S3 at {endpoint} "
                                                     f"(Could not connect to the endpoint URL"), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Ray" not in proc.stderr  # refused before Ray started
    assert not (tmp_path / "runs").exists()


@contextlib.contextmanager
def _folder_held(folder: Path, name: str):
    """Another process holding flipray.atomic.folder_lock(folder, name), as a running job does; yields it."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from flipray.atomic import folder_lock
        with folder_lock(sys.argv[1], sys.argv[2], busy=print):
            print("held", flush=True)
            sys.stdin.readline()
    """), str(folder), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_table_job_or_sweep_into_a_folder_another_one_is_writing_is_refused(synth_root, tmp_path):
    """Two table jobs of one task with one --out at once: the second would end the first's MLflow runs as KILLED
    (close_unfinished reads the first's note of runs begun) and write over its results; two drivers of one sweep
    would run its trials twice into one Tune experiment. The second is refused in one line before it writes
    anything; the folder's lock (flipray.atomic.folder_lock) goes with the job that holds it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    with _folder_held(out / "localize", ".table.lock") as holder:
        proc = subprocess.run([sys.executable, "-m", "jobs.localize", "--data", str(synth_root), "--out", str(out),
                               "--no-mlflow"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == (f"python -m jobs.localize: --out {out}: another localize table job "
                                                f"is writing into {out / 'localize'} (pid {holder.pid}); wait for it "
                                                f"to end, or give another --out")
        assert [p.name for p in (out / "localize").iterdir()] == [".table.lock"]  # nothing else written
    sweeps = tmp_path / "sweeps"
    with _folder_held(sweeps / "s1", ".sweep.lock") as holder:
        proc = subprocess.run([sys.executable, "-m", "tuning.sweep", "--task", "localize", "--name", "s1", "--storage",
                               str(sweeps), "--data", str(synth_root), "--tracking-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}"], capture_output=True, text=True, timeout=120,
                              cwd=REPO, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == (f"python -m tuning.sweep: --name s1: another sweep of this name is "
                                                f"running from {sweeps / 's1'} (pid {holder.pid}); wait for it to end "
                                                f"(then --restore continues it), or give another --name")
        assert [p.name for p in (sweeps / "s1").iterdir()] == [".sweep.lock"]
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


@pytest.mark.parametrize("content", [b"", b"my notes, not a database\n"])
def test_tracking_uri_at_a_file_that_is_not_an_mlflow_store_is_left_alone(content, files, tmp_path, capsys):
    """Issue 15 #9: MLflow would have turned the user's file into its database."""
    theirs = tmp_path / "theirs.db"
    theirs.write_bytes(content)
    code = cli.main(["check", str(files / "good.mp4"), "--tracking-uri", f"sqlite:///{theirs}"])
    assert code == check.EXIT_NO_MODEL
    assert "not an MLflow store" in capsys.readouterr().err
    assert theirs.read_bytes() == content
    from flipray.tracking import StoreError, init_tracking
    with pytest.raises(StoreError, match="left as it is"):  # nor does a training job take it over
        init_tracking(f"sqlite:///{theirs}", "x")
    assert theirs.read_bytes() == content


# ---------------------------------------------------------------------------------------------------------------------
# flipray fix: a failure leaves the input and any earlier --out byte-identical

def test_fix_refuses_a_hard_link_to_the_input(files, tmp_path, capsys):
    """Issue 15 #3: --out as a hard link passed the same-file check and ffmpeg truncated the input."""
    src = tmp_path / "in.mp4"
    src.write_bytes((files / "good.mp4").read_bytes())
    before = src.read_bytes()
    link = tmp_path / "link.mp4"
    os.link(src, link)
    assert cli.main(["fix", str(src), "--out", str(link), "--force"]) == check.EXIT_UNCHECKED
    assert "is the input itself" in capsys.readouterr().err
    assert src.read_bytes() == before and link.read_bytes() == before


def test_fix_force_with_a_failing_conversion_keeps_the_old_out(files, tmp_path, capsys):
    """Issue 15 #3: ffmpeg cannot put H.264 in WebM; the existing --out must survive, and no stub may be left."""
    out = tmp_path / "fixed.webm"
    out.write_bytes(b"the user's earlier result")
    src_before = (files / "good.mp4").read_bytes()
    assert cli.main(["fix", str(files / "good.mp4"), "--out", str(out), "--force"]) == check.EXIT_FFMPEG
    err = capsys.readouterr().err
    assert "nothing written" in err and err.count("\n") == 1, err  # ffmpeg's last lines, on the one line
    assert out.read_bytes() == b"the user's earlier result" and (files / "good.mp4").read_bytes() == src_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.webm"]  # no temporary file left
    fresh = tmp_path / "fresh.webm"
    assert cli.main(["fix", str(files / "good.mp4"), "--out", str(fresh)]) == check.EXIT_FFMPEG
    assert not fresh.exists()  # no stub that would block the next run with "exists"
    good = tmp_path / "fresh.mp4"
    assert cli.main(["fix", str(files / "good.mp4"), "--out", str(good)]) == 0
    assert good.stat().st_mode & 0o777 == _umask_mode()  # as a plain open() would make it, not mkstemp's 0600


def test_fix_out_that_is_a_folder_or_names_no_container_is_a_usage_error(files, tmp_path, capsys):
    """--out a folder (with --force: was ffmpeg's "Invalid argument", exit 5) or a name whose extension no ffmpeg
    muxer takes (x.txt, no extension: was exit 5, two lines of ffmpeg): one line saying what to give, exit 2."""
    folder = tmp_path / "out"
    folder.mkdir()
    cases = [([str(folder), "--force"], f"--out {folder} is a folder; give the fixed copy's file name, e.g. "
                                        f"{folder / 'good-fixed.mp4'}"),
             ([str(tmp_path / "x.txt")], f"--out {tmp_path / 'x.txt'}: ffmpeg writes no container with the extension "
                                         f"'.txt'; name the copy like the input, e.g. {tmp_path / 'x.mp4'}"),
             ([str(tmp_path / "noext")], "with the extension '(none)'")]
    for out, message in cases:
        assert cli.main(["fix", str(files / "good.mp4"), "--out", *out]) == check.EXIT_UNCHECKED
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(folder.iterdir())


def test_fix_over_every_bad_input_leaves_input_and_out_untouched(files, bad, tmp_path, capsys):
    for name in bad:
        src = files / "bad" / name
        before = src.read_bytes() if src.is_file() else None
        out = tmp_path / f"out-{name}.mp4"
        out.write_bytes(b"earlier")
        code = cli.main(["fix", str(src), "--out", str(out), "--force"])
        err = capsys.readouterr().err.strip().splitlines()
        # stereo files fix (dual mono, silent, short and audio-only ones too); the others must fail
        assert code in (0, check.EXIT_UNCHECKED, check.EXIT_FFMPEG), (name, code)
        assert code or bad[name] in ("dual-mono", "silent", "too-short", "corrupt", "no-video"), (name, code)
        if code:
            assert len(err) == 1 and err[0].startswith("flipray fix: "), (name, err)
            assert out.read_bytes() == b"earlier", name
        assert (src.read_bytes() if src.is_file() else None) == before, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------------
# ingest: sources, CSVs, clips

def test_a_clip_whose_audio_ended_early_is_not_stored(tmp_path):
    """Issue 15 #2: a 0-sample FLAC's header says 2^63-1 frames; the clip was stored and listed as 10 s."""
    src = make_video(tmp_path / "early.mp4", 20.5, audio="aevalsrc=0.5*sin(2*PI*440*t)|0.3*sin(2*PI*660*t):"
                                                        "s=48000:d=8")
    assert media.audio_samples(src) < 8.1 * 48000
    opts = ingest.Options()
    jobs = ingest.plan(ingest.Source(str(src), "early.mp4", "early"), opts)
    assert len(jobs) == 2
    store = Store(tmp_path / "ds")
    results = [ingest.ingest_clip(job, store, opts) for job in jobs]
    assert [r["status"] for r in results] == ["skipped", "skipped"]
    assert results[0]["reason"] == "incomplete clip" and results[1]["reason"] == "zero length"
    assert store.list() == []


def test_csv_with_inf_bom_bad_header_and_missing_folders(tmp_path, capsys):
    """Issue 15 #10."""
    folder = tmp_path / "dl"
    folder.mkdir()
    make_video(folder / "abcdefghijk_0_12000.mp4", 1)
    good = tmp_path / "list.csv"
    # a byte-order mark (spreadsheet export), an infinite end, a NaN start, a good row
    good.write_bytes("\ufeffytid, ts_start, ts_end\nzzzzzzzzzzz, 0, inf\nyyyyyyyyyyy, nan, 3\n"
                     "abcdefghijk, 0, 12\n".encode())
    sources, skipped = ingest.csv_sources(good, folder)
    assert [s.scene_id for s in sources] == ["abcdefghijk"]
    assert [(s["source"], s["reason"]) for s in skipped] == [("list.csv:2", "bad CSV row"),
                                                             ("list.csv:3", "bad CSV row")]
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("# a comment\nid, start, end\nabcdefghijk, 0, 12\n")
    for args, words in [(["--csv", str(bad_header), "--videos", str(folder)], f"{bad_header}:2: header lacks"),
                        (["--csv", str(good), "--videos", str(tmp_path / "nope")], "nope: no such folder"),
                        (["--csv", str(tmp_path / "none.csv"), "--videos", str(folder)], "none.csv: no such file"),
                        (["--videos", str(tmp_path / "nope")], "nope: no such folder"),
                        (["--videos", str(good)], "list.csv: not a folder, nor a video by its extension"),
                        (["--videos", str(folder), "--out", str(good)], f"--out {good}: a file, not a folder or an "
                                                                        f"s3:// prefix")]:
        assert ingest.main(["--out", str(tmp_path / "out"), *args]) == ingest.EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flipray ingest: ") and words in err[0], err
    assert not (tmp_path / "out").exists()
    # one video named directly is a source of its own (the folder form's scene id)
    [source] = ingest.folder_sources(folder / "abcdefghijk_0_12000.mp4")
    assert source == ingest.folder_sources(folder)[0]


# ---------------------------------------------------------------------------------------------------------------------
# manifests and the store

def fake_dataset(root: Path, rows: list[dict], write_files: bool = True) -> Path:
    """A clip-format dataset folder with the given manifest rows (files with stand-in bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    full = []
    for r in rows:
        cid = r["clip_id"]
        row = {"scene_id": cid.split("_")[0], "split": "train", "duration_s": 4.0, "fps": 6, "num_frames": 24,
               "sample_rate": 16000, "channels": 2, "video": f"clips/{cid}.webm", "audio": f"clips/{cid}.flac",
               "meta": f"clips/{cid}.json", **r}
        full.append(row)
        if write_files:
            for k in ("video", "audio", "meta"):
                p = root / row[k]
                if ".." not in row[k] and not Path(row[k]).is_absolute():
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(json.dumps({"source": "test", "clip_id": cid}).encode() if k == "meta"
                                  else f"{cid} {k}".encode())
    (root / MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in full))
    return root


@pytest.mark.parametrize("case,words", [
    ("dotdot", "must be a relative path inside the dataset root"),
    ("absolute", "must be a relative path inside the dataset root"),
    ("duplicate", "clip_id 'a_1' repeats"),
    ("type", "duration_s must be a positive number, got 'ten'"),
    ("not-an-object", "a manifest row is a JSON object, got list"),
])
def test_bad_manifest_rows_are_refused_naming_file_and_line_before_any_upload(case, words, tmp_path, capsys):
    """Issue 15 #4 and #11: `ingest --dataset` read ../ and absolute paths, and found duplicates after uploading."""
    secret = tmp_path / "secret.txt"
    secret.write_text("aws_secret_access_key = do-not-upload")
    rows = [{"clip_id": "a_1"}, {"clip_id": "a_2"}]
    third = {"dotdot": {"clip_id": "a_3", "video": "../../secret.txt"},
             "absolute": {"clip_id": "a_3", "meta": str(secret)},
             "duplicate": {"clip_id": "a_1"},
             "type": {"clip_id": "a_3", "duration_s": "ten"},
             "not-an-object": None}[case]
    src = fake_dataset(tmp_path / "src" / "ds", rows + ([third] if third else []))
    if case == "not-an-object":
        with open(src / MANIFEST_NAME, "a") as f:
            f.write('["a_3"]\n')
    out = tmp_path / "out"
    assert ingest.main(["--dataset", str(src), "--out", str(out)]) == ingest.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src / MANIFEST_NAME}:3" in err[0] and words in err[0], err
    assert not out.exists() or not any(out.rglob("*"))  # nothing was uploaded
    with pytest.raises(ValueError, match="inside the dataset root"):
        Store(out).url("../../secret.txt")


def test_a_second_upload_into_the_same_out_keeps_the_first_clips(tmp_path):
    """Issue 15 #5 (--dataset): the manifest is merged, never rebuilt from this run's sources alone."""
    out = Store(tmp_path / "out")
    first = [{"clip_id": "a_1", "split": "val"}, {"clip_id": "a_2", "split": "val"}]
    upload_dataset(fake_dataset(tmp_path / "a", first), out)
    upload_dataset(fake_dataset(tmp_path / "b", [{"clip_id": "b_1"}, {"clip_id": "a_2", "split": "test",
                                                                        "scene_id": "a"}]), out)
    rows = {r["clip_id"]: r for r in out.read_manifest()}
    assert sorted(rows) == ["a_1", "a_2", "b_1"]
    assert rows["a_1"]["split"] == "val" and rows["a_2"]["split"] == "val"  # a scene keeps its split
    mode = _umask_mode()
    for p in [tmp_path / "out" / MANIFEST_NAME, *(tmp_path / "out" / "clips").iterdir()]:
        assert p.stat().st_mode & 0o777 == mode, p  # issue 15 #12: was 0600 (mkstemp)


def test_written_files_are_readable_by_others(tmp_path):
    """Issue 15 #12, for the local store and the manifest writer."""
    from flipray.dataset.manifest import write_manifest
    store = Store(tmp_path / "ds")
    store.put("clips/x.webm", b"data")
    rows = [{"clip_id": "x", "scene_id": "x", "split": "train", "duration_s": 1.0, "fps": 6, "num_frames": 6,
             "sample_rate": 16000, "channels": 2, "video": "clips/x.webm", "audio": "clips/x.flac",
             "meta": "clips/x.json"}]
    write_manifest(tmp_path / "ds", rows)
    for p in (tmp_path / "ds" / "clips" / "x.webm", tmp_path / "ds" / MANIFEST_NAME):
        assert p.stat().st_mode & 0o777 == _umask_mode()
    assert read_manifest(tmp_path / "ds") == rows


def test_folder_lock_on_a_file_system_without_locks_goes_on_unlocked_and_says_so(tmp_path, monkeypatch, caplog):
    """Some FUSE mounts (bucket mounts on a cluster) answer flock with ENOLCK / EOPNOTSUPP: a run there goes on as it
    did before the locks, with one warning per lock file, instead of failing. (No such file system here: the
    kernel's answer is injected into fcntl.flock; any other error still raises.)"""
    import errno
    import fcntl
    import logging

    from flipray import atomic

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level(logging.WARNING, logger="flipray.atomic"):
        for _ in range(2):
            with atomic.folder_lock(tmp_path / "mnt", ".lock", busy=lambda pid: ran.append("busy")):
                ran.append("ran")
    assert ran == ["ran", "ran"]
    warned = [r.getMessage() for r in caplog.records if "has no locks" in r.getMessage()]
    assert warned == [f"{(tmp_path / 'mnt' / '.lock').resolve()}: this file system has no locks (No locks "
                      f"available); two runs writing here at once are not kept apart"]

    def broken(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        with atomic.folder_lock(tmp_path / "mnt", ".lock", busy=print):
            pass


def test_a_full_disk_is_an_error_even_when_ffmpeg_exits_0_and_one_line_for_the_user(capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does, and ffmpeg still exits 0 after failing to write
    its trailer there (it did on this machine's ffmpeg for the webm muxer); flipray.media.ffmpeg goes by what ffmpeg
    said, so an atomic_output around it removes the broken file instead of renaming it over the target (synth's
    clips, fix's --out). A command that meets a full disk says so in one line and exits 1."""
    import errno

    from flipray import media, overrides
    with pytest.raises(OSError) as full:
        media.ffmpeg(["-f", "lavfi", "-i", "testsrc=s=64x64:r=6:d=1", "-an", *media.vp9_args(6), "-f", "webm",
                      "/dev/full"])
    assert full.value.errno == errno.ENOSPC and full.value.filename == "/dev/full"
    with pytest.raises(SystemExit) as exited:
        with overrides.user_errors("flipray synth"):
            raise full.value
    assert exited.value.code == 1
    assert capsys.readouterr().err == ("flipray synth: no space left on the device writing /dev/full; what was "
                                       "finished is kept (files are replaced only when complete): free some space "
                                       "and run the same command again\n")
    with pytest.raises(SystemExit), overrides.user_errors("flipray synth"):  # a write() error names no file
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"clip")
    assert capsys.readouterr().err.startswith("flipray synth: no space left on the device; what was finished")
    with pytest.raises(PermissionError), overrides.user_errors("flipray synth"):  # any other OSError: traceback
        raise PermissionError(errno.EACCES, "Permission denied", "/root/x")


def test_folder_lock_is_free_when_nested_and_makes_another_thread_wait(tmp_path):
    """flipray.atomic.folder_lock, under the dataset, run-folder, cache and cluster.local locks: nesting in one thread
    does not deadlock; a second thread (as a second process) is told who holds it, and waits for it or refuses."""
    import threading
    import time

    from flipray.atomic import folder_lock
    events, release = [], threading.Event()

    def holder():
        with folder_lock(tmp_path / "f", ".lock", busy=events.append):
            with folder_lock(tmp_path / "f", ".lock", busy=events.append):  # nested: no wait, no busy call
                events.append("held")
                release.wait(30)
            events.append("inner done")  # still inside the outer block: the lock is held

    def second():
        with folder_lock(tmp_path / "f", ".lock", busy=lambda pid: events.append(f"busy {pid}")):
            events.append("second held")

    first = threading.Thread(target=holder)
    first.start()
    while "held" not in events:
        time.sleep(0.01)
    waiting = threading.Thread(target=second)
    waiting.start()
    while f"busy {os.getpid()}" not in events:
        time.sleep(0.01)

    class Refused(Exception):
        pass

    def refuse(pid):
        raise Refused(pid)
    with pytest.raises(Refused, match=str(os.getpid())):  # a third one that refuses instead of waiting
        with folder_lock(tmp_path / "f", ".lock", busy=refuse):
            pass
    time.sleep(0.2)
    assert "second held" not in events  # still waiting
    release.set()
    first.join(30)
    waiting.join(30)
    assert events == ["held", f"busy {os.getpid()}", "inner done", "second held"]


@pytest.mark.slow
def test_a_second_ingest_into_the_same_out_keeps_the_first_clips(ray_local, tmp_path):
    """Issue 15 #5 (--videos): the second run's folder lacks the first run's video; its clips stay listed."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    make_video(first / "one.mp4", 10.5)
    make_video(second / "two.mp4", 10.5)
    out = str(tmp_path / "ds")
    r1 = ingest.run_ingest(out, videos=str(first), progress=False)
    r2 = ingest.run_ingest(out, videos=str(second), progress=False)
    assert r1["clips_ingested"] == r2["clips_ingested"] == 1
    assert sorted(r["scene_id"] for r in read_manifest(out)) == ["one", "two"]


@pytest.mark.slow
def test_ingest_own_ray_instance_listens_on_loopback_only(tmp_path):
    """Issue 15 #13: ingest's ray.init() listened on every interface."""
    make_video(tmp_path / "v.mp4", 1)
    script = textwrap.dedent(f"""
        import json, os, subprocess
        import flipray.dataset.ingest as ingest

        def listening():
            import ray
            node = ray._private.worker._global_node
            pids = [p.process.pid for ps in node.all_processes.values() for p in ps] + [os.getpid()]
            kids = subprocess.run(["pgrep", "-P", ",".join(map(str, pids))], capture_output=True, text=True)
            pids += [int(k) for k in kids.stdout.split()]
            inodes = set()
            for pid in pids:
                for fd in os.listdir(f"/proc/{{pid}}/fd"):
                    try:
                        link = os.readlink(f"/proc/{{pid}}/fd/{{fd}}")
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            ips = set()
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                for line in open(table).readlines()[1:]:
                    f = line.split()
                    if f[3] == "0A" and f[9] in inodes:  # LISTEN
                        ips.add(f[1].rsplit(":", 1)[0])
            return sorted(ips)

        def spy(*args, **kwargs):
            print("LISTEN", json.dumps(listening()))
            return {{"clips_ingested": 0, "clips_existing": 0, "clips_skipped": {{}}, "sources_skipped": {{}},
                    "sources": 0, "skipped": [], "manifest": None, "splits": {{}}}}

        ingest.run_ingest = spy
        ingest.main(["--videos", {str(tmp_path)!r}, "--out", {str(tmp_path / "out")!r}, "--num-cpus", "1"])
        import ray
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("LISTEN")]
    ips = json.loads(line.split(" ", 1)[1])
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert ips and set(ips) <= loopback, ips  # 00000000 = 0.0.0.0 (every interface) before


@pytest.mark.slow
def test_fault_drill_fires_once_per_run(ray_local):
    """The drill's mark outlives worker-group restarts (a restart before the first checkpoint replays step K)."""
    from jobs.pretext import fault_fires_once
    assert fault_fires_once("run-a", 1) is True
    assert fault_fires_once("run-a", 1) is False
    assert fault_fires_once("run-a", 5) is True  # each step of FLIPRAY_FAULT_AT_STEP=1,5 fires once
    assert fault_fires_once("run-b", 1) is True
