"""Batch assembly: a shuffle window's rows gathered once, in output order; batches are slices.

For a fixed-shape field the window's rows are scattered from each decoded chunk straight into one
tensor in output order: one fancy-indexed copy per chunk piece (``out[dest] = chunk[a:b]``), never a
loop over samples, and no collate step. Each batch is then a slice of that tensor (a view, no copy),
so a batch costs a few microseconds whatever its size. Where the rows go is the caller's choice
(``take``): recycled arrays from a ``BufferPool`` (pinned when a GPU is present, so batches are
pinned without another copy), or shared memory (``shared_array``) for a worker process to hand to its
parent without a copy.

Variable-length fields (Arrow) are gathered per window with one ``concat`` + ``take``; each batch is
then converted:

- lists of numbers or booleans (``list<int64>``, ``large_list<float>`` ...): a zero-padded tensor
  ``(batch, longest list in the batch)`` of the value type, plus ``<name>_lengths`` (int64);
- ``binary`` / ``string`` (and their ``large_`` forms): a Python list of ``bytes`` / ``str``;
- anything else (structs, nested lists): a Python list of the values ``pyarrow`` gives.

A null list counts as empty; nulls inside a list of numbers become 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hpstore.errors import InputError
from hpstore.format.chunks import Chunk, _schema
from hpstore.format.manifest import FieldSpec
from hpstore.loading.plan import Window

LENGTHS_SUFFIX = "_lengths"
"""Key suffix of the lengths tensor that accompanies a padded variable-length field."""

ChunkOf = Callable[[int], Chunk]
"""Decoded chunk of one field, by chunk id."""


def is_padded(f: FieldSpec) -> bool:
    """Whether a variable field becomes a padded tensor plus lengths (lists of numbers)."""
    if f.is_array or f.arrow_schema is None:
        return False
    t = _schema(f).field(0).type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    v = t.value_type
    return bool(pa.types.is_integer(v) or pa.types.is_floating(v) or pa.types.is_boolean(v))


Take = Callable[[tuple[int, ...], np.dtype[Any]], torch.Tensor]
"""Where a window's rows go: an uninitialised CPU tensor of the given shape and dtype (see
``hpstore.loading.buffers``)."""


class FieldTransform(Protocol):
    """Turns a window's rows of one field into a fixed-shape array (``hpstore.images`` implements it).

    Called on the window builder's thread with the gathered rows (an Arrow array, or an array for
    fixed-shape fields), the rows' global sample indices and the loader's seed and epoch (so random
    augmentations are reproducible), and ``out``, the uninitialised batch buffer of shape
    ``(rows, *output(values)[0])``. Fills ``out``; returns the positions of rows it could not
    produce (the window then fills them with another of its rows, in every field)."""

    def output(self, values: Any) -> tuple[tuple[int, ...], np.dtype[Any]]: ...

    def __call__(
        self, values: Any, out: np.ndarray, *, indices: np.ndarray, seed: int, epoch: int, field: str
    ) -> np.ndarray: ...


def shared_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor:
    """A tensor in shared memory (a worker process hands it to the parent without a copy)."""
    like = torch.from_numpy(np.empty(0, dtype=dtype))
    return torch.empty(shape, dtype=like.dtype).share_memory_()


_SCATTERED = 4
"""Pieces per distinct chunk above which a window is gathered chunk by chunk (fancy-indexed reads)
rather than piece by piece: the windows of an elastic resume hold single rows."""


def _as_rows(arr: np.ndarray) -> np.ndarray | None:
    """A C-contiguous array of samples as a 1-D array of opaque rows (a void dtype as wide as a
    sample), so numpy's scatter moves each sample with one ``memcpy`` instead of an element loop
    (28x28 uint8 rows scatter 1.2x faster); ``None`` for other arrays."""
    if arr.ndim < 2 or not arr.flags.c_contiguous or arr.dtype.hasobject:
        return None
    width = arr.itemsize * math.prod(arr.shape[1:])
    return arr.view(np.uint8).reshape(len(arr), width).view(np.dtype((np.void, width))).reshape(len(arr))


def _row_chunks(chunk_of: ChunkOf, out: np.ndarray) -> tuple[ChunkOf, np.ndarray]:
    """``chunk_of`` and ``out`` as opaque rows (a chunk of another dtype or layout converted
    first), or both as they are when ``out`` is not a contiguous array of samples."""
    rows = _as_rows(out)
    if rows is None:
        return chunk_of, out

    def row_chunk(cid: int) -> Chunk:
        arr = np.asarray(chunk_of(cid))
        if arr.dtype != out.dtype or not arr.flags.c_contiguous:  # as numpy's assignment would cast
            arr = np.ascontiguousarray(arr, dtype=out.dtype)
        view = _as_rows(arr)
        return arr if view is None else view

    return row_chunk, rows


def gather_rows(window: Window, chunk_of: ChunkOf, out: np.ndarray) -> None:
    """Fill ``out`` (rows in output order) from the window's chunks: one copy per chunk piece."""
    dest = window.destinations
    chunk_of, out = _row_chunks(chunk_of, out)
    if len(window.pieces) > _SCATTERED * len(window.chunks) + 16:
        chunk, row = window.natural_rows()
        by_chunk = np.argsort(chunk, kind="stable")
        ids, starts = np.unique(chunk[by_chunk], return_index=True)
        ends = np.append(starts[1:], len(by_chunk))
        for c, a, b in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
            sel = by_chunk[a:b]
            out[dest[sel]] = chunk_of(c)[row[sel]]
        return
    offsets = window.offsets.tolist()
    for k, (cid, a, b) in enumerate(window.pieces.tolist()):
        s, e = offsets[k], offsets[k + 1]
        if window.order is None:
            out[s:e] = chunk_of(cid)[a:b]
        else:
            out[dest[s:e]] = chunk_of(cid)[a:b]


