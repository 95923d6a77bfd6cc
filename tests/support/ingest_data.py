"""Source files for ingest tests (IDX, MNIST directories) and reading a whole store back."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

import hpstore

IDX_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the IDX format (big-endian values behind a big-endian header)."""
    code = IDX_CODES[array.dtype.name]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


def mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) < 0.2).astype(np.uint8) * rng.integers(
        0, 256, (n, 28, 28), dtype=np.uint8
    )
    return images, rng.integers(0, 10, n, dtype=np.uint8)


def write_mnist_dir(root: Path, n_train: int, n_test: int, *, gz: bool, seed: int = 0) -> dict[str, Any]:
    """The four MNIST files; returns ``{split: (images, labels)}`` as written."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        images, labels = mnist_like(n, seed + len(split))
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz=gz)
        out[split] = (images, labels)
    return out


def read_all(url: str) -> dict[str, dict[str, Any]]:
    """Every split and field of a committed store: arrays for fixed-shape fields, lists otherwise."""
    store = hpstore.open(url)
    return {name: store.split(name)[:] for name in store.splits}
