"""Pretext training on a local multi-node Ray cluster (ray.cluster_utils: separate raylets on 127.0.0.1, token auth):
a node is added, then whole nodes are lost (raylet and workers die), replaced and not, while one
`python -m jobs.pretext` run goes on elastic (cluster.workers=2, cluster.min_workers=1). It must train on exactly the
planned samples (the checkpoint's per-epoch digests) and end with the weights of an uninterrupted single-process run.

    .venv/bin/python -m pytest tests/test_multinode.py -q

The worker-process kill and the `ray job submit` path are in tests/test_pretext_job.py; accumulation, sharded
evaluation and a sampler that skips or repeats in tests/test_elastic.py.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster import local
from flipray.config import load_config
from flipray.pretext.data import ClipDataset, train_sampler
from flipray.pretext.models import SpatialAlignmentNet
from flipray.pretext.train import (digest_mismatch, fit, load_checkpoint, make_loader, make_optimizer, new_state,
                                   planned_digests, split_batch)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SETS = ["data.num_frames=3", "data.eval_windows=1", "data.resize=40", "data.crop=32", "data.n_mels=32",
        "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32",
        "train.log_every=1", "data.num_workers=0", "data.cache=true", "train.batch_size=4",
        "train.micro_batch_size=2", "train.total_samples=40", "train.checkpoint_every_samples=8",
        "train.eval_every_samples=100", "train.warmup_samples=0", "train.optimizer=sgd", "train.lr=0.05",
        "cluster.workers=2", "cluster.min_workers=1",
        "cluster.resize_check_s=2", "cluster.max_failures=4", "cluster.register_as=",
        # a restart that first asks for the lost node's worker too gives up waiting for its resources after this, not
        # Ray's 60 s (the timeout covers reserving the placement group only, not the workers' start)
        "cluster.worker_start_timeout_s=10"]


_GIVEN: set[int] = set()


def _free_port() -> int:
    """A free port not handed out before in this session: two free-port probes in a row may return the same port,
    and Ray refuses a node whose components share one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@pytest.fixture(scope="module")
def cluster():
    """A head with 0 CPUs (it only runs the Train controller) on free ports, token auth on; tests add 1-CPU nodes."""
    from ray.cluster_utils import Cluster
    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "token")
    # Ray's own token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, made if missing): this process's
    # GCS client reads it once, so the raylets and drivers must get the same one
    env.setenv("RAY_AUTH_TOKEN", local.ray_token(create=True)[0])
    from ray._raylet import Config
    Config.initialize("")  # this process's Ray config re-reads RAY_AUTH_MODE (as Ray's own _enable_token_auth does)
    env.setenv("PYTHONPATH", str(REPO))  # the raylets' workers import flipray and jobs from the checkout
    env.setenv("TQDM_DISABLE", "1")
    # Ray swaps node_ip_address 127.0.0.1 for the machine's address unless in single-machine mode (cluster/local.py)
    env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"):  # fixed defaults another Ray may hold
        env.setenv(name, str(_free_port()))
    c = Cluster(initialize_head=True, head_node_args={
        # the GCS takes a port grpc picks
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 80 * 2 ** 20,
        "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port(),
        # the GCS marks a killed node dead after 3 missed 1-s health checks (Ray's default: 5 missed 3-s ones), so
        # the restart sees the cluster as it is sooner; the drill's events are the same
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    try:
        yield c
    finally:
        c.shutdown()  # the processes it started, by PID
        env.undo()
        import ray
        if ray.is_initialized():  # Cluster.shutdown resets this process's internal KV client; the session's Ray needs it
            from ray.experimental import internal_kv
            internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)


def _add(cluster):
    return cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 * 2 ** 20,
                            metrics_export_port=_free_port(),
                            dashboard_agent_listen_port=_free_port())


def _with_nodes(cluster, n: int) -> list:
    nodes = list(cluster.worker_nodes)
    while len(nodes) > n:
        cluster.remove_node(nodes.pop())
    while len(nodes) < n:
        nodes.append(_add(cluster))
    cluster.wait_for_nodes()
    return nodes


def _has_step(tree, step: int) -> bool:
    """Whether a JSON tree holds metrics {"step": step, ...} (a reported checkpoint's)."""
    if isinstance(tree, str) and tree.lstrip().startswith("{"):  # the file, and JSON strings inside it
        try:
            tree = json.loads(tree)
        except ValueError:
            return False
    if isinstance(tree, dict):
        return tree.get("step") == step or any(_has_step(v, step) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_step(v, step) for v in tree)
    return False


