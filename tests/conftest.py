"""Shared fixtures: a real S3 endpoint (moto's server), a local Ray instance, and real encoded source videos.

    .venv/bin/python -m pytest tests/test_store.py tests/test_ingest.py tests/test_dali.py -x -q

Services are started by the fixtures that need them, each in its own process group, and stopped by PID; nothing is
left running. Only tests marked `slow` use them, so `make test-fast` (`-m "not slow"`) starts none
(tests/test_lanes.py checks). The demo model that test_demo and test_check need trains in a background process
from the session's first test, and those tests run last. The AWS variables set here are moto's dummies, not
credentials.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

# OpenMP threads sleep at a barrier instead of spinning, in this process and every one it starts (the demo model's
# trainer, Ray's workers, the drills' jobs): the suite keeps both cores busy, and a spinning thread burns the CPU time
# the thread it waits for needs (bench/train.py measured a 2-thread loop at 2 samples/s instead of 35 that way).
# Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# moto's dummy keys for the session (moto accepts any): not credentials.
_MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 at a free port, started by cluster.local (the launcher `make demo` and
    `python -m cluster.local up` use) and stopped by its PID; sets AWS_ENDPOINT_URL & co. for the session; yields the
    URL. Slow tests only: the fast lane (`-m "not slow"`) never starts it."""
    from cluster import local
    keys = {"aws_access_key_id": _MOTO_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": _MOTO_ENV["AWS_SECRET_ACCESS_KEY"]}
    service = local.start_s3(tmp_path_factory.mktemp("moto"), credentials=keys)
    env = pytest.MonkeyPatch()
    try:
        for key, value in {"AWS_ENDPOINT_URL": service.url, **_MOTO_ENV}.items():
            env.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(key, raising=False)
        yield service.url
    finally:
        env.undo()
        local.stop(service)


@pytest.fixture
def mlflow_servers(tmp_path):
    """An MLflow server (127.0.0.1, its own process group, store tmp_path/mlflow/mlflow.db), yielded in a list: a test
    that stops it and starts another on the same port and store appends that one; every one is stopped at the end."""
    from cluster import local
    servers = [local.start_mlflow(tmp_path / "mlflow")]
    yield servers
    for server in servers:
        local.stop(server)


@pytest.fixture
def bucket(moto_server):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3
    name = f"flipray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def ray_local(moto_server):
    """A local Ray instance with 2 CPUs for the session (started after moto so its workers see AWS_ENDPOINT_URL)."""
    import ray
    from flipray import raylocal
    # a new instance on 127.0.0.1, never a cluster another engineer's `ray start` recorded on this machine
    raylocal.start_local(2, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


# Left channel: a 440 Hz tone; right channel: near silence. After ingest, channel 0 must still be the loud one.
_STEREO = "aevalsrc=0.5*sin(2*PI*440*t)|0.01*sin(2*PI*3000*t):s=44100:d={d}"


def make_source_videos(folder: Path, long_s: float = 20.5) -> dict[str, str]:
    """Real encoded videos in `folder`; returns {file name: what ingest must do with it}.

    Four usable sources (H.264+AAC mp4 at two sizes, H.264+AAC mkv, VP9+Opus webm portrait), each giving two 10-s
    clips, and one of each failure: mono, no audio, corrupt bytes, an empty file, a 3-s video.
    """
    folder.mkdir(parents=True, exist_ok=True)
    d = long_s
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k"]
    _ffmpeg("-f", "lavfi", "-i", f"testsrc2=s=320x240:r=25:d={d}", "-f", "lavfi", "-i", _STEREO.format(d=d),
            *h264, "-shortest", str(folder / "cam_a.mp4"))
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=s=480x270:r=30:d={d}", "-f", "lavfi", "-i", _STEREO.format(d=d),
            *h264, "-shortest", str(folder / "street b.mp4"))  # a space: the scene id gets sanitised
    _ffmpeg("-f", "lavfi", "-i", f"smptebars=s=320x240:r=24:d={d}", "-f", "lavfi", "-i", _STEREO.format(d=d),
            *h264, "-shortest", str(folder / "bars.mkv"))
    _ffmpeg("-f", "lavfi", "-i", f"testsrc2=s=180x320:r=12:d={d}", "-f", "lavfi", "-i", _STEREO.format(d=d),
            "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k", "-c:a", "libopus",
            "-shortest", str(folder / "portrait.webm"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=11", "-f", "lavfi", "-i",
            "sine=f=440:r=44100:d=11", *h264, "-shortest", str(folder / "mono.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=11", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", str(folder / "silent.mp4"))
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(20000))
    (folder / "empty.mkv").write_bytes(b"")
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=320x240:r=25:d=3", "-f", "lavfi", "-i", _STEREO.format(d=3),
            *h264, "-shortest", str(folder / "short.mp4"))
    (folder / "notes.txt").write_text("not a video: ignored")
    return {"cam_a.mp4": "2 clips", "street b.mp4": "2 clips", "bars.mkv": "2 clips", "portrait.webm": "2 clips",
            "mono.mp4": "mono audio", "silent.mp4": "no audio stream", "corrupt.mp4": "unreadable",
            "empty.mkv": "empty file", "short.mp4": "too short"}


@pytest.fixture(scope="session")
def source_videos(tmp_path_factory):
    """(folder, expectations) of real encoded source videos, made once per session."""
    folder = tmp_path_factory.mktemp("sources")
    return folder, make_source_videos(folder)


@pytest.fixture(scope="session")
def ingested(source_videos, ray_local, tmp_path_factory):
    """The source videos ingested once into an S3 dataset: (s3 root, report). Shared by the store, ingest and DALI
    tests, which only read it."""
    import boto3
    from flipray.dataset.ingest import run_ingest
    name = f"flipray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    root = f"s3://{name}/videos-v1"
    report = run_ingest(root, videos=str(source_videos[0]), progress=False)
    return root, report


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small rendered synthetic dataset (16 clips of 4 s, 8 scenes) shared by the library tests. Read-only.
    Symmetric, matched binaural heads only: the library tests read a head's level difference off these clips, and a
    capsule mismatch (ear_gain_db) or set-back ears would flip its sign near the centre (test_synth covers those)."""
    from flipray.synth.scenes import generate
    root = tmp_path_factory.mktemp("synth")
    generate(root, clips=16, seed=3, workers=2, duration_s=4.0, two_source_prob=0.0, max_distractors=1,
             mics=("binaural",), ear_gain_db=(0.0, 0.0), ear_offset_deg=(0.0, 0.0))
    return root


def pytest_collection_modifyitems(config, items):
    """Tests that use the demo model run last (in their usual order), so it trains in the background while the rest
    of the session runs (`_demo_model_in_background`)."""
    items.sort(key=lambda item: "demo_run" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def _demo_model_in_background(request, tmp_path_factory):
    """When the session has tests that use `demo_run`: tests/_demo_model.py started at the session's first test, at
    nice 19 in its own process group, and killed by PID if it is still running at the end. Yields (folder, process)
    or None."""
    if not any("demo_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    import sys
    base = tmp_path_factory.mktemp("demo")
    with open(base / "demo.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_demo_model.py")), str(base)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()


@pytest.fixture(scope="session")
def demo_run(_demo_model_in_background, request) -> dict:
    """The demo preset trained once per session on a fresh 600-clip synthetic set, as `make demo` does (the suite's
    longest step: ~7 min on 2 idle cores, mostly hidden behind the other tests; see `_demo_model_in_background`).
    Yields {"data": dataset folder, "run_dir": run folder, "checkpoint": checkpoint.pt, "report": what
    train.main returned}. Read-only for its users: test_demo checks the accuracy, test_check uses the trained model."""
    import json
    base, proc = _demo_model_in_background
    if proc.poll() is None:  # say so past pytest's capture: this can take minutes
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\nwaiting for the demo model to finish training: {base / 'demo.log'}", flush=True)
    if proc.wait():
        pytest.fail(f"training the demo model failed (exit {proc.returncode}); the end of {base / 'demo.log'}:\n"
                    + (base / "demo.log").read_text()[-4000:])
    run_dir = base / "runs" / "demo"
    return {"data": base / "demo", "run_dir": run_dir, "checkpoint": run_dir / "checkpoint.pt",
            "report": json.loads((base / "returned.json").read_text())}
