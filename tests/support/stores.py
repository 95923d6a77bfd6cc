"""Building small stores for tests, through the real ``StoreWriter``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from hpstore.format.manifest import Manifest
from hpstore.format.writer import Layout, StoreWriter
from hpstore.storage.base import Storage

SMALL = Layout(chunk_bytes=1024, shard_bytes=4096, workers=2, writers=2)
"""Tiny chunks and shards, so small arrays still span many chunks, shards and Arrow parts."""


def write_store(
    storage: Storage,
    splits: Mapping[str, Mapping[str, Any]],
    *,
    layout: Layout = SMALL,
    batch_rows: int = 37,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
    break_lock: bool = False,
) -> Manifest:
    """Write ``{split: {field: column}}`` in batches of ``batch_rows`` (an odd size, so batches
    straddle chunk boundaries) and commit."""
    with StoreWriter(storage, layout=layout, overwrite=overwrite, source=source, break_lock=break_lock) as w:
        for name, columns in splits.items():
            sw = w.split(name)
            n = len(next(iter(columns.values())))
            for start in range(0, max(n, 1), batch_rows):
                sw.append({f: col[start : start + batch_rows] for f, col in columns.items()})
            w.add_split(sw)
        return w.commit()


def sample_columns(n: int, seed: int = 0) -> dict[str, Any]:
    """A mixed split: an image-like array, a label, bytes, strings, ragged ints and a struct."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 255, (n, 6, 5), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int64),
        "blob": pa.array([rng.bytes(int(i % 23)) for i in range(n)], pa.binary()),
        "text": pa.array([f"sample {i} " * int(i % 4) for i in range(n)], pa.string()),
        "ragged": pa.array([list(range(int(i % 7))) for i in range(n)], pa.list_(pa.int64())),
        "meta": pa.array(
            [{"id": i, "name": f"n{i}", "score": float(i) / 3} for i in range(n)],
            pa.struct([("id", pa.int64()), ("name", pa.string()), ("score", pa.float64())]),
        ),
    }


def flip_bit(path: str, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file in place (what a bad disk or a bad copy does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ (1 << bit)]))
        f.flush()
        os.fsync(f.fileno())
