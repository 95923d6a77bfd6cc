"""Cutting a source into partitions that engines write independently, and reading one partition.

Two halves:

- ``plan_split`` (client side) fixes a split's layout from its first batch and first chunk, the
  same decisions ``StoreWriter`` takes (``split_geometry``, ``choose_codec``), and
  ``plan_partitions`` cuts the split's rows into runs of whole shards. Partition boundaries are
  shard boundaries, so the store is the one a single process writes (same objects, same bytes)
  whatever the number of partitions or workers; a partition records which source pieces (files,
  Parquet row groups, rows of an array file) it reads.
- ``read_rows`` (worker side) streams rows ``[start, stop)`` of a source in bounded batches, reading
  only the pieces that overlap: a seek into an ``.npy`` / IDX / zip member, the overlapping Parquet
  row groups, the overlapping Arrow record batches.

Only sources whose row counts are known up front can be cut (npy, npz, IDX, Parquet, Arrow IPC
files); CSV / JSON Lines / IPC streams are refused for partitioned ingest with a one-line error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpstore.errors import InputError
from hpstore.format.append import arrow_type, check_schema, first_shard
from hpstore.format.manifest import SplitSpec
from hpstore.format.parts import FieldPlan, SplitPlan
from hpstore.format.writer import Layout, _concat, _to_arrow, choose_codec, split_geometry
from hpstore.format.zarr_shard import check_dtype
from tools.sources.arrays import DECODE_ERRORS, ArraySource, ArrayStream, _column, describe
from tools.sources.base import Batch, Source, batch_rows, read_exact
from tools.sources.tabular import TableSource, _guard

PARQUET_BATCH_ROWS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Partition:
    """Shards ``first_shard .. first_shard + num_shards`` of one split: rows ``[start, stop)``."""

    split: str
    index: int
    first_shard: int
    num_shards: int
    start: int
    stop: int
    pieces: tuple[str, ...] = ()
    """The source pieces it reads, for messages and progress (``file#rowgroup``, ``file[a:b]``)."""

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_partitions(plan: SplitPlan, *, shards_per_partition: int = 1) -> list[Partition]:
    """The split's shards in runs of ``shards_per_partition``, in source order (a pure function)."""
    if shards_per_partition < 1:
        raise InputError("shards per partition must be at least 1")
    out = []
    for i, first in enumerate(range(plan.first_shard, plan.num_shards, shards_per_partition)):
        n = min(shards_per_partition, plan.num_shards - first)
        start, stop = plan.rows_of(first, n)
        out.append(
            Partition(split=plan.split, index=i, first_shard=first, num_shards=n, start=start, stop=stop)
        )
    return out


def check_partitionable(source: Source, split: str) -> int:
    """The source's row count; refuses sources whose rows are only known by reading them all."""
    if not isinstance(source, ArraySource | TableSource) or source.num_rows is None:
        raise InputError(
            f"{source.path}: split {split!r}: partitioned ingest needs a source whose row count is known "
            "up front (npy, npz, IDX, Parquet, Arrow IPC files); use --engine local for this one"
        )
    return source.num_rows


def plan_split(
    source: Source, *, split: str, generation: str, layout: Layout, base: SplitSpec | None = None
) -> SplitPlan:
    """Fix a split's layout as ``StoreWriter`` would: geometry from the first batch the source
    yields, each fixed-shape field's codec from the split's first chunk. ``base``: the committed
    split the source's rows are appended to, whose layout and types are kept."""
    num_rows = check_partitionable(source, split)
    it = source.batches()
    try:
        first = next(it, None)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    if first is None or num_rows == 0:
        raise InputError(f"split {split!r}: no samples")
    if base is not None:
        return _append_plan(source, first, split=split, generation=generation, layout=layout, base=base)
    chunk_rows, chunks_per_shard = split_geometry(first, layout, num_rows)
    head = [b for b in read_rows(source, 0, min(chunk_rows, num_rows))]
    fields = []
    for name, col in first.items():
        if isinstance(col, np.ndarray):
            first_chunk = _concat([b[name] for b in head])
            fields.append(
                FieldPlan(
                    name=name,
                    kind="array",
                    dtype=check_dtype(col.dtype, f"field {name!r}"),
                    shape=tuple(int(d) for d in col.shape[1:]),
                    codec=choose_codec(first_chunk, chunk_rows, layout.codec, layout.min_ratio),
                )
            )
        else:
            fields.append(FieldPlan(name=name, kind="variable", arrow_type=_to_arrow(col).type))
    return SplitPlan(
        generation=generation,
        split=split,
        num_samples=num_rows,
        chunk_rows=chunk_rows,
        chunks_per_shard=chunks_per_shard,
        fields=tuple(fields),
        codec=layout.codec,
        attrs=dict(source.attrs),
    )


def _append_plan(
    source: Source, first: Batch, *, split: str, generation: str, layout: Layout, base: SplitSpec
) -> SplitPlan:
    check_schema(base, first, source.path)
    fields = tuple(
        FieldPlan(name=f.name, kind="array", dtype=f.dtype, shape=tuple(f.shape or ()), codec=f.codec)
        if f.is_array
        else FieldPlan(name=f.name, kind="variable", arrow_type=arrow_type(f))
        for f in base.fields.values()
    )
    variable = [f.codec for f in base.fields.values() if not f.is_array]
    return SplitPlan(
        generation=generation,
        split=split,
        num_samples=base.num_samples + (source.num_rows or 0),
        chunk_rows=base.chunk_rows,
        chunks_per_shard=base.chunks_per_shard,
        fields=fields,
        codec=variable[0] if variable else layout.codec,
        attrs={name: f.attrs for name, f in base.fields.items()},
        first_shard=first_shard(base),
        source_start=base.num_samples,
    )


def describe_pieces(source: Source, start: int, stop: int) -> tuple[str, ...]:
    """The source pieces rows ``[start, stop)`` come from, in order."""
    if isinstance(source, TableSource):
        out, base = [], 0
        for f in source.files:
            n = f.num_rows or 0
            if base < stop and base + n > start:
                out.append(
                    f"{os.path.basename(f.path)}[{max(start, base) - base}:{min(stop, base + n) - base}]"
                )
            base += n
        return tuple(out)
    return (f"{os.path.basename(source.path)}[{start}:{stop}]",)


# -- reading one partition ---------------------------------------------------------------------------


def read_rows(source: Source, start: int, stop: int) -> Iterator[Batch]:
    """Rows ``[start, stop)`` of ``source`` in bounded batches, reading only the overlapping pieces."""
    if isinstance(source, ArraySource):
        return _array_rows(source, start, stop)
    if isinstance(source, TableSource):
        return _table_rows(source, start, stop)
    check_partitionable(source, "?")
    raise AssertionError("unreachable")


def _array_rows(source: ArraySource, start: int, stop: int) -> Iterator[Batch]:
    step = batch_rows(sum(a.row_bytes for a in source.arrays))
    readers = [_ArrayRows(a, start) for a in source.arrays]
    try:
        for pos in range(start, stop, step):
            n = min(step, stop - pos)
            yield {a.field: r.read(n) for a, r in zip(source.arrays, readers, strict=True)}
    finally:
        for r in readers:
            r.close()


class _ArrayRows:
    """Rows of one array stream from row ``start`` on: a seek, then ``readinto`` fresh buffers."""

    def __init__(self, arr: ArrayStream, start: int) -> None:
        self.arr = arr
        self.whole: np.ndarray | None = None
        self.stream: Any = None
        self.pos = start
        try:
            if arr.fortran and arr.mmap_path is not None:
                self.whole = np.load(arr.mmap_path, mmap_mode="r")
            elif arr.fortran:
                with arr.open() as f:
                    self.whole = np.frombuffer(f.read(), dtype=arr.dtype).reshape(arr.shape, order="F")
            else:
                self.stream = arr.open()
                # Rows are contiguous after the header: skip to ``start`` (a real seek for plain
                # files; gzip and zip members decompress up to it, still without keeping it).
                self.stream.seek(start * arr.dtype.itemsize * math.prod(arr.shape[1:]), os.SEEK_CUR)
        except DECODE_ERRORS as exc:
            raise InputError(f"{arr.where}: {describe(exc)}") from None

    def read(self, n: int) -> Any:
        arr = self.arr
        if self.whole is not None:
            out = np.ascontiguousarray(self.whole[self.pos : self.pos + n])
        else:
            out = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
            try:
                read_exact(self.stream, out, arr.where)
            except InputError:
                raise
            except DECODE_ERRORS as exc:
                raise InputError(f"{arr.where}: {describe(exc)}") from None
        self.pos += n
        return _column(out if arr.cast is None else out.astype(arr.cast), arr)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _table_rows(source: TableSource, start: int, stop: int) -> Iterator[Batch]:
    base = 0
    for f in source.files:
        n = f.num_rows
        assert n is not None  # check_partitionable
        lo, hi = max(start, base), min(stop, base + n)
        if lo < hi:
            for b in _guard(f.path, _file_rows(f, source.format == "parquet", lo - base, hi - base)):
                yield source._convert(b)
        base += n
        if base >= stop:
            return


def _file_rows(f: Any, parquet: bool, start: int, stop: int) -> Iterator[pa.RecordBatch]:
    """Record batches covering rows ``[start, stop)`` of one file, sliced to exactly those rows."""
    batches: Iterator[pa.RecordBatch]
    pos = 0
    if parquet:
        pf = pq.ParquetFile(f.input())
        md = pf.metadata
        groups: list[int] = []
        base = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if base < stop and base + n > start:
                pos = pos if groups else base
                groups.append(g)
            base += n
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups)
    else:
        batches = f.read(None)  # Arrow IPC file: record batches in order, counted as they come
    for b in batches:
        lo, hi = max(start, pos), min(stop, pos + b.num_rows)
        if lo < hi:
            yield b.slice(lo - pos, hi - lo)
        pos += b.num_rows
        if pos >= stop:
            return
