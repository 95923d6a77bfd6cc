"""DiskCache on real files: budget, verification, restart, plan-aware eviction, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hpstore.loading.cache import FurthestUsePolicy
from hpstore.loading.disk_cache import PREFIX, SUFFIX, TRAILER, ChunkDiskCache, DiskCache, file_name


def blob(i: int, size: int = 1000) -> bytes:
    return np.random.default_rng(i).bytes(size)


class Source:
    """The thing behind the cache: counts what it is asked for."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self.fetched: list[int] = []

    def fetch_ids(self, ids: list[int]) -> list[bytes]:
        self.fetched.extend(ids)
        return [blob(i, self.size) for i in ids]


def read(cache: DiskCache, src: Source, ids: list[int]) -> list[bytes]:
    names = [file_name(f"obj/{i}") for i in ids]
    return cache.get_many(names, [src.size] * len(ids), lambda idx: src.fetch_ids([ids[j] for j in idx]))


def cache_files(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in d.iterdir() if p.name.startswith(PREFIX)}


def test_budget_is_respected_and_hits_served_from_disk(tmp_path: Path) -> None:
    entry = 1000 + TRAILER.size
    cache = DiskCache(str(tmp_path), 10 * entry)
    src = Source()
    assert read(cache, src, list(range(30))) == [blob(i) for i in range(30)]
    files = cache_files(tmp_path)
    assert len(files) == 10 and sum(files.values()) <= cache.budget_bytes
    assert cache.stats.resident_bytes == sum(files.values())
    src.fetched.clear()
    assert read(cache, src, list(range(20, 30))) == [blob(i) for i in range(20, 30)]
    assert src.fetched == []  # LRU kept the last ten
    assert cache.stats.hits == 10 and cache.stats.evictions == 20
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(PREFIX)]  # no temp files left


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupt_file_is_detected_and_refetched(tmp_path: Path, damage: str) -> None:
    cache = DiskCache(str(tmp_path), 1 << 20)
    src = Source()
    read(cache, src, [1, 2])
    path = tmp_path / file_name("obj/1")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[10] ^= 0x40
    elif damage == "truncate":
        raw = raw[:500]
    else:
        raw += b"junk"
    path.write_bytes(bytes(raw))
    src.fetched.clear()
    assert read(cache, src, [1, 2]) == [blob(1), blob(2)]
    assert src.fetched == [1] and cache.stats.corrupt == 1
    assert path.read_bytes()[:1000] == blob(1)  # rewritten whole
    assert read(cache, src, [1]) == [blob(1)] and src.fetched == [1]


def test_restart_reuses_files_and_cleans_stale_temporaries(tmp_path: Path) -> None:
    src = Source()
    read(DiskCache(str(tmp_path), 1 << 20), src, list(range(5)))
    stale = tmp_path / f".{PREFIX}dead.123-abc.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    other = tmp_path / "unrelated.txt"
    other.write_text("not ours")
    src.fetched.clear()
    again = DiskCache(str(tmp_path), 1 << 20)
    assert again.stats.resident_bytes == 5 * (1000 + TRAILER.size)
    assert read(again, src, list(range(5))) == [blob(i) for i in range(5)]
    assert src.fetched == [] and again.stats.hits == 5
    assert not stale.exists() and other.exists()


def test_zero_budget_keeps_nothing(tmp_path: Path) -> None:
    cache = DiskCache(str(tmp_path), 0)
    src = Source()
    assert read(cache, src, [1, 1]) == [blob(1), blob(1)]
    assert cache_files(tmp_path) == {} and cache.stats.bypassed == 2


def test_plan_aware_eviction_hits_at_least_the_cached_fraction(tmp_path: Path) -> None:
    """Half the data on disk, two epochs in fresh random orders: epoch 2 hits >= ~half (LRU ~15%)."""
    n = 40
    rng = np.random.default_rng(3)
    epochs = [rng.permutation(n).tolist() for _ in range(2)]
    entry = 1000 + TRAILER.size
    ram_policy = FurthestUsePolicy()
    disk = ChunkDiskCache("s3://b/store", {"x": "data-g/train/x"}, str(tmp_path), n // 2 * entry)
    policy = disk.follow(ram_policy)  # what the loader does: RAM policy mirrored to disk
    future = [("x", c) for e in epochs for c in e]
    policy.plan(future)
    src = Source()
    hits_by_epoch = []
    for e, order in enumerate(epochs):
        before = disk.stats.hits
        for pos, c in enumerate(order):
            policy.access(("x", c), e * n + pos)
            ranges = [("k", 0, 1000)]
            out = disk.fetch([("x", c)], ranges, lambda rs, c=c: src.fetch_ids([c]))
            assert out == [blob(c)]
        hits_by_epoch.append(disk.stats.hits - before)
        assert sum(cache_files(tmp_path).values()) <= disk.cache.budget_bytes
    assert hits_by_epoch[0] == 0
    assert hits_by_epoch[1] >= n // 2 - 1


WORKER = textwrap.dedent(
    """
    import sys, numpy as np
    from hpstore.loading.disk_cache import DiskCache, file_name
    directory, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cache = DiskCache(directory, budget)
    rng = np.random.default_rng(seed)
    blob = lambda i: np.random.default_rng(i).bytes(2000 + i)
    for _ in range(60):
        ids = rng.integers(0, 40, 8).tolist()
        names = [file_name(f"obj/{i}") for i in ids]
        out = cache.get_many(names, [2000 + i for i in ids], lambda idx: [blob(ids[j]) for j in idx])
        assert out == [blob(i) for i in ids], "wrong bytes"
    print(cache.stats.hits, cache.stats.corrupt)
    """
)


def test_two_processes_share_a_directory(tmp_path: Path) -> None:
    budget = 20 * 2100
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(seed), str(budget)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in (1, 2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    hits = [int(out.split()[0]) for out, _ in outs]
    assert all(int(out.split()[1]) == 0 for out, _ in outs)  # never saw a torn file
    assert sum(hits) > 0
    # Every file left is whole and valid, and only whole files are left.
    survivor = DiskCache(str(tmp_path), budget * 2)
    for name in cache_files(tmp_path):
        i = next(i for i in range(40) if file_name(f"obj/{i}") == name)
        assert survivor.get(name, 2000 + i) == np.random.default_rng(i).bytes(2000 + i)
    assert survivor.stats.corrupt == 0
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(PREFIX)]
    # Each process evicts down to the budget it sees; the two together overshoot by at most a little.
    assert sum(cache_files(tmp_path).values()) <= budget + 8 * 2100


def test_unknown_names_and_suffix(tmp_path: Path) -> None:
    name = file_name("anything")
    assert name.startswith(PREFIX) and name.endswith(SUFFIX)
    assert DiskCache(str(tmp_path), 100).get(name, 10) is None
