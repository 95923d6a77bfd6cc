"""ChunkReader: (field, chunk id) -> byte range -> verified, decoded chunk.

The unit of I/O for everything above (datasets, loader, caches) is one chunk of one field: a zarr
inner chunk (``chunk_rows`` samples of a fixed-shape field) or one Arrow record batch (the same
sample range of a variable-length field). ``read`` fetches many chunks with one ``read_ranges``
call, so remote backends keep all of them in flight at once; ranges of neighbouring chunks in the
same object are coalesced into one request.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from hpstore.checksum import crc32c_hex
from hpstore.errors import CorruptObjectError, InputError
from hpstore.format import zarr_shard as zf
from hpstore.format.manifest import FieldSpec, Manifest, SplitSpec, shard_key
from hpstore.storage.base import Range, Storage

Chunk = Any
"""A decoded chunk: ``np.ndarray`` (fixed-shape field) or ``pa.Array`` (variable-length field)."""

COALESCE_GAP = 64 << 10
"""Neighbouring ranges closer than this are fetched as one request."""


class ChunkReader:
    """Reads chunks of one split. Thread-safe; shard indices are fetched once and kept."""

    def __init__(self, storage: Storage, manifest: Manifest, split: SplitSpec) -> None:
        self.storage = storage
        self.manifest = manifest
        self.split = split
        self._indices: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.index_requests = 0
        """Shard-index reads so far (each shard's index is read once, then kept)."""
        self.index_bytes = 0
        self.mapped: bool | None = None
        """Whether the storage serves views of mapped objects (``fetch``); None until it is asked."""

    def field(self, name: str) -> FieldSpec:
        try:
            return self.split.fields[name]
        except KeyError:
            raise InputError(
                f"split {self.split.name!r} has no field {name!r} (fields: {', '.join(self.split.fields)})"
            ) from None

    def chunk_nbytes(self, name: str, chunk: int) -> int:
        """Decoded size of one chunk (what a RAM cache holds)."""
        f = self.field(name)
        start, stop = self.split.chunk_range(chunk)
        if f.is_array:
            return (stop - start) * np.dtype(f.dtype).itemsize * int(np.prod(f.shape or ()))
        part, b = divmod(chunk, self.split.chunks_per_shard)
        return f.parts[part].batches[b][1]

    # -- ranges ---------------------------------------------------------------------------------

    def _shard(self, f: FieldSpec, chunk: int) -> tuple[str, int]:
        shard, inner = divmod(chunk, self.split.chunks_per_shard)
        return shard_key(f.shard_path(shard), shard, 1 + len(f.shape or ())), inner

    def _load_indices(self, keys: Sequence[str]) -> None:
        need = sorted({k for k in keys if k not in self._indices})
        if not need:
            return
        n = zf.index_nbytes(self.split.chunks_per_shard)
        ranges: list[Range] = []
        for key in need:
            obj = self.manifest.objects.get(key)
            if obj is None:
                raise CorruptObjectError(key, "shard is not listed in the manifest")
            ranges.append((key, obj.size - n, obj.size))
        bufs = self.storage.read_ranges(ranges)
        with self._lock:
            self.index_requests += len(ranges)
            self.index_bytes += n * len(ranges)
            for key, buf in zip(need, bufs, strict=True):
                self._indices[key] = zf.parse_index(buf, self.split.chunks_per_shard, key)

    def ranges(self, name: str, chunks: Sequence[int]) -> list[Range]:
        f = self.field(name)
        if not f.is_array:
            out = []
            for c in chunks:
                part, b = divmod(c, self.split.chunks_per_shard)
                off, n, _ = f.parts[part].batches[b]
                out.append((f.parts[part].key, off, off + n))
            return out
        located = [self._shard(f, c) for c in chunks]
        self._load_indices([k for k, _ in located])
        out = []
        for key, inner in located:
            off, n = (int(x) for x in self._indices[key][inner])
            if off == int(zf.EMPTY):
                raise CorruptObjectError(key, f"chunk {inner} is missing from the shard")
            out.append((key, off, off + n))
        return out

    # -- read + decode ---------------------------------------------------------------------------

    def fetch(self, ranges: Sequence[Range]) -> list[bytes | memoryview]:
        """Fetch ranges, coalescing neighbours in one object into single requests. From a backend
        that maps its objects (local files, ``Storage.view_range``), views of the mappings instead,
        one per run of touching ranges (a gap would only add bytes nobody reads): decoding then
        reads each byte where the page cache holds it (checksum, then the loader's gather), where a
        read first copied it into fresh memory whose every page faulted on first touch."""
        merged = _coalesce(ranges, 0 if self.mapped is not False else COALESCE_GAP)
        bufs = self._views(merged)
        if bufs is None:
            if self.mapped is False:  # learnt just now: coalesce as for reads
                merged = _coalesce(ranges, COALESCE_GAP)
            bufs = list(self.storage.read_ranges([(k, s, e) for k, s, e, _ in merged]))
        out: list[bytes | memoryview] = [b""] * len(ranges)
        for (_, ms, _, members), buf in zip(merged, bufs, strict=True):
            view = memoryview(buf)
            for i in members:
                _, s, e = ranges[i]
                # A zero-copy view: decoding reads it once, copying it first doubled the cost.
                out[i] = view[s - ms : e - ms] if len(members) > 1 else buf
        return out

    def _views(self, merged: list[tuple[str, int, int, list[int]]]) -> list[bytes | memoryview] | None:
        """Views of mapped objects for the requests, or None where the storage does not map."""
        if not merged or self.mapped is False:
            return None
        views = [self.storage.view_range(k, s, e) for k, s, e, _ in merged]
        self.mapped = all(v is not None for v in views)
        return [v for v in views if v is not None] if self.mapped else None

    def decode(self, name: str, chunk: int, raw: bytes | memoryview) -> Chunk:
        f = self.field(name)
        start, stop = self.split.chunk_range(chunk)
        if f.is_array:
            key, inner = self._shard(f, chunk)
            arr = zf.decode_chunk(
                raw,
                codec=f.codec,
                dtype=f.dtype or "",
                chunk_shape=(self.split.chunk_rows, *(f.shape or ())),
                key=key,
                chunk=inner,
            )
            return arr[: stop - start]
        part, b = divmod(chunk, self.split.chunks_per_shard)
        key = f.parts[part].key
        if crc32c_hex(raw) != f.parts[part].batches[b][2]:
            raise CorruptObjectError(key, f"checksum mismatch in record batch {b}")
        try:
            schema = _schema(f)
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(raw)), schema)
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorruptObjectError(key, f"record batch {b} does not decode: {exc}") from None
        if batch.num_rows != stop - start:
            raise CorruptObjectError(
                key, f"record batch {b} has {batch.num_rows} rows, expected {stop - start}"
            )
        return batch.column(0)

    def read(self, name: str, chunks: Sequence[int]) -> list[Chunk]:
        """Decoded chunks of one field, in the order asked."""
        raws = self.fetch(self.ranges(name, chunks))
        return [self.decode(name, c, r) for c, r in zip(chunks, raws, strict=True)]


def _coalesce(ranges: Sequence[Range], gap: int) -> list[tuple[str, int, int, list[int]]]:
    """``(key, start, end, members)`` requests covering ``ranges``: neighbours in one object at
    most ``gap`` bytes apart share one; ``members`` are the positions of the ranges it covers."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i][0], ranges[i][1]))
    merged: list[tuple[str, int, int, list[int]]] = []
    for i in order:
        key, s, e = ranges[i]
        if merged and merged[-1][0] == key and s - merged[-1][2] <= gap and s >= merged[-1][1]:
            k, ms, me, members = merged[-1]
            merged[-1] = (k, ms, max(me, e), [*members, i])
        else:
            merged.append((key, s, e, [i]))
    return merged


_SCHEMAS: dict[str, pa.Schema] = {}


def _schema(f: FieldSpec) -> pa.Schema:
    """The one-column Arrow schema of a variable field, as the manifest records it."""
    if not f.arrow_schema:
        raise CorruptObjectError(f.path, "variable field has no Arrow schema in the manifest")
    if f.arrow_schema not in _SCHEMAS:
        _SCHEMAS[f.arrow_schema] = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(f.arrow_schema)))
    return _SCHEMAS[f.arrow_schema]
