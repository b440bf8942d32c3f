"""The node-local clip cache (flipray/dataset/cache.py) and concurrent fetching in both loaders: hits after the first
fetch, the size bound with LRU eviction, corrupt entries dropped and re-fetched, two processes filling one cache,
cache off = a plain Store, and the same samples in the same order with requests in flight. The S3 tests count
GETs at a real HTTP proxy (bench/s3proxy.py) in front of moto's server.

    .venv/bin/python -m pytest tests/test_cache.py -x -q              # add -m "not slow" for the unit tests only
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flipray.config import load_config
from flipray.dataset.cache import RESCAN_FRACTION, CachedStore, ClipCache, open_store
from flipray.dataset.store import ChecksumError, Store

KB = 1000


def make_objects(root: Path, n: int, size: int, seed: int = 0) -> dict[str, str]:
    """n random objects of `size` bytes under root/clips/; returns {key: sha256}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        data = torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).numpy().tobytes()
        key = f"clips/obj{i:03d}.bin"
        (root / "clips").mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
        out[key] = hashlib.sha256(data).hexdigest()
    return out


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "objects").rglob("*") if p.is_file())


def test_a_fetched_object_is_read_from_the_cache_afterwards(tmp_path):
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    objects = make_objects(root, 5, 50 * KB)
    store = open_store(str(root), str(cache_dir), 1.0)
    assert isinstance(store, CachedStore)
    first = {k: store.get(k, sha) for k, sha in objects.items()}
    assert {k: hashlib.sha256(v).hexdigest() for k, v in first.items()} == objects
    for key in objects:  # the origin is gone: every later read must come from the cache
        (root / key).unlink()
    assert {k: store.get(k, sha) for k, sha in objects.items()} == first
    assert (store.cache.misses, store.cache.hits) == (5, 5)

    files = cache_files(cache_dir)
    assert sorted(p.name for p in files) == sorted(objects.values())  # content-addressed, no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    # an object without a checksum cannot be verified, so it is not cached
    (root / "clips" / "plain.bin").write_bytes(b"x" * 100)
    assert store.get("clips/plain.bin") == b"x" * 100
    (root / "clips" / "plain.bin").unlink()
    with pytest.raises(FileNotFoundError, match="plain.bin"):
        store.get("clips/plain.bin")


def test_the_cache_stays_within_its_bound_evicting_the_least_recently_used(tmp_path):
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    objects = make_objects(root, 10, 100 * KB)
    keys = list(objects)
    bound = 450 * KB
    store = CachedStore(str(root), cache_dir, bound)

    def get(i):
        data = store.get(keys[i], objects[keys[i]])
        assert hashlib.sha256(data).hexdigest() == objects[keys[i]]
        time.sleep(0.02)  # distinct mtimes: the kernel's file clock ticks every few ms
        return data

    for i in range(4):
        get(i)
    get(0)  # a hit: object 0 becomes the most recently used
    get(4)  # 500 KB > 450 KB: trim to <= 405 KB, oldest first -> object 1 goes
    present = {p.name for p in cache_files(cache_dir)}
    assert present == {objects[keys[i]] for i in (0, 2, 3, 4)}
    for i in range(5, 10):
        get(i)
        assert sum(p.stat().st_size for p in cache_files(cache_dir)) <= bound
    assert objects[keys[9]] in {p.name for p in cache_files(cache_dir)}
    hits = store.cache.hits
    get(1)  # evicted: fetched from the origin again, whole
    assert store.cache.hits == hits


