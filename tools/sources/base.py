"""The contract every source kind implements: row-aligned columns, read in bounded batches.

A ``Source`` is one table read from one place (a file, a set of files, a directory tree). It knows
its field names and, where the format says so up front, its row count; ``batches()`` yields
``{field: column}`` dicts where a column is an ``np.ndarray`` (fixed-shape field: first axis = row)
or a ``pa.Array`` (variable-length field). Every batch holds every field with the same row count and
about ``BATCH_BYTES`` of data, so memory stays bounded whatever the source size.

Sources check what they can when they are opened (headers, counts, schemas), so that most bad
input is refused before a store is touched; what only shows while reading (a truncated gzip stream)
raises ``InputError`` from ``batches()``, and the writer then abandons its generation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeAlias

import numpy as np
import pyarrow as pa

from hpstore.errors import InputError

Column: TypeAlias = np.ndarray | pa.Array
Batch: TypeAlias = dict[str, Column]

BATCH_BYTES = 8 << 20
"""Target bytes per batch: large enough to amortise per-batch overhead, small next to memory."""

FIXED_KINDS = frozenset("biufc")
"""numpy dtype kinds stored as fixed-shape arrays: bool, signed, unsigned, float, complex."""


class Source(ABC):
    """Row-aligned fields read from one place. ``path`` names it in messages."""

    path: str
    fields: tuple[str, ...]
    num_rows: int | None  # None when only reading to the end tells (CSV, JSONL)
    attrs: dict[str, dict[str, Any]]  # per-field attributes recorded in the manifest

    @abstractmethod
    def batches(self) -> Iterator[Batch]:
        """Batches of about ``BATCH_BYTES``; raises ``InputError`` naming the file on bad data."""


@dataclass(frozen=True, kw_only=True)
class Split:
    """A named split and the source that fills it."""

    name: str
    source: Source
    format: str


def batch_rows(row_bytes: int, target: int = BATCH_BYTES) -> int:
    """Rows per batch for rows of ``row_bytes`` bytes."""
    return max(1, min(1 << 22, target // max(1, row_bytes)))


def batch_nbytes(batch: Batch) -> int:
    return sum(int(c.nbytes) for c in batch.values())


def check_fixed_dtype(dtype: np.dtype[Any], where: str) -> None:
    """Refuse dtypes that have no fixed-shape numeric representation (objects, dates, records)."""
    if dtype.kind not in FIXED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(
            f"{where}: unsupported dtype {dtype} (fixed-shape fields are bool, integer, float or complex)"
        )


def read_exact(f: BinaryIO, out: np.ndarray, where: str) -> None:
    """Fill ``out`` (C-contiguous) from ``f``; a short read means a truncated file."""
    view = out.data.cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise InputError(f"{where}: truncated: the data ends {len(view) - got} bytes early")
        got += n


def check_field_name(name: str, where: str, what: str = "field") -> str:
    """Field and split names become path segments of the store: refuse ones that could not be."""
    if not name or name in (".", "..", "zarr.json") or any(c in name for c in "/\\\x00"):
        raise InputError(
            f"{where}: {name!r} cannot be a {what} name (no '/', '\\', '.', '..' or 'zarr.json')"
        )
    return name
