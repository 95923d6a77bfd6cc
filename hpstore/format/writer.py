"""StoreWriter: streams batches of rows into a new store generation and commits it atomically.

Flow (bounded memory, overlapped stages)::

    source batches -> row buffer (one chunk) -> encode pool (per chunk, per field)
                                             -> write pool (one job per shard / Arrow part)
                                             -> manifest.json last

Each shard (or Arrow part) is written by exactly one job, because parallel writers into one zarr
shard would overwrite each other. The number of chunks in flight is capped, so memory stays at a few
chunks per worker plus the encoded shards being assembled, whatever the dataset size.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import math
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa

from hpstore.checksum import crc32c_hex
from hpstore.errors import InputError, StoreNotFoundError
from hpstore.format import append as appending
from hpstore.format import zarr_shard as zf
from hpstore.format.commit import (
    STORE_GENERATIONS,
    WriterLock,
    check_destination,
    collect_garbage,
)
from hpstore.format.manifest import (
    ArrowPart,
    Codec,
    FieldSpec,
    Manifest,
    ObjectEntry,
    SplitSpec,
    commit_manifest,
    parse_manifest,
    read_manifest,
    referenced_keys,
    shard_key,
)
from hpstore.storage.base import Storage

Column: TypeAlias = Any
"""A column of rows: ``np.ndarray`` (fixed-shape field) or ``pa.Array`` / ``pa.ChunkedArray``."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How a split is cut: target bytes per chunk and per shard, the codec, the parallelism."""

    chunk_bytes: int = 1 << 20
    shard_bytes: int = 64 << 20
    codec: Codec = field(default_factory=lambda: {"name": "zstd", "level": 1})
    workers: int = 2
    writers: int = 2
    min_ratio: float = 1.1
    """A fixed-shape field whose first chunk compresses less than this is stored raw (codec none):
    decoding barely-compressible data (photos, noise) costs CPU on every read and saves no space."""

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1024:
            raise InputError(f"chunk size {self.chunk_bytes} bytes is too small (at least 1 KiB)")
        if self.shard_bytes < self.chunk_bytes:
            raise InputError("shard size must be at least the chunk size")
        if self.workers < 1 or self.writers < 1:
            raise InputError("workers and writers must be at least 1")
        zf.validate_codec(self.codec)


def _row_bytes(col: Column) -> float:
    if isinstance(col, np.ndarray):
        return max(1.0, col.dtype.itemsize * math.prod(col.shape[1:]))
    n = len(col)
    return max(1.0, col.nbytes / max(n, 1))


def _to_arrow(col: Column) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks()
    return col


def _slice(col: Column, start: int, stop: int) -> Column:
    return col[start:stop]


def _concat(parts: list[Column]) -> Column:
    if isinstance(parts[0], np.ndarray):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return pa.concat_arrays([_to_arrow(p) for p in parts])