def test_a_corrupt_cache_entry_is_dropped_and_fetched_again(tmp_path):
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    objects = make_objects(root, 1, 80 * KB)
    (key, sha), = objects.items()
    store = open_store(str(root), str(cache_dir), 1.0)
    good = store.get(key, sha)
    entry = store.cache.path(sha)
    for corrupt in (good[:len(good) // 2], b"\xff" + good[1:]):  # a torn write; a flipped byte
        entry.write_bytes(corrupt)
        assert store.get(key, sha) == good
        assert entry.read_bytes() == good  # re-fetched and written back whole
    assert store.cache.dropped == 2

    entry.write_bytes(good[:-1])
    (root / key).unlink()
    with pytest.raises(FileNotFoundError):  # the corrupt entry is never served, even with no origin left
        store.get(key, sha)
    assert not entry.exists()


def test_an_object_that_fails_its_checksum_at_the_store_is_not_cached(tmp_path):
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    objects = make_objects(root, 1, 10 * KB)
    (key, sha), = objects.items()
    (root / key).write_bytes(b"replaced")
    store = open_store(str(root), str(cache_dir), 1.0)
    with pytest.raises(ChecksumError, match="obj000.bin"):
        store.get(key, sha)
    assert cache_files(cache_dir) == []


def _fill(root: str, cache_dir: str, bound: int, order: list[tuple[str, str]], passes: int) -> list[str]:
    """One process reading every object `passes` times through the shared cache; the sha256 of what it got."""
    store = CachedStore(root, cache_dir, bound)
    return [hashlib.sha256(store.get(k, sha)).hexdigest() for _ in range(passes) for k, sha in order]


def test_an_unwritable_cache_costs_the_cache_never_the_read(tmp_path, caplog):
    root = tmp_path / "ds"
    objects = make_objects(root, 2, 10 * KB)
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_bytes(b"a file where the cache directory should be")
    store = open_store(str(root), str(not_a_dir), 1.0)
    for _ in range(2):
        assert {hashlib.sha256(store.get(k, sha)).hexdigest() for k, sha in objects.items()} == set(objects.values())
    warnings = [r.getMessage() for r in caplog.records if "cannot write the clip cache" in r.getMessage()]
    assert len(warnings) == 1 and str(not_a_dir) in warnings[0]  # said once, not per object


@pytest.mark.parametrize("evicting", [False, True], ids=["fits", "evicting"])
def test_two_processes_filling_one_cache_get_whole_verified_objects(tmp_path, evicting):
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    objects = make_objects(root, 40, 100 * KB, seed=1)
    size = 40 * 100 * KB
    bound = size // 2 if evicting else 2 * size
    items = list(objects.items())
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:  # same order in both: they race for the same entries
        results = pool.starmap(_fill, [(str(root), str(cache_dir), bound, items, 3)] * 2)
    expected = [sha for _ in range(3) for _, sha in items]
    assert results == [expected, expected]
    files = cache_files(cache_dir)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in files)
    assert not list(cache_dir.rglob("*.tmp"))
    total = sum(p.stat().st_size for p in files)
    if evicting:  # each process may write RESCAN_FRACTION of the bound (+ one object) past its last scan
        assert 0 < total <= bound + 2 * (RESCAN_FRACTION * bound + 100 * KB)
    else:
        assert len(files) == 40 and total == size


def test_cache_off_is_a_plain_store_and_the_config_switches_it(tmp_path):
    from dali_pipelines.pretext import ClipSource
    assert type(open_store(str(tmp_path))) is Store
    assert type(open_store(str(tmp_path), "", 10.0)) is Store
    for overrides, kind in (([], Store), ([f"data.cache_dir={tmp_path / 'c'}", "data.cache_gb=2"], CachedStore)):
        cfg = load_config("demo", overrides)
        src = ClipSource(cfg, [], str(tmp_path), 0, True, True, 0, 1, 4, 0, 0)
        assert type(src.store) is kind
    assert src.store.cache.max_bytes == 2_000_000_000
    with pytest.raises(ValueError, match="data.cache_gb"):
        load_config("demo", [f"data.cache_dir={tmp_path}", "data.cache_gb=0"])
    with pytest.raises(ValueError, match="data.fetch_threads"):
        load_config("demo", ["data.fetch_threads=0"])
    with pytest.raises(ValueError, match="sha256"):
        ClipCache(tmp_path, 10).path("../../etc/passwd")


def test_fetch_ahead_stays_inside_the_chunk_a_dali_worker_serves():
    from dali_pipelines.pretext import ClipSource
    cfg = load_config("demo", ["data.fetch_threads=3", "train.pair_negatives=false"])  # 11 items: one per clip
    clips = [{"clip_id": f"c{i}", "num_frames": 24} for i in range(11)]

    def source(py_workers):
        return ClipSource(cfg, clips, "unused", 0, True, True, 0, 1, 5, 0, 0, py_workers=py_workers)
    inline = source(0)
    assert [inline.ahead(0, k) for k in (0, 4, 9)] == [range(0, 3), range(4, 7), range(9, 11)]
    # batch 5 over 2 workers: DALI's chunks are positions 0-2 and 3-4 of each batch
    par = source(2)
    assert [par.ahead(0, k) for k in (0, 1, 2, 3, 5, 8, 10)] == [
        range(0, 3), range(1, 3), range(2, 3), range(3, 5), range(5, 8), range(8, 10), range(10, 11)]


def _epoch_from_callback(src, epoch: int) -> list:
    """What DALI gets from the callback over one epoch, position by position (a worker serves its chunk in order)."""
    out = []
    for k in range(src.num_batches(epoch) * src.batch_size):
        info = SimpleNamespace(epoch_idx=epoch - src.first_epoch, idx_in_epoch=k, idx_in_batch=k % src.batch_size,
                               iteration=k // src.batch_size)
        out.append([a.tobytes() for a in src(info)])
    return out


@pytest.mark.parametrize("task", ["flip", "mismatch"])
def test_requests_in_flight_give_the_same_samples_in_the_same_order(synth_root, task):
    from dali_pipelines.pretext import ClipSource
    from flipray.dataset.manifest import read_manifest
    clips = read_manifest(synth_root, "train")
    got = {}
    for threads, workers in ((1, 0), (8, 0), (3, 2)):
        cfg = load_config("demo", [f"data.fetch_threads={threads}", f"train.task={task}"])
        src = ClipSource(cfg, clips, str(synth_root), 0, True, True, 0, 1, 5, 1, 0, py_workers=workers)
        got[(threads, workers)] = [_epoch_from_callback(src, e) for e in (1, 2)]
    first = got[(1, 0)]
    assert len({tuple(map(tuple, e)) for e in first}) == 2  # the two epochs differ (a reshuffle)
    assert got[(8, 0)] == first and got[(3, 2)] == first


# ---------------------------------------------------------------------------------------------------------------------
# Through S3: GETs counted at a proxy in front of moto

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Eight short synthetic clips at 96 px in a local folder."""
    from flipray.synth.scenes import generate
    root = tmp_path_factory.mktemp("synth-cache")
    generate(root, 8, seed=5, workers=1, duration_s=4.0, size=96)
    return root


@pytest.fixture
def s3_via_proxy(moto_server, bucket, small_dataset, monkeypatch):
    """The small dataset on moto; the loaders' AWS_ENDPOINT_URL points at a counting proxy. Yields (root, proxy)."""
    from bench.s3proxy import proxy
    from flipray.dataset.store import upload_dataset
    root = f"s3://{bucket}/ds"
    upload_dataset(small_dataset, root)
    with proxy(moto_server) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield root, p


def _torchcodec_epoch(cfg, epoch: int) -> dict:
    from torch.utils.data import DataLoader

    from flipray.pretext.data import ClipDataset, EpochSampler, collate
    ds = ClipDataset(cfg, "train", train=True)
    loader = DataLoader(ds, batch_size=3, sampler=EpochSampler(len(ds), 0, epoch), collate_fn=collate)
    batches = list(loader)
    return {"clip_id": [c for b in batches for c in b["clip_id"]], "skipped": sum(b["skipped"] for b in batches),
            "video": torch.cat([b["video"] for b in batches]), "audio": torch.cat([b["audio"] for b in batches])}


@pytest.mark.slow
def test_torchcodec_loader_sends_no_gets_from_the_second_epoch_with_the_cache(s3_via_proxy, tmp_path):
    root, proxy = s3_via_proxy
    n = len(Store(root).read_manifest("train"))
    base = [f"data.root={root}", "data.cache=false", "train.pair_negatives=false"]  # an item per clip
    gets, out = {}, {}
    for name, extra in (("off", []), ("on", [f"data.cache_dir={tmp_path / 'cache'}", "data.cache_gb=1"])):
        for epoch in (0, 1):
            proxy.reset()
            out[(name, epoch)] = _torchcodec_epoch(load_config("demo", base + extra), epoch)
            gets[(name, epoch)] = proxy.gets("/clips/")
    assert gets == {("off", 0): 2 * n, ("off", 1): 2 * n, ("on", 0): 2 * n, ("on", 1): 0}
    for epoch in (0, 1):  # the cache changes where bytes come from, nothing else
        a, b = out[("off", epoch)], out[("on", epoch)]
        assert a["clip_id"] == b["clip_id"] and len(a["clip_id"]) == n
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    assert out[("off", 0)]["clip_id"] != out[("off", 1)]["clip_id"]

    # a replaced object fetched ahead fails its checksum for its own clip only: skipped and counted, the rest go on
    train = Store(root).read_manifest("train")
    Store(root).put(train[0]["video"], Store(root).get(train[1]["video"]))
    for extra in ([], [f"data.cache_dir={tmp_path / 'cache'}"]):  # the cache still holds the verified bytes
        got = _torchcodec_epoch(load_config("demo", base + extra), 1)
        assert (got["skipped"], len(got["clip_id"])) == ((1, n - 1) if not extra else (0, n))
        assert (train[0]["clip_id"] in got["clip_id"]) == bool(extra)


@pytest.mark.slow
def test_dali_workers_share_the_node_cache_and_fetch_each_object_once(s3_via_proxy, tmp_path):
    from dali_pipelines.pretext import DaliClipLoader
    root, proxy = s3_via_proxy
    train = Store(root).read_manifest("train")
    overrides = [f"data.root={root}", "data.cache=false", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.pair_negatives=false"]
    cfg = load_config("demo", overrides)
    proxy.reset()
    loader = DaliClipLoader(cfg, "train", train=True, batch_size=4, epoch=0, py_workers=2)
    ids = [[c for b in loader for c in b["clip_id"]] for _ in range(2)]  # two epochs
    del loader
    assert sorted(ids[0]) == sorted(ids[1]) == sorted(c["clip_id"] for c in train)
    counts = proxy.counts()["paths"]
    clip_gets = {p: n for p, n in counts.items() if "/clips/" in p}
    # every video and audio object was fetched exactly once over both epochs, by whichever worker served it
    assert sorted(clip_gets) == sorted(f"/{root[5:]}/{c[f]}" for c in train for f in ("video", "audio"))
    assert set(clip_gets.values()) == {1}
    cache = ClipCache(tmp_path / "cache", 1)
    assert {p.name for p in cache_files(cache.dir)} == {c[f"{f}_sha256"] for c in train for f in ("video", "audio")}

    # with the cache off and one request at a time: the same batches (the DALI loader's order and draws)
    plain = load_config("demo", [f"data.root={root}", "data.cache=false", "data.fetch_threads=1",
                                 "train.pair_negatives=false"])
    ref = [c for b in DaliClipLoader(plain, "train", train=True, batch_size=4, epoch=1) for c in b["clip_id"]]
    assert ref == ids[1]
