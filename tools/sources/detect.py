"""Format detection: what a source path holds, by name first, then by its first bytes."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from hpstore.errors import InputError
from tools.sources import tabular
from tools.sources.idx import IDX_TYPES, find_mnist, looks_like_idx
from tools.sources.imagefolder import is_imagefolder

FORMATS = ("npy", "npz", "idx", "mnist", "parquet", "csv", "jsonl", "arrow", "imagefolder")

_MAGIC = (
    (b"\x93NUMPY", "npy"),
    (b"PK\x03\x04", "npz"),
    (b"PK\x05\x06", "npz"),
    (b"PAR1", "parquet"),
    (b"ARROW1", "arrow"),
    (b"\xff\xff\xff\xff", "arrow"),  # IPC stream: continuation marker of the schema message
)


def _is_idx_header(head: bytes) -> bool:
    return len(head) >= 4 and head[:2] == b"\0\0" and head[2] in IDX_TYPES and head[3] > 0


def _sniff(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if _is_idx_header(head):
        return "idx"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as g:
                if _is_idx_header(g.read(4)):
                    return "idx"
        except (OSError, EOFError, zlib.error):
            return None
    return None


def _detect_dir(path: str) -> str:
    if find_mnist(path):
        return "mnist"
    names = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]
    kinds = {k for k in (tabular.format_of(n) for n in names) if k is not None}
    if len(kinds) > 1:
        raise InputError(f"{path}: holds {' and '.join(sorted(kinds))} files; choose one with --format")
    if kinds:
        return kinds.pop()
    if any(n.endswith(".npy") for n in names):
        return "npy"
    if is_imagefolder(path):
        return "imagefolder"
    raise InputError(
        f"{path}: cannot tell what this directory holds (MNIST files, .npy files, tabular files or "
        "<class>/<image> folders); name the format with --format"
    )


def detect_format(path: str) -> str:
    """One of ``FORMATS`` for ``path``; ``InputError`` when missing or unrecognisable."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _detect_dir(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".npy", ".npz"):
        return suffix[1:]
    if looks_like_idx(path):
        return "idx"
    by_name = tabular.format_of(path)
    if by_name is not None:
        return by_name
    try:
        sniffed = _sniff(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if sniffed is None:
        raise InputError(f"{path}: unknown format; name it with --format ({', '.join(FORMATS)})")
    return sniffed
