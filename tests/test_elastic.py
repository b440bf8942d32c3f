"""Training that stays the same training whatever the world size: gradient accumulation under DDP, evaluation sharded
over ranks, every model variant prepared as a GPU worker prepares it, and the sample accounting a resumed run is
checked against (a broken sampler fails it).

    .venv/bin/python -m pytest tests/test_elastic.py -q

The multi-node runs (node loss, scale down, scale up) are in tests/test_multinode.py.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipray.config import VARIANTS, load_config
from flipray.pretext import train
from flipray.pretext.data import ClipDataset, EpochSampler
from flipray.pretext.models import SpatialAlignmentNet

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.num_frames=3", "data.eval_windows=1", "data.resize=40", "data.crop=32", "data.n_mels=32",
        "model.visual_width=8", "model.audio_width=8", "model.audio_dim=32", "model.fusion_dim=32",
        "train.log_every=1", "data.num_workers=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(synth_root, tmp_path_factory):
    """tests/_ddp_ranks.py on 2 gloo ranks, once: accumulation over 5 micro-batches (2 per step) and sharded
    evaluation of a saved model. Yields (output folder, cfg, model file)."""
    out = tmp_path_factory.mktemp("ddp")
    cfg = load_config("demo", FAST + [f"data.root={synth_root}", "data.cache=true", "train.batch_size=8"])
    torch.manual_seed(7)
    torch.save(SpatialAlignmentNet(cfg).state_dict(), out / "model.pt")
    (out / "spec.json").write_text(json.dumps({"cfg": cfg.to_dict(), "micro_batches": 5,
                                               "model": str(out / "model.pt")}))
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    procs = []
    for r in range(2):  # logs to files: a full pipe would stall one rank and with it the other's collectives
        with open(out / f"log-{r}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "_ddp_ranks.py"),
                                           str(out / "spec.json"), str(out)], env={**env, "RANK": str(r)},
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((out / f"log-{r}.txt").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    return out, cfg, out / "model.pt"


def test_accumulation_under_ddp_keeps_every_rank_identical(two_ranks):
    """5 micro-batches at 2 per step: the epoch ends on a lone micro-batch, which must still be all-reduced (it used
    to step on gradients only this rank had seen, and the replicas drifted apart)."""
    out, _, _ = two_ranks
    p0, p1 = torch.load(out / "params-0.pt"), torch.load(out / "params-1.pt")
    assert json.loads((out / "steps-0.json").read_text())["steps"] == 3
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in SpatialAlignmentNet(two_ranks[1]).parameters()])
    assert not torch.equal(p0, init)  # it trained
    assert torch.equal(p0, p1)


def test_evaluation_sharded_over_two_ranks_equals_one_process(two_ranks):
    out, cfg, model_file = two_ranks
    model = SpatialAlignmentNet(cfg)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    single = train.evaluate_splits(model, cfg, "cpu")
    shards = [json.loads((out / f"eval-{r}.json").read_text()) for r in range(2)]
    for split in ("val", "test"):
        n = len(ClipDataset(cfg, split, train=False))
        assert single[split]["samples"] == n and 0.0 < single[split]["acc"] < 1.0
        for shard in shards:  # every rank holds the whole split's figures
            assert shard[split]["samples"] == n
            assert shard[split]["acc"] == single[split]["acc"]
            assert shard[split]["loss"] == pytest.approx(single[split]["loss"], rel=1e-5)


def test_evaluation_shards_split_every_item_once_with_weightless_pads(synth_root):
    cfg = load_config("demo", FAST + [f"data.root={synth_root}", "data.cache=false"])
    ds = ClipDataset(cfg, "val", train=False)
    items = [i for r in range(3) for _, i in EpochSampler(len(ds) + 1, 0, shuffle=False, rank=r, world=3)]
    assert sorted(i for i in items if i >= 0) == list(range(len(ds) + 1))
    pad = ds[(0, -1 - 2)]  # item 2, decoded, with weight 0
    assert pad["weight"] == 0.0 and pad["item"] == 2 and torch.equal(pad["video"], ds[(0, 2)]["video"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_prepared_as_a_gpu_worker_prepares_it(variant):
    """channels_last as on a CUDA worker (train.channels_last, the default), on the `meta` device: 2-D conv
    weights NHWC, 3-D ones (motion's mc3_18) NDHWC, and a forward pass runs."""
    # the Table-2 gcc-phat ablation is defined on the paper's log-mel input
    cfg = load_config("demo", FAST + [f"model.variant={variant}"] + ["model.front_end=logmel"] * (variant == "gcc-phat"))
    model = train.prepare_model(SpatialAlignmentNet(cfg), cfg, torch.device("meta"), channels_last=True)
    convs = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert convs and all(w.device.type == "meta" for w in convs)
    for w in convs:
        fmt = torch.channels_last if w.dim() == 4 else torch.channels_last_3d
        assert w.is_contiguous(memory_format=fmt), (variant, w.shape)
    assert any(w.dim() == 5 for w in convs) == (variant == "motion")
    video = torch.zeros(2, cfg.data.num_frames, 3, cfg.data.crop, cfg.data.crop, device="meta")
    audio = torch.zeros(2, cfg.data.audio_channels, cfg.window_samples, device="meta")  # the front end runs there too
    assert model(video, audio).shape == (2,)
    # a CPU worker keeps the default layout; a CUDA one takes train.channels_last
    cpu = train.prepare_model(SpatialAlignmentNet(cfg), cfg, "cpu")
    assert all(m.weight.is_contiguous() for m in cpu.modules() if isinstance(m, torch.nn.Conv2d))


# ---- sample accounting -----------------------------------------------------------------------------------------

ACCOUNTING = FAST + ["data.cache=true", "train.batch_size=4", "train.micro_batch_size=2", "train.total_samples=40",
                     "train.checkpoint_every_samples=8", "train.eval_every_samples=100", "train.warmup_samples=0"]


def test_planned_samples_cover_each_epoch_once_then_the_last_steps(synth_root):
    cfg = load_config("demo", ACCOUNTING + [f"data.root={synth_root}"])
    n = len(ClipDataset(cfg, "train", train=True))
    plan = train.planned_digests(cfg, n)
    epochs, rest = divmod(40, n)
    assert sorted(plan) == list(range(epochs + (rest > 0)))
    assert all(plan[e][0] == n for e in range(epochs))
    assert sum(d[0] for d in plan.values()) >= 40  # whole steps: at most one step past total_samples
    assert plan[0] == train.sample_digest(0, list(range(n)))  # an epoch is every item once, in any order
    assert plan[0] != train.sample_digest(0, [0] + list(range(n - 1)))  # one repeated, one missing


@pytest.mark.parametrize("fault", [None, "skip", "repeat"])
def test_resumed_run_consumes_the_plan_and_a_broken_sampler_fails_it(synth_root, tmp_path, monkeypatch, fault):
    """Stop a local run at a checkpoint in the middle of an epoch and resume it: the checkpoint's sample digests equal
    the plan. A sampler that, on resume, starts one position late (skip) or early (repeat) is caught."""
    cfg = load_config("demo", ACCOUNTING + [f"data.root={synth_root}"])
    n = len(ClipDataset(cfg, "train", train=True))
    first = n + 4  # mid-epoch 1
    args = ["--config", "demo", "--run-name", "r", *sum((["--set", s] for s in ACCOUNTING), []),
            "--set", f"data.root={synth_root}", "--set", f"train.out_dir={tmp_path}"]
    train.main(args + ["--set", f"train.total_samples={first}"])
    plan = train.planned_digests(cfg, n)
    if fault:
        real = train.train_sampler

        def broken(cfg, n_items, epoch, start=0, *a, **kw):
            return real(cfg, n_items, epoch, max(start + (1 if fault == "skip" else -1), 0) if start else 0, *a, **kw)
        monkeypatch.setattr(train, "train_sampler", broken)
    train.main(args + ["--resume"])
    state = train.load_checkpoint(tmp_path / "r" / "checkpoint.pt")["state"]
    assert state["samples_seen"] == 40
    if fault:
        assert train.digest_mismatch(state["sample_digests"], plan)
    else:
        assert not train.digest_mismatch(state["sample_digests"], plan), (state["sample_digests"], plan)
