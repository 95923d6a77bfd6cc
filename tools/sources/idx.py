"""IDX sources (the MNIST file format), plain or gzipped, one file or the MNIST directory layout.

An IDX file is ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 dimensions, then the values,
big-endian, row-major. Gzip is recognised by its magic bytes, not by the file name, and streamed:
only the batches in flight are held, and the gzip CRC is checked at the end of the stream.

A directory holding ``train-images-idx3-ubyte[.gz]`` / ``train-labels-idx1-ubyte[.gz]`` and
``t10k-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]`` (the names of the MNIST,
Fashion-MNIST and KMNIST distributions; ``.idx`` with a dot also accepted) becomes splits ``train``
and ``test`` with fields ``image`` (as stored, uint8 28x28 for MNIST) and ``label`` (int64, what
torchvision returns).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpstore.errors import InputError
from tools.sources.arrays import DECODE_ERRORS, ArraySource, ArrayStream, check_stream, describe
from tools.sources.base import Split, check_field_name

IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MNIST_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([0-9])-ubyte(\.gz)?$")
MNIST_SPLITS = {"train": "train", "t10k": "test"}
IDX_NAME = re.compile(r"(^|[-._])idx[0-9]+([-._]ubyte)?(\.gz)?$")


def looks_like_idx(path: str) -> bool:
    """IDX by name (``*-idx3-ubyte``, ``*.idx1-ubyte.gz`` ...)."""
    return bool(IDX_NAME.search(Path(path).name))


def _open(path: str) -> BinaryIO:
    """The file's bytes, decompressed when it starts with the gzip magic."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_header(f: BinaryIO, where: str) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """``(dtype, dims, header bytes)``; refuses anything that is not an IDX header."""
    try:
        head = f.read(4)
        if len(head) < 4:
            raise InputError(f"{where}: not an IDX file: {len(head)} bytes, shorter than a header")
        zero, code, ndim = struct.unpack(">HBB", head)
        if zero != 0 or code not in IDX_TYPES or ndim == 0:
            raise InputError(f"{where}: not an IDX file: bad magic {head.hex()}")
        raw = f.read(4 * ndim)
    except InputError:
        raise
    except DECODE_ERRORS as exc:
        raise InputError(f"{where}: {describe(exc)}") from None
    if len(raw) < 4 * ndim:
        raise InputError(f"{where}: truncated: the file ends inside the IDX header")
    return IDX_TYPES[code], struct.unpack(f">{ndim}I", raw), 4 + 4 * ndim


def idx_stream(path: str, field: str, cast: np.dtype[Any] | None = None) -> ArrayStream:
    """One IDX file as an array stream; checks the header (and, uncompressed, the size) now."""
    try:
        with _open(path) as f:
            dtype, dims, offset = _read_header(f, path)
            compressed = isinstance(f, gzip.GzipFile)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None

    def open_() -> BinaryIO:
        f = _open(path)
        _read_header(f, path)
        return f

    arr = ArrayStream(field=field, where=path, open=open_, shape=dims, dtype=dtype, fortran=False, cast=cast)
    return check_stream(arr, None if compressed else os.path.getsize(path), offset)


def default_field(path: str) -> str:
    name = Path(path).name
    return "label" if "labels" in name else "image" if "images" in name else "data"


def open_idx(path: str, field: str | None = None) -> ArraySource:
    """One IDX file: a single field, named ``field`` or ``image`` / ``label`` / ``data`` by file name."""
    return ArraySource(path, [idx_stream(path, check_field_name(field or default_field(path), path))])


def find_mnist(path: str) -> dict[str, dict[str, str]]:
    """``{prefix: {"images": file, "labels": file}}`` of MNIST-named files; plain preferred to .gz."""
    found: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(path)):
        m = MNIST_NAME.match(name)
        if m and os.path.isfile(os.path.join(path, name)):
            prefix, kind, gz = m.group(1), m.group(2), m.group(4)
            slot = found.setdefault(prefix, {})
            if kind not in slot or not gz:  # sorted: "x" before "x.gz"; keep the uncompressed one
                slot.setdefault(kind, os.path.join(path, name))
    return found


def mnist_splits(path: str) -> list[Split]:
    """Splits ``train`` / ``test`` of an MNIST directory: fields ``image`` and ``label`` (int64)."""
    found = find_mnist(path)
    if not found:
        raise InputError(f"{path}: no MNIST files (train-images-idx3-ubyte[.gz], ...) in this directory")
    splits = []
    for prefix in ("train", "t10k"):
        files = found.get(prefix)
        if files is None:
            continue
        for kind, other in (("images", "labels"), ("labels", "images")):
            if kind in files and other not in files:
                raise InputError(
                    f"{files[kind]}: no matching {prefix}-{other}-idx{3 if other == 'images' else 1}-ubyte[.gz] "
                    f"in {path}"
                )
        images = idx_stream(files["images"], "image")
        labels = idx_stream(files["labels"], "label", cast=np.dtype("int64"))
        if images.shape[0] != labels.shape[0]:
            raise InputError(
                f"{files['labels']}: {labels.shape[0]} labels, but {Path(files['images']).name} "
                f"has {images.shape[0]} images"
            )
        if len(labels.shape) != 1:
            raise InputError(f"{files['labels']}: labels must be 1-d, got shape {list(labels.shape)}")
        source = ArraySource(path, [images, labels])
        splits.append(Split(name=MNIST_SPLITS[prefix], source=source, format="mnist"))
    return splits