def split_geometry(
    first: Mapping[str, Column], layout: Layout, expected_rows: int | None = None
) -> tuple[int, int]:
    """``(chunk_rows, chunks_per_shard)`` of a split, from its first batch (and its row count, when
    the source knows it): every engine that writes a split (one process, or partitions on many
    machines) cuts it the same way."""
    n = len(next(iter(first.values())))
    row_bytes = sum(_row_bytes(c) for c in first.values()) if n else 1.0
    chunk_rows = max(1, int(layout.chunk_bytes // row_bytes))
    chunks_per_shard = max(1, layout.shard_bytes // max(1, int(chunk_rows * row_bytes)))
    if expected_rows:
        # A shard's index has a slot per chunk it could hold (16 bytes each): a split smaller
        # than one shard gets an index for the chunks it has, not for 64 MiB of them.
        chunks_per_shard = min(chunks_per_shard, math.ceil(expected_rows / chunk_rows))
    return chunk_rows, chunks_per_shard


def choose_codec(first: np.ndarray, chunk_rows: int, codec: Codec, min_ratio: float) -> Codec:
    """The split's codec for a fixed-shape field, unless its first chunk shows it does not pay."""
    if codec["name"] == "none" or min_ratio <= 1:
        return codec
    encoded = len(zf.encode_chunk(first, chunk_rows, codec))
    return codec if first.nbytes >= min_ratio * encoded else {"name": "none"}


def encode_arrow_part(
    batches: list[pa.RecordBatch], compression: str | None
) -> tuple[bytes, tuple[tuple[int, int, str], ...]]:
    """One Arrow IPC file of record batches (one per chunk) and each batch's (offset, length, crc).

    Each batch is compacted first: the IPC writer pads a sliced variable-length buffer to 8 bytes
    with whatever bytes follow the slice in memory, so without it the file's bytes would depend on
    how the rows happened to be batched (one process vs partitions), not only on the rows."""
    batches = [pa.record_batch([pa.concat_arrays([c]) for c in b.columns], schema=b.schema) for b in batches]
    sink = pa.BufferOutputStream()
    ranges = []
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, batches[0].schema, options=opts) as w:
        for b in batches:
            start = sink.tell()
            w.write_batch(b)
            ranges.append((start, sink.tell() - start))
    # The file writer emits the magic and the schema lazily with the first batch; the first
    # range must start at the record batch message itself.
    skip = 8 + batches[0].schema.serialize().size
    ranges[0] = (ranges[0][0] + skip, ranges[0][1] - skip)
    data = sink.getvalue().to_pybytes()
    return data, tuple((o, n, crc32c_hex(memoryview(data)[o : o + n])) for o, n in ranges)


class _FieldWriter:
    """Encodes chunks of one field and writes them, one job per shard or Arrow part.

    ``base``: the field as committed, when appending to it (its dtype, shape, type and codec)."""

    def __init__(self, sw: SplitWriter, name: str, first: Column, base: FieldSpec | None = None) -> None:
        self.sw = sw
        self.name = name
        self.path = f"{sw.prefix}/{name}"
        self.is_array = isinstance(first, np.ndarray) if base is None else base.is_array
        self.sample_shape: tuple[int, ...] = ()
        self.arrow_type: pa.DataType | None = None
        if base is not None:
            self.dtype = base.dtype or ""
            self.sample_shape = tuple(base.shape or ())
            self.arrow_type = None if base.is_array else appending.arrow_type(base)
        elif self.is_array:
            assert isinstance(first, np.ndarray)
            self.dtype = zf.check_dtype(first.dtype, f"field {name!r}")
            self.sample_shape = tuple(int(d) for d in first.shape[1:])
        else:
            self.arrow_type = _to_arrow(first).type
        self.raw_nbytes = 0  # uncompressed bytes seen, recorded in the manifest for ratios
        self.pending: list[Future[Any]] = []  # chunks of the shard being assembled
        self.codec: Codec | None = None  # chosen at the first chunk (see _choose_codec)
        if base is not None and base.is_array:
            self.codec = base.codec
        self.shard_jobs: list[Future[Any]] = []

    def check(self, col: Column) -> None:
        if self.is_array:
            if not isinstance(col, np.ndarray):
                raise InputError(f"field {self.name!r}: mixes fixed-shape and variable-length values")
            if tuple(col.shape[1:]) != self.sample_shape:
                raise InputError(
                    f"field {self.name!r}: mixed shapes {list(self.sample_shape)} and {list(col.shape[1:])} "
                    "in a fixed-shape field"
                )
            if col.dtype.name != self.dtype:
                raise InputError(f"field {self.name!r}: mixed dtypes {self.dtype} and {col.dtype.name}")
        elif isinstance(col, np.ndarray) or _to_arrow(col).type != self.arrow_type:
            got = col.dtype if isinstance(col, np.ndarray) else _to_arrow(col).type
            raise InputError(f"field {self.name!r}: mixed types {self.arrow_type} and {got}")

    def add_chunk(self, rows: Column) -> None:
        sw = self.sw
        if self.is_array:
            if self.codec is None:
                self.codec = self._choose_codec(rows)
            self.pending.append(sw.writer.submit_encode(rows, sw.chunk_rows, self.codec))
        else:
            done: Future[Any] = Future()
            batch = pa.record_batch([_to_arrow(rows)], names=[self.name])
            self.raw_nbytes += batch.nbytes
            done.set_result(batch)
            self.pending.append(done)
        if len(self.pending) == sw.chunks_per_shard:
            self.flush_shard()

    def _choose_codec(self, first: np.ndarray) -> Codec:
        return choose_codec(first, self.sw.chunk_rows, self.sw.codec, self.sw.writer.layout.min_ratio)

    def flush_shard(self) -> None:
        if not self.pending:
            return
        shard = self.sw.first_shard + len(self.shard_jobs)
        chunks, self.pending = self.pending, []
        job = self._write_shard if self.is_array else self._write_part
        self.shard_jobs.append(self.sw.writer.submit_write(job, shard, chunks))

    def _write_shard(self, shard: int, chunks: list[Future[Any]]) -> tuple[tuple[str, ObjectEntry], None]:
        data = zf.encode_shard([f.result() for f in chunks], self.sw.chunks_per_shard)
        key = shard_key(self.path, shard, 1 + len(self.sample_shape))
        return self.sw.writer.put(key, data), None

    def _write_part(self, shard: int, chunks: list[Future[Any]]) -> tuple[tuple[str, ObjectEntry], ArrowPart]:
        data, with_crc = encode_arrow_part([f.result() for f in chunks], self.sw.arrow_compression)
        key = f"{self.path}/part-{shard:05d}.arrow"
        entry = self.sw.writer.put(key, data)
        return (entry[0], entry[1]), ArrowPart(key=key, batches=with_crc)

    def finish(self, num_samples: int) -> tuple[FieldSpec, dict[str, ObjectEntry]]:
        self.flush_shard()
        objects: dict[str, ObjectEntry] = {}
        parts = []
        for job in self.shard_jobs:
            (key, entry), part = job.result()
            objects[key] = entry
            if part is not None:
                parts.append(part)
        if self.is_array:
            meta = zf.array_metadata(
                num_samples=num_samples,
                sample_shape=self.sample_shape,
                dtype=self.dtype,
                chunk_rows=self.sw.chunk_rows,
                chunks_per_shard=self.sw.chunks_per_shard,
                codec=self.codec or self.sw.codec,
            )
            key, entry = self.sw.writer.put(f"{self.path}/zarr.json", meta)
            objects[key] = entry
            spec = FieldSpec(
                name=self.name,
                kind="array",
                path=self.path,
                dtype=self.dtype,
                shape=self.sample_shape,
                codec=self.codec or self.sw.codec,
                attrs=self.sw.attrs.get(self.name, {}),
                nbytes=num_samples * np.dtype(self.dtype).itemsize * math.prod(self.sample_shape),
            )
        else:
            spec = FieldSpec(
                name=self.name,
                kind="variable",
                path=self.path,
                arrow_type=str(self.arrow_type),
                arrow_schema=base64.b64encode(
                    pa.schema([(self.name, self.arrow_type)]).serialize().to_pybytes()
                ).decode(),
                codec={"name": self.sw.arrow_compression or "none"},
                parts=tuple(parts),
                attrs=self.sw.attrs.get(self.name, {}),
                nbytes=self.raw_nbytes,
            )
        return spec, objects


class SplitWriter:
    """Accepts batches of rows (dict field -> column) for one split; every batch has every field."""

    def __init__(
        self,
        writer: StoreWriter,
        name: str,
        attrs: Mapping[str, dict[str, Any]] | None = None,
        num_rows: int | None = None,
        base: SplitSpec | None = None,
    ) -> None:
        self.writer = writer
        self.name = name
        self.expected_rows = num_rows
        self.prefix = f"{writer.generation}/{name}"
        self.codec = writer.layout.codec
        self.base = base
        """The committed split this one appends to: its geometry and types are kept, and shards
        start at ``first_shard`` (``hpstore.format.append``)."""
        self.first_shard = 0 if base is None else appending.first_shard(base)
        codec_name = self.codec["name"]
        if base is not None:
            codec_name = next((f.codec["name"] for f in base.fields.values() if not f.is_array), codec_name)
        self.arrow_compression = None if codec_name == "none" else ("zstd" if codec_name == "zstd" else "lz4")
        self.encode_pool = writer.encode_pool
        self.attrs = dict(attrs or {})
        self.fields: dict[str, _FieldWriter] = {}
        self.buffer: dict[str, list[Column]] = {}
        self.buffered = 0
        self.num_samples = 0
        self.chunk_rows = 0
        self.chunks_per_shard = 0
        self.source_rows = 0
        if base is not None:
            self.chunk_rows, self.chunks_per_shard = base.chunk_rows, base.chunks_per_shard
            self.num_samples = self.first_shard * base.shard_rows
            for fname, f in base.fields.items():
                self.fields[fname] = _FieldWriter(self, fname, None, base=f)
                self.buffer[fname] = []

    def _start(self, batch: Mapping[str, Column]) -> None:
        if not batch:
            raise InputError(f"split {self.name!r}: no fields")
        self.chunk_rows, self.chunks_per_shard = split_geometry(batch, self.writer.layout, self.expected_rows)
        for name, col in batch.items():
            self.fields[name] = _FieldWriter(self, name, col)
            self.buffer[name] = []

    def append(self, batch: Mapping[str, Column]) -> None:
        if self.base is not None:
            appending.check_schema(self.base, batch, self.writer.storage.url)
        self._take(batch)
        self.source_rows += len(next(iter(batch.values())))

    def _take(self, batch: Mapping[str, Column]) -> None:
        if not self.fields:
            self._start(batch)
        if set(batch) != set(self.fields):
            raise InputError(
                f"split {self.name!r}: batch has fields {sorted(batch)}, expected {sorted(self.fields)}"
            )
        lengths = {name: len(col) for name, col in batch.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"split {self.name!r}: fields have different row counts {lengths}")
        n = next(iter(lengths.values()))
        for name, col in batch.items():
            self.fields[name].check(col)
            self.buffer[name].append(col)
        self.buffered += n
        self.num_samples += n
        while self.buffered >= self.chunk_rows:
            self._emit(self.chunk_rows)

    def _emit(self, rows: int) -> None:
        for name, parts in self.buffer.items():
            whole = _concat(parts)
            self.fields[name].add_chunk(_slice(whole, 0, rows))
            rest = _slice(whole, rows, len(whole))
            self.buffer[name] = [rest] if len(rest) else []
        self.buffered -= rows

    def finish(self) -> tuple[SplitSpec, dict[str, ObjectEntry]]:
        if not self.fields or not self.source_rows:
            raise InputError(f"split {self.name!r}: no samples")
        if self.buffered:
            self._emit(self.buffered)
        objects: dict[str, ObjectEntry] = {}
        specs = {}
        for name, fw in self.fields.items():
            spec, objs = fw.finish(self.num_samples)
            specs[name] = spec
            objects.update(objs)
        key, entry = self.writer.put(f"{self.prefix}/zarr.json", zf.group_metadata())
        objects[key] = entry
        split = SplitSpec(
            name=self.name,
            num_samples=self.num_samples,
            chunk_rows=self.chunk_rows,
            chunks_per_shard=self.chunks_per_shard,
            fields=specs,
        )
        return split, objects


class StoreWriter:
    """Writes one new generation of a store; ``commit()`` makes it the store's content.

    Use as a context manager: leaving the block with an exception abandons the generation (its
    objects are removed, best effort) and never touches the committed manifest.

    The commit protocol is ``hpstore.format.commit``'s: the destination must be new, empty, or a
    store of ours (``overwrite`` to replace it; a foreign ``manifest.json`` is never replaced), the
    writer holds the store's writer lock from here to ``close`` (a second writer fails at once;
    ``break_lock`` removes the lock a killed writer left), and after the commit only generations
    of our exact naming that the committed manifest does not reference are deleted.

    ``append``: the destination must hold a store; the commit keeps its splits and objects, adds
    new splits, and extends the ones written again (``split(name)`` of an existing split continues
    it: ``hpstore.format.append``). The generations of the store appended to are all kept.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        layout: Layout | None = None,
        overwrite: bool = False,
        append: bool = False,
        source: dict[str, Any] | None = None,
        break_lock: bool = False,
        tool: str = "hpstore.StoreWriter",
    ) -> None:
        if overwrite and append:
            raise InputError("--overwrite and --append exclude each other")
        self.storage = storage
        self.layout = layout or Layout()
        # Checked before the lock too, so that nothing (not even a lock) is written into a
        # destination that is not ours; checked again under the lock, where it is decisive.
        _check(storage, overwrite=overwrite, append=append)
        self.lock = WriterLock.acquire(storage, tool=tool, break_lock=break_lock)
        try:
            # Read under the lock: no other writer can commit between this read and our commit.
            base = _check(storage, overwrite=overwrite, append=append)
        except BaseException:
            self.lock.release()
            raise
        self.generation = STORE_GENERATIONS.new()
        self.source = dict(source or {})
        self.encode_pool = ThreadPoolExecutor(self.layout.workers, thread_name_prefix="hpstore-encode")
        self.write_pool = ThreadPoolExecutor(self.layout.writers, thread_name_prefix="hpstore-write")
        # Caps chunks held in memory: encoded-but-unwritten shards plus chunks being encoded.
        self._inflight = threading.BoundedSemaphore(self.layout.writers + 1)
        self._encoding = threading.BoundedSemaphore(2 * self.layout.workers)
        self.splits: dict[str, SplitSpec] = {}
        self.objects: dict[str, ObjectEntry] = {}
        self.base = base
        self.bytes_in = 0
        self._committed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(abandon=exc_type is not None or not self._committed)

    def put(self, key: str, data: bytes) -> tuple[str, ObjectEntry]:
        self.storage.write(key, data)
        return key, ObjectEntry(size=len(data), crc32c=crc32c_hex(data))

    def submit_encode(self, rows: np.ndarray, chunk_rows: int, codec: Codec) -> Future[bytes]:
        """Encode one chunk on the pool; blocks while ``2 * workers`` raw chunks are in flight."""
        self._encoding.acquire()
        fut = self.encode_pool.submit(zf.encode_chunk, rows, chunk_rows, codec)
        fut.add_done_callback(lambda _: self._encoding.release())
        return fut

    def submit_write(self, job: Any, *args: Any) -> Future[Any]:
        """Run a shard/part write job; blocks while too many are in flight (bounded memory)."""
        self._inflight.acquire()

        def run() -> Any:
            try:
                return job(*args)
            finally:
                self._inflight.release()

        return self.write_pool.submit(run)

    def split(
        self, name: str, attrs: Mapping[str, dict[str, Any]] | None = None, *, num_rows: int | None = None
    ) -> SplitWriter:
        """A writer for split ``name``. ``num_rows``, when the source knows it, caps the chunks per
        shard at the split's chunk count (a hint: more rows than that only make more shards)."""
        if name in self.splits:
            raise InputError(f"split {name!r} given twice")
        base = self.base_split(name)
        sw = SplitWriter(self, name, attrs, num_rows, base=base)
        if base is not None and self.base is not None:
            rows = appending.tail_rows(self.storage, self.base, base)
            if rows is not None:
                sw._take(rows)
        return sw

    def base_split(self, name: str) -> SplitSpec | None:
        """The committed split ``name`` this writer appends to, if any."""
        return None if self.base is None else self.base.splits.get(name)

    def add_split(self, sw: SplitWriter) -> SplitSpec:
        spec, objects = sw.finish()
        self.add_written_split(spec, objects)
        return self.splits[spec.name]

    def add_written_split(self, spec: SplitSpec, objects: Mapping[str, ObjectEntry]) -> None:
        """Record a split whose objects other processes wrote under this generation (partitions
        written in parallel, ``hpstore.format.parts``); ``commit`` then lists them. When appending
        to a committed split, ``spec`` holds its shards from ``append.first_shard`` on."""
        if spec.name in self.splits:
            raise InputError(f"split {spec.name!r} given twice")
        base = self.base_split(spec.name)
        if base is not None and self.base is not None:
            spec, objects = appending.extend_split(base, self.base.objects, spec, objects)
        self.splits[spec.name] = spec
        self.objects.update(objects)

    def commit(self) -> Manifest:
        if not self.splits:
            raise InputError("nothing to commit: no splits were written")
        splits, source = dict(self.splits), self.source
        if self.base is not None:
            splits = {**self.base.splits, **self.splits}
            source = {**self.base.source, "appends": [*self.base.source.get("appends", []), self.source]}
            for name in self.base.splits.keys() - self.splits.keys():
                # Splits carried over unchanged: their group metadata in this generation too, so
                # that the generation's Zarr group lists every split.
                key, entry = self.put(f"{self.generation}/{name}/zarr.json", zf.group_metadata())
                self.objects[key] = entry
        key, entry = self.put(f"{self.generation}/zarr.json", zf.group_metadata({"hpstore": "data root"}))
        self.objects[key] = entry
        manifest = Manifest(
            generation=self.generation,
            splits=splits,
            objects=self.objects,
            source=source,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        if self.base is not None:
            # Exactly the objects the splits reference: the carried splits' from the base
            # manifest (sizes and checksums as recorded), everything else as just written.
            objects = {k: self.objects.get(k) or self.base.objects[k] for k in referenced_keys(manifest)}
            manifest = dataclasses.replace(manifest, objects=objects)
        commit_manifest(self.storage, manifest)
        self._committed = True
        # Earlier stores and killed writes: re-read what is committed now, and keep whatever it
        # references; after an append, also what the store appended to referenced (readers that
        # opened it before this commit keep reading it).
        keep = {self.generation} | read_manifest(self.storage).generations
        if self.base is not None:
            keep |= self.base.generations
        collect_garbage(self.storage, STORE_GENERATIONS, keep=keep)
        return manifest

    def close(self, *, abandon: bool) -> None:
        try:
            self.encode_pool.shutdown(wait=True, cancel_futures=True)
            self.write_pool.shutdown(wait=True, cancel_futures=True)
            if abandon and not self._committed:
                try:
                    self.storage.delete_prefix(self.generation)
                except Exception:  # best effort: an uncommitted generation is invisible anyway
                    pass
        finally:
            self.lock.release()


def _check(storage: Storage, *, overwrite: bool, append: bool) -> Manifest | None:
    """The destination check of the commit protocol; with ``append``, the store appended to."""
    if not append:
        check_destination(storage, STORE_GENERATIONS, parse_manifest, overwrite=overwrite)
        return None
    # A foreign or unreadable manifest is refused as for an overwrite; then there must be one.
    check_destination(storage, STORE_GENERATIONS, parse_manifest, overwrite=True)
    try:
        return read_manifest(storage)
    except StoreNotFoundError:
        raise InputError(f"{storage.url}: --append needs an existing store (there is none here)") from None
