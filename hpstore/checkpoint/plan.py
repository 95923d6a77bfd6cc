"""Checkpoint plans: where every array, chunk and staging byte goes, and what retention deletes.

Pure functions of their inputs (shapes, dtypes, step numbers): no I/O, no device work. The
checkpointer executes these plans; tests check them directly.

Layout of one checkpoint (a Zarr v3 group under one prefix; ``docs/CHECKPOINTS.md`` in full)::

    step-000000123/manifest.json                     sizes and CRC32C of every object; written last
    step-000000123/zarr.json                         group metadata
    step-000000123/data-<gen>/zarr.json              group metadata of this save's generation
    step-000000123/data-<gen>/tree.json              the tagged JSON tree (structure, non-tensor leaves)
    step-000000123/data-<gen>/00000-model.fc.weight/ one Zarr v3 array per tensor (zarr.json + c/...)

Each array is chunked along its leading axes so that a chunk is one contiguous byte range of the
C-ordered tensor of about ``chunk_bytes``: chunks are written and read in parallel, and every
chunk is filled straight from (or into) the tensor's memory. Zarr stores edge chunks full-size, so
a chunk whose rows run past the array's end is zero-padded on write and trimmed on read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hpstore.checkpoint.tree import Leaf, Path, path_str
from hpstore.errors import CheckpointError
from hpstore.format.dtypes import ZARR_CORE_DTYPES
from hpstore.storage import direct_io

ALIGN = 64
"""Staging offsets are multiples of this, so every dtype view of the buffer is aligned."""

DIRECT_ALIGN = direct_io.ALIGN
"""Arrays big enough to be written with ``O_DIRECT`` get slots (and chunks) aligned to this, so
their chunks go from the staging buffer to the disk without passing through the page cache."""

STEP_RE = re.compile(r"^step-(\d{9,})$")

BITS_DTYPES = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
"""Zarr v3 has no core type for bfloat16 or float8: such tensors are stored as their raw bits in the
unsigned integer of the same width, with the torch dtype in the array's attributes."""


def step_prefix(step: int) -> str:
    return f"step-{step:09d}"


