"""The loader's disk cache over a real S3 (moto) store: limit, hit rate, restart, corruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpstore
from hpstore.format.writer import Layout, StoreWriter
from hpstore.loading.disk_cache import PREFIX
from hpstore.storage.open import open_storage
from tests.support.s3server import S3Server
from tests.support.s3server import s3_server as s3_server  # the fixture

N = 2000


@pytest.fixture(scope="module")
def store_url(s3_server: S3Server) -> tuple[str, np.ndarray]:
    url = f"s3://{s3_server.create_bucket()}/store"
    x = np.random.default_rng(0).integers(0, 255, (N, 10, 10), dtype=np.uint8)
    layout = Layout(chunk_bytes=4096, shard_bytes=16384, codec={"name": "none"}, workers=1, writers=2)
    with StoreWriter(open_storage(url, s3_server.storage_options()), layout=layout) as w:
        sw = w.split("train")
        sw.append({"image": x, "label": np.arange(N)})
        w.add_split(sw)
        w.commit()
    return url, x


def epoch(loader: hpstore.Loader, x: np.ndarray, e: int) -> None:
    loader.set_epoch(e)
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        assert np.array_equal(batch["image"].numpy(), x[idx]) and np.array_equal(batch["label"].numpy(), idx)
        seen.append(idx)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N))


def on_disk(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in d.iterdir() if p.name.startswith(PREFIX)}


def open_loader(s3: S3Server, url: str, cache_dir: Path, budget: int) -> tuple[Any, hpstore.Loader]:
    store = hpstore.open(url, storage_options=s3.storage_options())
    loader = hpstore.Loader(
        store.split("train"),
        100,
        cache_bytes=0,  # no RAM tier: every chunk access reaches the disk cache
        cache_dir=str(cache_dir),
        cache_disk_bytes=budget,
        with_index=True,
        num_workers=1,
    )
    return store, loader


def test_half_size_cache_halves_the_second_epoch(
    s3_server: S3Server, store_url: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    url, x = store_url
    total = hpstore.open(url, storage_options=s3_server.storage_options()).manifest.total_bytes
    store, loader = open_loader(s3_server, url, tmp_path, total // 2)
    fetched = []
    for e in range(3):
        before, hits, misses = (
            store.storage.stats.bytes_read,
            loader.stats["disk_hits"],
            loader.stats["disk_misses"],
        )
        epoch(loader, x, e)
        fetched.append(store.storage.stats.bytes_read - before)
        assert sum(on_disk(tmp_path).values()) <= total // 2  # the limit holds at every epoch end
        if e:
            new_hits = loader.stats["disk_hits"] - hits
            assert new_hits / (new_hits + loader.stats["disk_misses"] - misses) >= 0.45
    # LRU would keep ~15% useful under a fresh shuffle; the plan keeps about half.
    assert fetched[1] <= 0.6 * fetched[0] and fetched[2] <= 0.6 * fetched[0]


def test_restart_reuses_the_cache_and_corrupt_files_are_refetched(
    s3_server: S3Server, store_url: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    url, x = store_url
    _, first = open_loader(s3_server, url, tmp_path, 1 << 30)
    epoch(first, x, 0)
    files = on_disk(tmp_path)
    assert first.stats["disk_misses"] == len(files) > 0

    # A new process (fresh objects; nothing shared but the directory) finds everything there.
    store, again = open_loader(s3_server, url, tmp_path, 1 << 30)
    requests = store.storage.stats.read_requests
    epoch(again, x, 1)
    assert again.stats["disk_misses"] == 0 and again.stats["disk_hits"] >= len(files)
    shards = sum(1 for key in store.manifest.objects if "/c/" in key)
    assert store.storage.stats.read_requests - requests <= shards  # shard indices only, no chunks

    # Damage three cached chunks: detected, deleted, fetched again, data still exact.
    damaged = sorted(files)[:3]
    for name in damaged:
        p = tmp_path / name
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 3] ^= 0xFF
        p.write_bytes(bytes(raw))
    store, third = open_loader(s3_server, url, tmp_path, 1 << 30)
    epoch(third, x, 2)
    assert third.stats["disk_corrupt"] == 3 and third.stats["disk_misses"] == 3
    assert set(on_disk(tmp_path)) == set(files)  # rewritten whole