class Run:
    """`python -m jobs.pretext` as a driver process of the cluster; FLIPRAY_HOLD_DIR makes every attempt wait after
    its first checkpoint (notes hold-N.json, start-N.json) until the test writes `release`."""

    def __init__(self, cluster, synth_root, tmp: Path, name: str):
        self.hold, self.tmp, self.name = tmp / "hold", tmp, name
        self.sets = SETS + [f"data.root={synth_root}", f"cluster.storage_path={tmp / 'ray'}"]
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "FLIPRAY_HOLD_DIR": str(self.hold),
               "FLIPRAY_HOLD_S": "240", "RAY_DEDUP_LOGS": "0"}
        self.log = tmp / "driver.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.pretext", "--config", "demo", "--run-name", name,
                 "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *sum((["--set", s] for s in self.sets), [])],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def note(self, kind: str, n: int, timeout: float = 300) -> dict:
        path, deadline = self.hold / f"{kind}-{n}.json", time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.2)
        time.sleep(0.1)  # written in one call; let it land
        return json.loads(path.read_text())

    def hold_registered(self, n: int, timeout: float = 120) -> dict:
        """hold-N's note once the controller has registered that checkpoint (its snapshot in storage names it): a
        node lost before then restarts from the checkpoint before."""
        note = self.note("hold", n)
        snapshot = self.tmp / "ray" / self.name / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + timeout
        while not (snapshot.exists() and _has_step(snapshot.read_text(), note["step"])):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.2)
        return note

    def notes(self, kind: str) -> list[dict]:
        return [json.loads((self.hold / f"{kind}-{n}.json").read_text())
                for n in range(len(list(self.hold.glob(f"{kind}-*.json"))))]

    def release(self):
        (self.hold / "release").touch()

    def finish(self, timeout: float = 600) -> dict:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert rc == 0, self.tail()
        # the run's final checkpoint, as the job prints it; a copy the lost node cut off is gone, the rest load
        final = Path(re.findall(r"^checkpoint: (.+)$", self.log.read_text(), re.M)[-1]) / "checkpoint.pt"
        steps = {p: load_checkpoint(p)["state"]["step"]
                 for p in (self.tmp / "ray" / self.name).glob("checkpoint_*/checkpoint.pt")}
        assert steps[final] == max(steps.values()), steps
        return load_checkpoint(final)

    def tail(self) -> str:
        return self.log.read_text()[-8000:]


def _check_against_uninterrupted(ckpt: dict, synth_root):
    """Exactly the planned samples, and the weights of one process training the same steps without interruption."""
    cfg = load_config("demo", SETS + [f"data.root={synth_root}"])
    state = ckpt["state"]
    ds = ClipDataset(cfg, "train", train=True)
    assert state["samples_seen"] == cfg.train.total_samples
    assert digest_mismatch(state["sample_digests"], planned_digests(cfg, len(ds))) == []
    torch.manual_seed(cfg.train.seed)
    model = SpatialAlignmentNet(cfg)
    optimizer = make_optimizer(model, cfg)
    B = cfg.train.batch_size
    micro, accum = split_batch(B, 1, cfg.train.micro_batch_size)
    reference = new_state()
    # one torch thread, as Ray runs a 1-CPU worker: this tiny net on micro-batches of 2 (batch norm, SGD momentum)
    # is chaotic enough that another thread count's float rounding alone ends ~0.3 of the distance trained apart
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(cfg, model, optimizer, "cpu", reference, len(ds),
            lambda epoch, start: make_loader(ds, cfg, train_sampler(cfg, len(ds), epoch, start), micro),
            validate=lambda: None, save=lambda state: None, accum_steps=accum)
    finally:
        torch.set_num_threads(threads)
    assert reference["sample_digests"] == {int(e): d for e, d in state["sample_digests"].items()}
    # SGD (linear in the gradients): the runs differ only by float summation order, far less than training moved them
    torch.manual_seed(cfg.train.seed)
    init = torch.cat([p.detach().flatten() for p in SpatialAlignmentNet(cfg).parameters()])
    ref = torch.cat([p.detach().flatten() for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    run = torch.cat([ckpt["model"][n].flatten() for n in names])
    moved, apart = (ref - init).norm().item(), (run - ref).norm().item()
    assert apart < 1e-3 * moved, (apart, moved)


def test_elastic_run_grows_survives_node_losses_and_finishes_on_one_worker(cluster, synth_root, tmp_path):
    """One elastic run (workers=2, min_workers=1) through every event, each at a registered checkpoint: it starts on
    the one node there is (world 1); a node joins and the run grows to 2 workers at its next resize check; a node dies
    with a replacement already up and it goes on with 2; a node dies with none to replace it (the issue's acceptance
    run) and it finishes on 1. Every sample of train.total_samples is trained, and the weights are those of one
    uninterrupted process."""
    nodes = _with_nodes(cluster, 1)
    run = Run(cluster, synth_root, tmp_path, "elastic")
    assert run.hold_registered(0)["world"] == 1
    added = time.time()
    nodes.append(_add(cluster))
    assert run.hold_registered(1)["world"] == 2
    nodes.append(_add(cluster))  # the replacement, then the loss
    replaced = time.time()
    cluster.remove_node(nodes.pop(0), allow_graceful=False)  # raylet and its workers killed
    assert run.hold_registered(2)["world"] == 2
    lost = time.time()
    cluster.remove_node(nodes.pop(0), allow_graceful=False)  # and none comes back
    run.release()
    ckpt = run.finish()
    starts = run.notes("start")
    assert [s["world"] for s in starts] == [1, 2, 2, 1], starts
    # each restart resumed from the checkpoint its attempt held at (steps 2, 4, 6), never from an earlier one
    assert [s["restored_step"] for s in starts] == [None, 2, 4, 6], starts
    log = run.log.read_text()  # the last restart may try 2 workers while the dead node still counts: for 10 s, not 60
    assert "startup timed out after" not in log or "startup timed out after 10.0 seconds" in log, run.tail()
    print(f"\nnode added -> training on 2 workers: {starts[1]['time'] - added:.1f} s; node lost (replaced) -> "
          f"training again: {starts[2]['time'] - replaced:.1f} s; node lost (none) -> training again on 1 worker: "
          f"{starts[3]['time'] - lost:.1f} s")
    assert ckpt["state"]["world_size"] == 1
    _check_against_uninterrupted(ckpt, synth_root)
