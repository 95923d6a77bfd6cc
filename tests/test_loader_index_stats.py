"""``Loader.stats`` counts the shard-index reads too (once per shard), apart from chunk reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import hpstore
from hpstore.format import zarr_shard as zf
from hpstore.format.writer import Layout
from hpstore.storage.local import LocalStorage
from tests.support.stores import write_store


def test_loader_stats_count_index_reads(tmp_path: Path) -> None:
    n = 3000
    cols = {"image": np.zeros((n, 4, 4), np.uint8), "label": np.arange(n)}
    write_store(
        LocalStorage(str(tmp_path)), {"train": cols}, layout=Layout(chunk_bytes=2048, shard_bytes=8192)
    )
    ds = hpstore.open(str(tmp_path)).split("train")
    shards = sum(1 for k in ds.store.manifest.objects if "/c/" in k)
    assert shards > 2
    before = ds.store.storage.stats.bytes_read
    loader = hpstore.Loader(ds, 100, num_workers=0, seed=0)
    for _ in loader:
        pass
    stats = loader.stats
    assert stats["index_read_requests"] == shards
    assert stats["index_bytes_read"] == shards * zf.index_nbytes(ds.spec.chunks_per_shard)
    # Index and chunk bytes together are what the storage read.
    assert stats["bytes_read"] + stats["index_bytes_read"] == ds.store.storage.stats.bytes_read - before
    for _ in loader:  # indices are kept: a second epoch reads none
        pass
    assert loader.stats["index_read_requests"] == shards
