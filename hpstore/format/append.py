"""Appending rows to a committed split: what the new generation rewrites, and what it reuses.

A split's chunks are uniform (``chunk_rows`` rows each, ``chunks_per_shard`` to a shard), which is
what every reader relies on (``idx // chunk_rows``). An append keeps that geometry and therefore
starts at the split's first *incomplete* shard ``k = num_samples // shard_rows``:

- shards ``0 .. k`` (whole) stay where they are, in their generation, never rewritten: the new
  manifest names them (an array field's ``segments``, an Arrow field's ``parts``);
- the rows of the partial last shard (fewer than ``shard_rows``; none if the split ends on a shard
  boundary) are read back and written again, followed by the new rows, as shards ``k ..`` of the
  new generation. The old partial shard object is left untouched too: readers still holding the old
  manifest keep reading it, and its generation is kept as long as any committed shard lives there.

So an append costs at most one shard of re-encoding per field, whatever the split's size, and the
appended store reads exactly like a single ingest of the concatenated rows (same chunk geometry).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from hpstore.errors import InputError
from hpstore.format.chunks import ChunkReader, _schema
from hpstore.format.manifest import FieldSpec, Manifest, ObjectEntry, Segment, SplitSpec, shard_key
from hpstore.storage.base import Storage

Batch = Mapping[str, object]


def first_shard(split: SplitSpec) -> int:
    """The first shard an append to ``split`` writes: its first one that is not complete."""
    return split.num_samples // split.shard_rows


def arrow_type(f: FieldSpec) -> pa.DataType:
    """The exact Arrow type of a variable field, as its manifest records it."""
    return _schema(f).field(0).type


def check_schema(split: SplitSpec, batch: Mapping[str, object], where: str) -> None:
    """Refuse rows whose fields, dtypes, sample shapes or Arrow types differ from the split's."""
    if set(batch) != set(split.fields):
        raise InputError(
            f"{where}: cannot append to split {split.name!r}: the source has fields {sorted(batch)}, "
            f"the store has {sorted(split.fields)}"
        )
    for name, f in split.fields.items():
        col = batch[name]
        if f.is_array:
            got = (
                f"{col.dtype.name}{list(col.shape[1:])}" if isinstance(col, np.ndarray) else "variable-length"
            )
            if got != f.describe():
                raise InputError(
                    f"{where}: cannot append to split {split.name!r}: field {name!r} is {f.describe()} "
                    f"in the store, {got} in the source"
                )
        else:
            typ = None if isinstance(col, np.ndarray) else _arrow(col).type
            if typ is None or typ != arrow_type(f):
                got = f"{col.dtype.name}{list(col.shape[1:])}" if isinstance(col, np.ndarray) else str(typ)
                raise InputError(
                    f"{where}: cannot append to split {split.name!r}: field {name!r} is "
                    f"{f.describe()} in the store, {got} in the source"
                )


def _arrow(col: object) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks()
    assert isinstance(col, pa.Array)
    return col


def tail_rows(storage: Storage, manifest: Manifest, split: SplitSpec) -> dict[str, object] | None:
    """The rows of ``split``'s partial last shard (read back and verified), or ``None`` if the split
    ends on a shard boundary. At most ``shard_rows`` rows: bounded memory whatever the split size."""
    start = first_shard(split) * split.shard_rows
    if start >= split.num_samples:
        return None
    reader = ChunkReader(storage, manifest, split)
    chunks = list(range(start // split.chunk_rows, split.num_chunks))
    out: dict[str, object] = {}
    for name in split.fields:
        parts = reader.read(name, chunks)
        if isinstance(parts[0], np.ndarray):
            out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        else:
            out[name] = pa.concat_arrays(parts)
    return out


def extend_split(
    base: SplitSpec,
    base_objects: Mapping[str, ObjectEntry],
    new: SplitSpec,
    new_objects: Mapping[str, ObjectEntry],
) -> tuple[SplitSpec, dict[str, ObjectEntry]]:
    """One split entry from ``base`` (committed) and ``new``: the shards ``first_shard(base) ..``
    of the same split, written into a new generation (``new.num_samples`` counts every row).

    Returns the entry and every object it references: the kept ones of ``base`` (their recorded
    sizes and checksums, untouched) and all of ``new``'s."""
    k = first_shard(base)
    if (new.chunk_rows, new.chunks_per_shard) != (base.chunk_rows, base.chunks_per_shard):
        raise AssertionError("an append keeps the split's chunk geometry")
    objects: dict[str, ObjectEntry] = dict(new_objects)
    fields: dict[str, FieldSpec] = {}
    for name, old in base.fields.items():
        f = new.fields[name]
        if old.is_array:
            ndim = 1 + len(old.shape or ())
            kept = []
            for g in old.segments_of(base.num_shards):
                if g.first_shard >= k:
                    continue
                g = Segment(path=g.path, first_shard=g.first_shard, stop_shard=min(g.stop_shard, k))
                kept.append(g)
                for key in [f"{g.path}/zarr.json"] + [
                    shard_key(g.path, s, ndim) for s in range(g.first_shard, g.stop_shard)
                ]:
                    objects[key] = base_objects[key]
            segments = (*kept, Segment(path=f.path, first_shard=k, stop_shard=new.num_shards))
            fields[name] = FieldSpec(
                name=name,
                kind="array",
                path=f.path,
                dtype=old.dtype,
                shape=old.shape,
                codec=old.codec,
                attrs=old.attrs,
                nbytes=f.nbytes,
                segments=segments if kept else (),
            )
        else:
            parts = old.parts[:k]
            for p in parts:
                objects[p.key] = base_objects[p.key]
            fields[name] = FieldSpec(
                name=name,
                kind="variable",
                path=f.path,
                arrow_type=old.arrow_type,
                arrow_schema=old.arrow_schema,
                codec=old.codec,
                parts=(*parts, *f.parts),
                attrs=old.attrs,
                # Uncompressed bytes of the kept parts are not recorded per part: unknown.
                nbytes=None if parts else f.nbytes,
            )
    spec = SplitSpec(
        name=base.name,
        num_samples=new.num_samples,
        chunk_rows=base.chunk_rows,
        chunks_per_shard=base.chunks_per_shard,
        fields=fields,
    )
    return spec, objects
