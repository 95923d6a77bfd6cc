"""Vectorised gathers: rows at arbitrary sample indices from decoded chunks.

The loop runs over the distinct chunks a request touches, never over samples: each chunk's rows are
copied with one fancy-indexing call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from hpstore.format.chunks import Chunk
from hpstore.format.manifest import FieldSpec


def group_by_chunk(indices: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, chunk_ids, starts)``: ``indices[order]`` sorted by chunk; chunk ``chunk_ids[k]``
    owns ``order[starts[k]:starts[k+1]]``."""
    cids = indices // chunk_rows
    order = np.argsort(cids, kind="stable")
    chunk_ids, starts = np.unique(cids[order], return_index=True)
    return order, chunk_ids, starts


def gather(field: FieldSpec, indices: np.ndarray, chunk_rows: int, chunks: Mapping[int, Chunk]) -> Any:
    """Rows ``indices`` of ``field``: an array ``(n, *shape)``, or a list for variable fields
    (``bytes``, ``str``, or 1-d ``np.ndarray`` per row for lists of numbers)."""
    indices = np.asarray(indices, dtype=np.int64)
    order, chunk_ids, starts = group_by_chunk(indices, chunk_rows)
    bounds = [*starts.tolist(), len(order)]
    if field.is_array:
        out = np.empty((len(indices), *(field.shape or ())), dtype=np.dtype(field.dtype or "u1"))
        for k, cid in enumerate(chunk_ids.tolist()):
            pos = order[bounds[k] : bounds[k + 1]]
            out[pos] = chunks[cid][indices[pos] - cid * chunk_rows]
        return out
    values: list[Any] = [None] * len(indices)
    for k, cid in enumerate(chunk_ids.tolist()):
        pos = order[bounds[k] : bounds[k + 1]]
        taken = chunks[cid].take(pa.array(indices[pos] - cid * chunk_rows))
        for p, v in zip(pos.tolist(), to_python(taken), strict=True):
            values[p] = v
    return values


def to_python(arr: pa.Array) -> list[Any]:
    """Arrow values as Python objects; lists of numbers become numpy arrays (zero-copy when possible)."""
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        vt = t.value_type
        if pa.types.is_integer(vt) or pa.types.is_floating(vt) or pa.types.is_boolean(vt):
            offsets = arr.offsets.to_numpy()
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            base = offsets[0]
            rows: list[Any] = [flat[offsets[i] - base : offsets[i + 1] - base] for i in range(len(arr))]
            if arr.null_count:  # a null list is None, not an empty array
                for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
                    rows[i] = None
            return rows
    return arr.to_pylist()
