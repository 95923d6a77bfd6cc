"""Committed version-1 stores keep reading, byte for byte, with hpstore and with plain zarr / pyarrow.

The stores under ``tests/data/format-v1/`` were written once by ``python -m tests.test_golden_v1``
and are never rewritten: a change that breaks them breaks every store users already have. Only a new
format version adds new golden stores (next to these, which stay).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import zarr

import hpstore
from hpstore.format.verify import verify
from hpstore.format.writer import Layout
from hpstore.storage.local import LocalStorage
from tests.support.stores import write_store

GOLDEN = Path(__file__).parent / "data" / "format-v1"
CODECS: dict[str, dict[str, Any]] = {
    "zstd": {"name": "zstd", "level": 1},
    "lz4": {"name": "lz4", "level": 5},
    "none": {"name": "none"},
}
N = 50


def golden_columns() -> dict[str, Any]:
    """Deterministic without a random generator, so the expected values never drift."""
    i = np.arange(N)
    return {
        "image": ((i[:, None, None] * 7 + np.arange(16).reshape(4, 4)) % 251).astype(np.uint8),
        "label": (i % 10).astype(np.int64),
        "score": (i / 8).astype(np.float32),
        "caption": pa.array([f"item {k}" + "!" * (k % 5) for k in range(N)], pa.string()),
        "ragged": pa.array([list(range(k % 4)) for k in range(N)], pa.list_(pa.int32())),
    }


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_golden_store_reads(codec: str) -> None:
    root = GOLDEN / codec
    store = hpstore.open(str(root))
    assert store.manifest.version == 1
    assert verify(store.storage, store.manifest).ok
    ds = store.split("train")
    spec = ds.spec
    assert spec.num_chunks > spec.chunks_per_shard  # several shards, the last one partial
    got = ds.read(np.arange(N))
    want = golden_columns()
    for name in ("image", "label", "score"):
        assert np.array_equal(got[name], want[name])
        plain = zarr.open_array(str(root / spec.fields[name].path), mode="r")[...]
        assert np.array_equal(plain, want[name])
    assert got["caption"] == want["caption"].to_pylist()
    assert [list(x) for x in got["ragged"]] == want["ragged"].to_pylist()
    parts = spec.fields["caption"].parts
    plain_captions = pa.concat_tables(pa.ipc.open_file(str(root / p.key)).read_all() for p in parts)
    assert plain_captions.column("caption").to_pylist() == want["caption"].to_pylist()


def regenerate() -> None:
    """Only for a new format version's golden stores: never rewrite existing ones."""
    for codec, spec in CODECS.items():
        root = GOLDEN / codec
        if root.exists():
            print(f"{root} exists; golden stores are never rewritten", file=sys.stderr)
            continue
        layout = Layout(chunk_bytes=1024, shard_bytes=2048, codec=spec, workers=1, writers=1)
        try:
            write_store(
                LocalStorage(str(root)), {"train": golden_columns()}, layout=layout, source={"golden": "v1"}
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise


if __name__ == "__main__":
    regenerate()