def gather_variable(window: Window, chunk_of: ChunkOf) -> pa.Array:
    """The window's values of a variable field, in output order."""
    parts = [chunk_of(cid).slice(a, b - a) for cid, a, b in window.pieces.tolist()]
    arr = pa.concat_arrays(parts) if len(parts) != 1 else parts[0]
    return arr if window.order is None else arr.take(pa.array(window.order))


def padded(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(values, lengths)``: a list array as a zero-padded 2-d array, built without a row loop."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    flat = arr.flatten()
    if flat.null_count:
        flat = pc.fill_null(flat, pa.scalar(0, flat.type) if not pa.types.is_boolean(flat.type) else False)
    values = flat.to_numpy(zero_copy_only=False)
    n = len(arr)
    out = np.zeros((n, int(lengths.max()) if n else 0), dtype=values.dtype)
    if values.size:
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = values
    return out, lengths


class WindowRows:
    """A built window: each requested field's rows in output order; ``batch(k)`` slices batch k."""

    def __init__(
        self,
        window: Window,
        columns: Mapping[str, torch.Tensor | pa.Array],
        padded_fields: frozenset[str],
        *,
        index: torch.Tensor | None,
        pin: bool,
    ) -> None:
        self.window = window
        self.columns = dict(columns)
        self.padded_fields = padded_fields
        self.index = index
        self.pin = pin
        self._views: dict[str, tuple[torch.Tensor, ...]] | None = None

    def _split(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Every batch's view of each tensor column, made in one call per column: the consumer's
        thread then pays a dict lookup per batch and field instead of a slice (about 4 µs each)."""
        size = self.window.batch_size
        views = {n: c.split(size) for n, c in self.columns.items() if isinstance(c, torch.Tensor)}
        if self.index is not None:
            views["\0index"] = self.index.split(size)
        self._views = views
        return views

    @property
    def num_batches(self) -> int:
        return self.window.num_batches

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(c, "nbytes", 0)) for c in self.columns.values())

    def batch(self, k: int) -> dict[str, Any]:
        views = self._views if self._views is not None else self._split()
        out: dict[str, Any] = {}
        for name, col in self.columns.items():
            if name in views:
                out[name] = views[name][k]
                continue
            assert isinstance(col, pa.Array)
            a, b = self.window.batch_bounds(k)
            part = col.slice(a, b - a)
            if name in self.padded_fields:
                values, lengths = padded(part)
                t = torch.from_numpy(values)
                out[name] = t.pin_memory() if self.pin else t
                out[name + LENGTHS_SUFFIX] = torch.from_numpy(lengths)
            else:
                out[name] = part.to_pylist()
        if self.index is not None:
            out["index"] = views["\0index"][k]
        return out


def assemble(
    window: Window,
    fields: Mapping[str, FieldSpec],
    chunk_of: Callable[[str, int], Chunk],
    *,
    take: Take,
    padded_fields: frozenset[str],
    with_index: bool,
    pin: bool = False,
    transforms: Mapping[str, FieldTransform] | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> WindowRows:
    """Gather every requested field of ``window`` from its decoded chunks into arrays from
    ``take``; ``padded_fields`` are the variable fields to convert to padded tensors (``is_padded``),
    pinned when ``pin``. Fields in ``transforms`` go through their transform (``FieldTransform``)."""
    columns: dict[str, torch.Tensor | pa.Array] = {}
    skipped: list[np.ndarray] = []
    for name, f in fields.items():

        def of(cid: int, name: str = name) -> Chunk:
            return chunk_of(name, cid)

        if transforms and name in transforms:
            columns[name], bad = _transformed(window, f, of, take, transforms[name], name, seed, epoch)
            skipped.append(bad)
        elif f.is_array:
            dtype = np.dtype(f.dtype or "u1").newbyteorder("=")
            out = take((window.rows, *(f.shape or ())), dtype)
            gather_rows(window, of, out.numpy())
            columns[name] = out
        else:
            columns[name] = gather_variable(window, of)
    index = None
    if with_index:
        idx = window.indices()
        index = take(idx.shape, idx.dtype)
        index.numpy()[:] = idx
    bad = np.unique(np.concatenate(skipped)) if skipped else np.empty(0, np.int64)
    if bad.size:
        _replace_rows(columns, index, bad)
    return WindowRows(window, columns, padded_fields, index=index, pin=pin)


def _transformed(
    window: Window,
    f: FieldSpec,
    chunk_of: ChunkOf,
    take: Take,
    transform: FieldTransform,
    name: str,
    seed: int,
    epoch: int,
) -> tuple[torch.Tensor, np.ndarray]:
    """A transformed field's window: its gathered rows handed to the transform with a buffer."""
    if f.is_array:
        values: Any = np.empty((window.rows, *(f.shape or ())), np.dtype(f.dtype or "u1").newbyteorder("="))
        gather_rows(window, chunk_of, values)
    else:
        values = gather_variable(window, chunk_of)
    shape, dtype = transform.output(values)
    out = take((window.rows, *shape), dtype)
    bad = transform(values, out.numpy(), indices=window.indices(), seed=seed, epoch=epoch, field=name)
    return out, np.asarray(bad, dtype=np.int64)


def _replace_rows(
    columns: dict[str, torch.Tensor | pa.Array], index: torch.Tensor | None, bad: np.ndarray
) -> None:
    """Fill each skipped row with the next good row of the window (cyclically), in every column, so
    batches keep their size and fields stay aligned. Deterministic: depends only on the window."""
    rows = len(index) if index is not None else len(next(iter(columns.values())))
    good = np.setdiff1d(np.arange(rows), bad)
    if good.size == 0:
        raise InputError(f"every one of the {rows} rows of a window was skipped as unreadable")
    pos = np.searchsorted(good, bad) % good.size
    source = np.arange(rows)
    source[bad] = good[pos]
    for name, col in columns.items():
        if isinstance(col, torch.Tensor):
            col[torch.from_numpy(bad)] = col[torch.from_numpy(good[pos])]
        else:
            columns[name] = col.take(pa.array(source))
    if index is not None:
        index[torch.from_numpy(bad)] = index[torch.from_numpy(good[pos])]
