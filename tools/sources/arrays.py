"""Array streams: fields stored row-major in a file behind a small header (``.npy``, IDX).

An ``ArrayStream`` says where one array is, how to open it positioned at its first row, and its
shape and dtype; an ``ArraySource`` reads several row-aligned streams in step, batch by batch,
``readinto`` fresh buffers, so the process holds only the batches in flight. (Memory-mapping would
count every page read so far towards the resident set, so it is used only for Fortran-ordered
``.npy`` files, whose rows are not contiguous.) Every stream is read to its end, so compressed
containers (gzip, zip) verify their checksums and trailing garbage is reported.
"""

from __future__ import annotations

import gzip
import math
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from hpstore.errors import InputError
from tools.sources.base import Batch, Column, Source, batch_rows, check_fixed_dtype, read_exact

DECODE_ERRORS = (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile)
"""What gzip, zipfile and numpy raise on damaged input (``EOFError``: a truncated gzip stream)."""


def describe(exc: BaseException) -> str:
    """A decode error in words: truncated (the stream ends early) or corrupt (bad bytes)."""
    if isinstance(exc, EOFError):
        return f"truncated: {exc}"
    if isinstance(exc, gzip.BadGzipFile | zlib.error | zipfile.BadZipFile):
        return f"corrupt: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read: {exc.strerror}"
    return str(exc)


@dataclass(frozen=True, kw_only=True)
class ArrayStream:
    """One array in a file: where it is, how to open it (positioned at row 0), shape and dtype."""

    field: str
    where: str
    open: Callable[[], BinaryIO]
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    mmap_path: str | None = None
    cast: np.dtype[Any] | None = None  # dtype the rows are converted to (IDX labels -> int64)

    @property
    def row_bytes(self) -> int:
        return (self.cast or self.dtype).itemsize * math.prod(self.shape[1:])


def check_stream(arr: ArrayStream, available: int | None, data_offset: int) -> ArrayStream:
    """Refuse what cannot be stored; ``available`` bytes (when known) must hold the data."""
    if not arr.shape:
        raise InputError(f"{arr.where}: a 0-d array has no sample axis")
    if arr.dtype.kind not in "SU":
        check_fixed_dtype(arr.dtype, arr.where)
    elif len(arr.shape) != 1:
        raise InputError(f"{arr.where}: string arrays must be 1-d, got shape {list(arr.shape)}")
    need = data_offset + arr.dtype.itemsize * math.prod(arr.shape)
    if available is not None and available < need:
        raise InputError(f"{arr.where}: truncated: {available} bytes, the header promises {need}")
    if available is not None and available > need:
        raise InputError(f"{arr.where}: {available - need} unexpected bytes after the last sample")
    return arr


class ArraySource(Source):
    """Row-aligned array streams, read in step, batch by batch."""

    def __init__(self, path: str, arrays: list[ArrayStream]) -> None:
        lengths = {a.field: a.shape[0] for a in arrays}
        if len(set(lengths.values())) > 1:
            raise InputError(f"{path}: arrays have different lengths {lengths}")
        if len(lengths) != len(arrays):
            raise InputError(f"{path}: two arrays share a field name: {[a.field for a in arrays]}")
        self.path = path
        self.arrays = arrays
        self.fields = tuple(a.field for a in arrays)
        self.num_rows = arrays[0].shape[0]
        self.attrs: dict[str, dict[str, Any]] = {}

    def batches(self) -> Iterator[Batch]:
        rows = batch_rows(sum(a.row_bytes for a in self.arrays))
        with ExitStack() as stack:
            readers = [stack.enter_context(_row_reader(a)) for a in self.arrays]
            assert self.num_rows is not None
            for start in range(0, self.num_rows, rows):
                n = min(rows, self.num_rows - start)
                yield {a.field: read(n) for a, read in zip(self.arrays, readers, strict=True)}


@contextmanager
def _row_reader(arr: ArrayStream) -> Iterator[Callable[[int], Column]]:
    """``read(n)``: the next ``n`` rows of one array, as a column."""
    try:
        if arr.fortran and arr.mmap_path is not None:
            whole: np.ndarray | None = np.load(arr.mmap_path, mmap_mode="r")
        elif arr.fortran:
            with arr.open() as f:
                whole = np.frombuffer(f.read(), dtype=arr.dtype).reshape(arr.shape, order="F")
        else:
            whole = None
        stream = arr.open() if whole is None else None
    except DECODE_ERRORS as exc:
        raise InputError(f"{arr.where}: {describe(exc)}") from None
    pos = 0

    def read(n: int) -> Column:
        nonlocal pos
        if whole is not None:
            out = np.ascontiguousarray(whole[pos : pos + n])
        else:
            assert stream is not None
            out = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
            try:
                read_exact(stream, out, arr.where)
            except InputError:
                raise
            except DECODE_ERRORS as exc:
                raise InputError(f"{arr.where}: {describe(exc)}") from None
        pos += n
        if stream is not None and pos == arr.shape[0]:
            _check_end(stream, arr.where)
        return _column(out if arr.cast is None else out.astype(arr.cast), arr)

    try:
        yield read
    finally:
        if stream is not None:
            stream.close()


def _check_end(stream: BinaryIO, where: str) -> None:
    """Read to the end: compressed streams verify their checksums only there; extra data is an error."""
    try:
        extra = stream.read(1 << 16)
    except DECODE_ERRORS as exc:
        raise InputError(f"{where}: {describe(exc)}") from None
    if extra:
        raise InputError(f"{where}: unexpected data after the last sample")


def _column(rows: np.ndarray, arr: ArrayStream) -> Column:
    if arr.dtype.kind not in "SU":
        return rows
    return strings_to_arrow(rows)


def strings_to_arrow(rows: np.ndarray) -> pa.Array:
    """A 1-d NumPy ``S``/``U`` array as Arrow binary/string, with NumPy's meaning of each value.

    NumPy pads fixed-width strings with NULs and strips only *trailing* NULs (``b"a\\x00b"`` stays
    three bytes). ``pa.array`` on such an array stops at the first NUL instead, so values with an
    interior NUL would come back cut short: the values are built here, by NumPy's rule."""
    if rows.dtype.kind == "U":
        return pa.array(rows.tolist(), type=pa.string())  # tolist strips trailing NULs only
    n, width = len(rows), rows.dtype.itemsize
    if width == 0 or n == 0:
        return pa.array([b""] * n, type=pa.binary())
    cells = np.ascontiguousarray(rows).view(np.uint8).reshape(n, width)
    nonzero = cells != 0
    # Length = 1 + index of the last non-NUL byte (0 when a value is all NULs).
    lengths = np.where(nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = cells[np.arange(width) < lengths[:, None]]  # row-major: values in order
    # A batch holds at most BATCH_BYTES (tools.sources.base), far below binary's 2 GiB offsets.
    return pa.BinaryArray.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )
