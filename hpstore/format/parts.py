"""Partitions of a split written independently (by other processes or machines), then committed once.

A split's layout is fixed before any row is written: ``chunk_rows`` and ``chunks_per_shard`` come
from its first batch and each fixed-shape field's codec from its first chunk, exactly as
``StoreWriter`` decides them (``split_geometry``, ``choose_codec``). A **part** is then a run of
whole shards, ``[first_shard * shard_rows, ...)``: ``write_part`` encodes those rows into the very
objects a single-process writer would produce for them (same keys, same bytes), and returns a
``PartResult``, a small plain-data description (object sizes and checksums, Arrow batch ranges,
rows) from which the committing process assembles the manifest.

Why shard-aligned parts and deterministic keys: a shard is one object written by one writer, so two
parts never share an object (xarray region writes that share a chunk lose data); and a part run
twice (a retried task after its worker died) writes the same keys with the same bytes, each in one
atomic write, so a retry needs no cleanup and the store does not depend on which process wrote
what. Nothing here lists the store: the commit takes exactly the results it was given.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from hpstore.checksum import crc32c, crc32c_hex
from hpstore.errors import InputError
from hpstore.format import zarr_shard as zf
from hpstore.format.manifest import ArrowPart, Codec, FieldSpec, ObjectEntry, SplitSpec, shard_key
from hpstore.format.writer import Column, _concat, _to_arrow, encode_arrow_part
from hpstore.storage.base import Storage


@dataclass(frozen=True, kw_only=True)
class FieldPlan:
    """One field as every part writes it: kind, and dtype/shape/codec or the Arrow type."""

    name: str
    kind: Literal["array", "variable"]
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    codec: Codec | None = None
    arrow_type: pa.DataType | None = None


@dataclass(frozen=True, kw_only=True)
class SplitPlan:
    """The fixed layout of one split of a generation; shipped to every part of that split."""

    generation: str
    split: str
    num_samples: int
    chunk_rows: int
    chunks_per_shard: int
    fields: tuple[FieldPlan, ...]
    codec: Codec
    attrs: Mapping[str, dict[str, Any]]
    first_shard: int = 0
    """Appending (``hpstore.format.append``): the shards before this one are committed already and
    kept; parts cover ``first_shard .. num_shards``."""
    source_start: int = 0
    """The split row that the source's first row becomes (the committed rows come before it; those
    from ``first_shard * shard_rows`` on are written again, ahead of the source's)."""

    def __post_init__(self) -> None:
        if self.chunk_rows < 1 or self.chunks_per_shard < 1 or self.num_samples < 0:
            raise InputError(f"split {self.split!r}: invalid layout")
        if not self.first_shard * self.shard_rows <= self.source_start <= self.num_samples:
            raise InputError(f"split {self.split!r}: invalid append position")

    @property
    def shard_rows(self) -> int:
        return self.chunk_rows * self.chunks_per_shard

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_rows)

    @property
    def arrow_compression(self) -> str | None:
        name = self.codec["name"]
        return None if name == "none" else ("zstd" if name == "zstd" else "lz4")

    def path(self, field: str) -> str:
        return f"{self.generation}/{self.split}/{field}"

    def rows_of(self, first_shard: int, num_shards: int) -> tuple[int, int]:
        """The sample range ``[start, stop)`` of shards ``first_shard .. first_shard+num_shards``."""
        start = first_shard * self.shard_rows
        return start, min(self.num_samples, (first_shard + num_shards) * self.shard_rows)


@dataclass(frozen=True, kw_only=True)
class PartResult:
    """What one part wrote, as plain data (it travels back from a worker)."""

    split: str
    first_shard: int
    rows: int
    source_bytes: int
    objects: tuple[tuple[str, int, str], ...]
    """``(key, size, crc32c)`` of every object the part wrote."""
    arrow_parts: tuple[tuple[str, int, str, tuple[tuple[int, int, str], ...]], ...] = ()
    """``(field, shard, key, batches)`` of every Arrow part file."""
    variable_nbytes: tuple[tuple[str, int], ...] = ()
    """Uncompressed Arrow bytes per variable field (the manifest's ``nbytes``)."""