def parse_step(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def zarr_dtype(dtype_name: str, itemsize: int) -> str:
    """The Zarr ``data_type`` that stores a tensor of ``dtype_name`` (its own, or raw bits)."""
    if dtype_name in ZARR_CORE_DTYPES:
        return dtype_name
    return BITS_DTYPES[itemsize]


@dataclass(frozen=True, kw_only=True)
class ChunkSpec:
    """One stored chunk: ``nbytes`` valid bytes at ``offset`` of the array's bytes, stored as
    ``stored`` bytes (``stored > nbytes`` only for a zero-padded edge chunk)."""

    key: str
    offset: int
    nbytes: int
    stored: int


@dataclass(frozen=True, kw_only=True)
class ArraySpec:
    """One tensor or numpy array of the state and where it lives."""

    index: int
    name: str
    key: str
    kind: str  # "tensor" | "ndarray"
    dtype: str  # torch dtype name for tensors, numpy dtype name for ndarrays
    itemsize: int
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    group: str = ""
    """Sub-group under the generation: ``""`` for the state's arrays, ``rank-NNNNN`` for the
    arrays of one rank's ``PerRank`` values."""
    shard_rows: int | None = None
    """Saved from dim-0 shards of this many rows per rank (FSDP's ``ceil(n / W)``); the chunk
    grid then divides it, so every chunk belongs to exactly one rank."""

    @property
    def prefix(self) -> str:
        """The array's node path under the generation."""
        return f"{self.group}/{self.key}" if self.group else self.key

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def zarr_dtype(self) -> str:
        return zarr_dtype(self.dtype, self.itemsize)

    @property
    def chunks(self) -> list[ChunkSpec]:
        return chunk_specs(self.shape, self.chunk_shape, self.itemsize)


def array_key(index: int, path: Path) -> str:
    """``00003-model.fc.weight``: unique by index, readable by path, safe as a Zarr node name."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", ".".join(str(p) for p in path)).strip("._-")
    return f"{index:05d}-{slug[:80]}" if slug else f"{index:05d}"


def chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Chunks of about ``chunk_bytes`` that are contiguous in C order: ``(1, ..., 1, rows, *tail)``."""
    if not shape:
        return ()
    if 0 in shape:
        return tuple(max(1, d) for d in shape)
    for axis in range(len(shape)):
        inner = math.prod(shape[axis + 1 :]) * itemsize
        if inner <= chunk_bytes:
            pieces = math.ceil(shape[axis] * inner / chunk_bytes)
            rows = math.ceil(shape[axis] / pieces)
            step = DIRECT_ALIGN // math.gcd(inner, DIRECT_ALIGN)
            if pieces > 1 and step * inner <= chunk_bytes:  # every chunk starts DIRECT_ALIGN-aligned
                rows = min(shape[axis], -(-rows // step) * step)
            return (1,) * axis + (rows,) + tuple(shape[axis + 1 :])
    raise AssertionError("unreachable: a single item is never larger than a chunk")


def chunk_specs(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> list[ChunkSpec]:
    """Every chunk of an array chunked by ``chunk_shape`` (which this relies on), in C order."""
    if not shape:
        return [ChunkSpec(key="c", offset=0, nbytes=itemsize, stored=itemsize)]
    if 0 in shape:
        return []
    axis = _split_axis(shape, chunks)
    rows = chunks[axis]
    inner = math.prod(shape[axis + 1 :]) * itemsize
    lead_shape = shape[:axis]
    per_row = math.ceil(shape[axis] / rows)
    out: list[ChunkSpec] = []
    for lead in range(math.prod(lead_shape)):
        lead_idx = np.unravel_index(lead, lead_shape) if lead_shape else ()
        for g in range(per_row):
            start = lead * shape[axis] + g * rows
            valid = min(rows, shape[axis] - g * rows)
            idx = [*(int(i) for i in lead_idx), g] + [0] * (len(shape) - axis - 1)
            out.append(
                ChunkSpec(
                    key="c/" + "/".join(map(str, idx)),
                    offset=start * inner,
                    nbytes=valid * inner,
                    stored=rows * inner,
                )
            )
    return out


def _split_axis(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    """The axis a ``(1, ..., 1, rows, *tail)`` chunk shape splits: the first one whose chunk is not
    1, or after which the chunk covers the whole tail."""
    for axis in range(len(shape)):
        if chunks[axis] != 1 or tuple(chunks[axis + 1 :]) == tuple(shape[axis + 1 :]):
            return axis
    return len(shape) - 1


def is_contiguous_chunking(shape: tuple[int, ...], chunks: tuple[int, ...]) -> bool:
    """Whether every chunk of this chunk shape is one contiguous byte range (what we write)."""
    if len(shape) != len(chunks) or any(c < 1 for c in chunks):
        return False
    if not shape or 0 in shape:
        return True
    axis = _split_axis(shape, chunks)
    return tuple(chunks[axis + 1 :]) == tuple(shape[axis + 1 :])


def staging_offsets(nbytes: Iterable[int]) -> tuple[list[int], int]:
    """Offsets of consecutive slots of the given sizes, and the total size: ``ALIGN``-aligned,
    ``DIRECT_ALIGN``-aligned for arrays of at least ``direct_io.DIRECT_MIN`` bytes."""
    offsets = []
    end = 0
    for n in nbytes:
        align = DIRECT_ALIGN if n >= direct_io.DIRECT_MIN else ALIGN
        end = -(-end // align) * align
        offsets.append(end)
        end += n
    return offsets, -(-end // ALIGN) * ALIGN


def retention_plan(committed: Iterable[int], current: int, keep: int) -> list[int]:
    """Committed steps to delete so the newest ``keep`` remain. Never the step just written
    (``current``), never the newest committed one."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    steps = sorted(set(committed) | {current}, reverse=True)
    kept = set(steps[:keep]) | {current, steps[0]}
    return sorted(s for s in steps if s not in kept)


def plan_signature(leaves: Sequence[Leaf], paths: Sequence[Path]) -> tuple[object, ...]:
    """Everything ``array_specs`` depends on besides ``chunk_bytes``: equal signatures, equal plans.
    A training loop saves the same structure every time, so the plan is made once (it costs
    about as much as copying 20 MB, and ``save`` blocks the caller while it runs)."""
    return tuple(
        (path, leaf.dtype, leaf.shape, leaf.layout, leaf.device.type, leaf.is_quantized, leaf.is_nested)
        if isinstance(leaf, torch.Tensor)
        else (path, leaf.dtype, leaf.shape)
        for leaf, path in zip(leaves, paths, strict=True)
    )


def array_specs(leaves: Sequence[Leaf], paths: Sequence[Path], chunk_bytes: int) -> list[ArraySpec]:
    """The array plan of a flattened state; refuses leaves that cannot be stored faithfully."""
    return [
        _array_spec(i, leaf, path, chunk_bytes)
        for i, (leaf, path) in enumerate(zip(leaves, paths, strict=True))
    ]


def _array_spec(index: int, leaf: Leaf, path: Path, chunk_bytes: int) -> ArraySpec:
    where = f"state[{path_str(path)}]"
    if isinstance(leaf, torch.Tensor):
        if leaf.layout != torch.strided or leaf.is_quantized or leaf.is_nested:
            raise CheckpointError(f"{where}: cannot save a {leaf.layout} / quantized / nested tensor")
        if leaf.device.type == "meta":
            raise CheckpointError(f"{where}: cannot save a tensor on the meta device (it holds no data)")
        kind, dtype, itemsize = "tensor", str(leaf.dtype).removeprefix("torch."), leaf.dtype.itemsize
        if dtype not in ZARR_CORE_DTYPES and itemsize not in BITS_DTYPES:
            raise CheckpointError(f"{where}: cannot save dtype {leaf.dtype}")
    else:
        if leaf.dtype.name not in ZARR_CORE_DTYPES:
            raise CheckpointError(f"{where}: cannot save a numpy array of dtype {leaf.dtype}")
        kind, dtype, itemsize = "ndarray", leaf.dtype.name, leaf.dtype.itemsize
    shape = tuple(int(d) for d in leaf.shape)
    return ArraySpec(
        index=index,
        name=path_str(path),
        key=array_key(index, path),
        kind=kind,
        dtype=dtype,
        itemsize=itemsize,
        shape=shape,
        chunk_shape=chunk_shape(shape, itemsize, chunk_bytes),
    )
