"""A tiny, learnable image-classification store for the trainer's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpstore.format.writer import Layout, StoreWriter
from hpstore.storage.open import open_storage

SIDE = 10
CLASSES = 4
LAYOUT = Layout(chunk_bytes=4096, shard_bytes=16384, workers=1, writers=1)


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a bright 3x3 square near corner k, shifted by up to one pixel, over noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(70, 40, (n, SIDE, SIDE))
    corners = [(1, 1), (1, SIDE - 4), (SIDE - 4, 1), (SIDE - 4, SIDE - 4)]
    shifts = rng.integers(-1, 2, (n, 2))
    for i in range(n):
        r, c = corners[y[i]]
        r, c = r + shifts[i, 0], c + shifts[i, 1]
        x[i, r : r + 3, c : c + 3] += 80
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_image_store(
    path: Path, *, train: int = 384, test: int = 128, seed: int = 0, label_dtype: str = "int64"
) -> str:
    """Write ``train`` and ``test`` splits of ``image`` (uint8[10, 10]) and ``label``; returns the path."""
    with StoreWriter(open_storage(str(path)), layout=LAYOUT) as w:
        for name, n, s in (("train", train, seed), ("test", test, seed + 1)):
            if n == 0:
                continue
            x, y = images(n, s)
            sw = w.split(name)
            for a in range(0, n, 100):
                sw.append({"image": x[a : a + 100], "label": y[a : a + 100].astype(label_dtype)})
            w.add_split(sw)
        w.commit()
    return str(path)