def _check(plan: FieldPlan, col: Column, split: str) -> None:
    where = f"split {split!r}, field {plan.name!r}"
    if plan.kind == "array":
        if not isinstance(col, np.ndarray):
            raise InputError(f"{where}: mixes fixed-shape and variable-length values")
        if tuple(col.shape[1:]) != plan.shape or col.dtype.name != plan.dtype:
            raise InputError(
                f"{where}: {col.dtype.name}{list(col.shape[1:])} rows in a "
                f"{plan.dtype}{list(plan.shape)} field (mixed shapes or dtypes)"
            )
    elif isinstance(col, np.ndarray) or _to_arrow(col).type != plan.arrow_type:
        got = col.dtype if isinstance(col, np.ndarray) else _to_arrow(col).type
        raise InputError(f"{where}: mixed types {plan.arrow_type} and {got}")


class _ShardStream:
    """One array field's shard on its way out: chunks are encoded on the pool and written to the
    object's sink in order as they finish, at most ``window`` of them held, then the index. So a
    part holds a few chunks per field, not a shard (64 MiB): a worker's memory does not grow with
    the shard size, and the object's bytes are those of ``zarr_shard.encode_shard``."""

    def __init__(self, storage: Storage, key: str, window: int) -> None:
        self.key = key
        self.window = max(1, window)
        self.sink = storage.open_sink(key)
        self.pending: deque[Future[bytes]] = deque()
        self.sizes: list[int] = []
        self.crc = 0

    def add(self, chunk: Future[bytes]) -> None:
        self.pending.append(chunk)
        self._drain(self.window)

    def _drain(self, keep: int) -> None:
        while self.pending and (len(self.pending) > keep or self.pending[0].done()):
            data = self.pending.popleft().result()
            self._put(data)
            self.sizes.append(len(data))

    def _put(self, data: bytes) -> None:
        self.sink.write(data)
        self.crc = crc32c(data, self.crc)

    def finish(self, chunks_per_shard: int) -> tuple[str, int, str]:
        """Write the rest and the index, commit; ``(key, size, crc32c)`` of the object."""
        self._drain(0)
        self._put(zf.shard_index(self.sizes, chunks_per_shard))
        self.sink.commit()
        return self.key, self.sink.size, f"{self.crc:08x}"

    def abort(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self.sink.abort()


class _PartWriter:
    """Cuts a part's rows into chunks and writes each completed shard / Arrow part at once."""

    def __init__(
        self, storage: Storage, plan: SplitPlan, first_shard: int, pool: ThreadPoolExecutor, window: int
    ) -> None:
        self.storage = storage
        self.plan = plan
        self.pool = pool
        self.shard = first_shard
        self.buffer: dict[str, list[Column]] = {f.name: [] for f in plan.fields}
        self.buffered = 0
        self.chunks: dict[str, list[Any]] = {f.name: [] for f in plan.fields}
        """Per field, this shard's chunks: Arrow record batches (variable fields); for arrays a
        count only, the encoded chunks going out through ``streams`` as they finish."""
        self.streams: dict[str, _ShardStream] = {}
        self.window = window
        self.objects: list[tuple[str, int, str]] = []
        self.arrow_parts: list[tuple[str, int, str, tuple[tuple[int, int, str], ...]]] = []
        self.variable_nbytes = {f.name: 0 for f in plan.fields if f.kind == "variable"}

    def append(self, batch: Mapping[str, Column]) -> None:
        if set(batch) != set(self.buffer):
            raise InputError(
                f"split {self.plan.split!r}: batch has fields {sorted(batch)}, expected {sorted(self.buffer)}"
            )
        n = len(next(iter(batch.values())))
        for f in self.plan.fields:
            col = batch[f.name]
            if len(col) != n:
                raise InputError(f"split {self.plan.split!r}: fields have different row counts")
            _check(f, col, self.plan.split)
            self.buffer[f.name].append(col)
        self.buffered += n
        while self.buffered >= self.plan.chunk_rows:
            self._emit(self.plan.chunk_rows)

    def _emit(self, rows: int) -> None:
        for f in self.plan.fields:
            whole = _concat(self.buffer[f.name])
            chunk, rest = whole[:rows], whole[rows:]
            self.buffer[f.name] = [rest] if len(rest) else []
            if f.kind == "array":
                assert f.codec is not None
                stream = self.streams.get(f.name)
                if stream is None:
                    key = shard_key(self.plan.path(f.name), self.shard, 1 + len(f.shape))
                    stream = self.streams[f.name] = _ShardStream(self.storage, key, self.window)
                stream.add(self.pool.submit(zf.encode_chunk, chunk, self.plan.chunk_rows, f.codec))
                self.chunks[f.name].append(None)
            else:
                batch = pa.record_batch([_to_arrow(chunk)], names=[f.name])
                self.variable_nbytes[f.name] += batch.nbytes
                self.chunks[f.name].append(batch)
        self.buffered -= rows
        if len(self.chunks[self.plan.fields[0].name]) == self.plan.chunks_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self.chunks[self.plan.fields[0].name]:
            return
        for f in self.plan.fields:
            chunks, self.chunks[f.name] = self.chunks[f.name], []
            if f.kind == "array":
                self.objects.append(self.streams.pop(f.name).finish(self.plan.chunks_per_shard))
                continue
            data, ranges = encode_arrow_part(chunks, self.plan.arrow_compression)
            key = f"{self.plan.path(f.name)}/part-{self.shard:05d}.arrow"
            self.arrow_parts.append((f.name, self.shard, key, ranges))
            self.storage.write(key, data)
            self.objects.append((key, len(data), crc32c_hex(data)))
        self.shard += 1

    def abort(self) -> None:
        """Drop the shards still open: their temp objects go, no key is written."""
        for stream in self.streams.values():
            stream.abort()
        self.streams.clear()

    def finish(self) -> None:
        if self.buffered:
            self._emit(self.buffered)
        self._flush()


def write_part(
    storage: Storage,
    plan: SplitPlan,
    *,
    first_shard: int,
    num_shards: int,
    batches: Iterable[Mapping[str, Column]],
    encode_threads: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> PartResult:
    """Write shards ``first_shard .. first_shard + num_shards`` of a split from ``batches`` (exactly
    the rows of those shards, in order). Idempotent: the same rows give the same keys and bytes.
    ``on_batch(rows, source_bytes)``: called after each batch is taken, with the part's totals so far
    (progress while a part runs)."""
    start, stop = plan.rows_of(first_shard, num_shards)
    if start >= stop:
        raise InputError(f"split {plan.split!r}: shard {first_shard} is past the end of the split")
    rows = nbytes = 0
    with ThreadPoolExecutor(max(1, encode_threads), thread_name_prefix="hpstore-part") as pool:
        w = _PartWriter(storage, plan, first_shard, pool, window=2 * max(1, encode_threads))
        try:
            for batch in batches:
                n = len(next(iter(batch.values())))
                if rows + n > stop - start:
                    raise InputError(f"split {plan.split!r}: the source has more rows than it said ({stop})")
                w.append(batch)
                rows += n
                nbytes += sum(int(c.nbytes) for c in batch.values())
                if on_batch is not None:
                    on_batch(n, nbytes)
            if rows != stop - start:
                raise InputError(
                    f"split {plan.split!r}: rows {start}..{stop} of the source gave {rows} rows "
                    "(the source changed or is truncated)"
                )
            w.finish()
        except BaseException:
            w.abort()
            raise
    return PartResult(
        split=plan.split,
        first_shard=first_shard,
        rows=rows,
        source_bytes=nbytes,
        objects=tuple(w.objects),
        arrow_parts=tuple(w.arrow_parts),
        variable_nbytes=tuple(w.variable_nbytes.items()),
    )


def assemble_split(
    storage: Storage, plan: SplitPlan, results: Iterable[PartResult]
) -> tuple[SplitSpec, dict[str, ObjectEntry]]:
    """The split's manifest entry from its parts' results, plus its metadata objects (written here).

    Refuses results that do not cover every shard exactly once: a commit must never list a hole.
    When appending, the entry covers shards ``plan.first_shard ..`` (``StoreWriter`` joins it to
    the committed ones).
    """
    ordered = sorted(results, key=lambda r: r.first_shard)
    objects: dict[str, ObjectEntry] = {}
    parts: dict[str, dict[int, ArrowPart]] = {f.name: {} for f in plan.fields if f.kind == "variable"}
    nbytes = {f.name: 0 for f in plan.fields if f.kind == "variable"}
    rows = plan.first_shard * plan.shard_rows
    for r in ordered:
        if r.split != plan.split or r.first_shard * plan.shard_rows != rows:
            raise InputError(
                f"split {plan.split!r}: parts do not cover the split (gap or overlap at row {rows})"
            )
        rows += r.rows
        objects.update({k: ObjectEntry(size=s, crc32c=c) for k, s, c in r.objects})
        for field, shard, key, batches in r.arrow_parts:
            parts[field][shard] = ArrowPart(key=key, batches=batches)
        for field, n in r.variable_nbytes:
            nbytes[field] += n
    if rows != plan.num_samples:
        raise InputError(f"split {plan.split!r}: parts hold {rows} rows, expected {plan.num_samples}")
    specs: dict[str, FieldSpec] = {}
    for f in plan.fields:
        path = plan.path(f.name)
        attrs = dict(plan.attrs.get(f.name, {}))
        if f.kind == "array":
            assert f.dtype is not None and f.codec is not None
            meta = zf.array_metadata(
                num_samples=plan.num_samples,
                sample_shape=f.shape,
                dtype=f.dtype,
                chunk_rows=plan.chunk_rows,
                chunks_per_shard=plan.chunks_per_shard,
                codec=f.codec,
            )
            objects[f"{path}/zarr.json"] = _put(storage, f"{path}/zarr.json", meta)
            specs[f.name] = FieldSpec(
                name=f.name,
                kind="array",
                path=path,
                dtype=f.dtype,
                shape=f.shape,
                codec=f.codec,
                attrs=attrs,
                nbytes=plan.num_samples * np.dtype(f.dtype).itemsize * math.prod(f.shape),
            )
        else:
            import base64

            specs[f.name] = FieldSpec(
                name=f.name,
                kind="variable",
                path=path,
                arrow_type=str(f.arrow_type),
                arrow_schema=base64.b64encode(
                    pa.schema([(f.name, f.arrow_type)]).serialize().to_pybytes()
                ).decode(),
                codec={"name": plan.arrow_compression or "none"},
                parts=tuple(parts[f.name][s] for s in sorted(parts[f.name])),
                attrs=attrs,
                nbytes=nbytes[f.name],
            )
    group = f"{plan.generation}/{plan.split}/zarr.json"
    objects[group] = _put(storage, group, zf.group_metadata())
    spec = SplitSpec(
        name=plan.split,
        num_samples=plan.num_samples,
        chunk_rows=plan.chunk_rows,
        chunks_per_shard=plan.chunks_per_shard,
        fields=specs,
    )
    return spec, objects


def _put(storage: Storage, key: str, data: bytes) -> ObjectEntry:
    storage.write(key, data)
    return ObjectEntry(size=len(data), crc32c=crc32c_hex(data))
