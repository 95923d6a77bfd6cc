"""Distributed checkpoints: DTensor shards and per-rank values, each rank writing its own chunks.

A state whose tensors are ``DTensor``\\s (``Shard(0)`` or ``Replicate()`` on a 1-D device mesh, as
``torch.distributed.checkpoint.state_dict.get_state_dict`` returns them for FSDP2) or that holds
``PerRank`` values is saved by every rank at once into ONE checkpoint:

* each global tensor is one Zarr v3 array with its global shape; a ``Shard(0)`` tensor's chunk grid
  divides FSDP's shard size ``ceil(n / W)`` (``shard_plan``), so every chunk lies inside one rank's
  rows and that rank alone writes it (ranks holding no rows write nothing), with no collective to
  plan it: every rank derives every rank's rows from ``(n, W)``;
* replicated tensors, plain tensors and the JSON tree are written once, by rank 0;
* ``PerRank`` values are written by each rank under ``rank-NNNNN/`` (a tree and its arrays).

Commit is two-phase, in the background threads of all ranks over a dedicated gloo group
(``Coordinator``, JSON encoded into uint8 tensors: no pickle, also not between ranks): rank 0
broadcasts the generation name; every rank writes and syncs its objects and reports their sizes
and CRC32C; rank 0 writes the manifest last, then tells every rank whether it committed. A rank
that dies before that leaves no manifest: the step stays invisible and the previous checkpoint
loadable; retention removes the partial one later.

Loading onto any world size (``target_wants``): a ``Shard(0)`` target of W' ranks wants rows
``[r·ceil(n/W'), …)``; the reader reads only the chunks overlapping them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor, Replicate, Shard

from hpstore.checkpoint.plan import ArraySpec, ChunkSpec, array_key, array_specs, chunk_shape
from hpstore.checkpoint.tree import Leaf, Path, path_str
from hpstore.errors import CheckpointError


@dataclass(frozen=True)
class World:
    rank: int
    size: int


def is_dtensor(x: object) -> TypeGuard[DTensor]:
    return isinstance(x, DTensor)


def has_dtensors(leaves: Sequence[Leaf]) -> bool:
    return any(is_dtensor(t) for t in leaves)


def find_world(leaves: Sequence[Leaf]) -> World:
    """The ranks writing this state: the DTensors' mesh (1-D, spanning the whole job), else the
    initialised process group, else a world of one."""
    meshes = {id(t.device_mesh): t.device_mesh for t in leaves if is_dtensor(t)}
    job = (
        (tdist.get_rank(), tdist.get_world_size())
        if tdist.is_available() and tdist.is_initialized()
        else (0, 1)
    )
    for mesh in meshes.values():
        if mesh.ndim != 1:
            raise CheckpointError(f"only 1-D device meshes can be saved, got a {mesh.ndim}-D mesh")
        if mesh.mesh.flatten().tolist() != list(range(job[1])):
            raise CheckpointError(f"the device mesh must span all {job[1]} ranks of the job in order")
    return World(rank=job[0], size=job[1])


def shard_rows(n: int, world: int) -> int:
    """Rows per rank of a ``Shard(0)`` tensor: ``torch.chunk``'s (and FSDP2's) ``ceil(n / W)``."""
    return max(1, -(-n // world))


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``; trailing ranks may hold fewer or none."""
    s = shard_rows(n, world)
    return min(n, rank * s), min(n, (rank + 1) * s)


def sharded_chunk_shape(
    shape: tuple[int, ...], itemsize: int, chunk_bytes: int, rows: int
) -> tuple[int, ...]:
    """Chunks of whole dim-0 rows whose row count divides ``rows`` (the shard size), so chunks
    never straddle two ranks: the largest such divisor within ``chunk_bytes``, or one chunk per
    shard when the divisors are all far smaller (a prime shard size)."""
    if 0 in shape:
        return tuple(max(1, d) for d in shape)
    inner = math.prod(shape[1:]) * itemsize
    best = 1
    for small in range(1, math.isqrt(rows) + 1):  # divisors come in pairs (small, rows // small)
        if rows % small == 0:
            best = max([best] + [d for d in (small, rows // small) if d * inner <= chunk_bytes])
    if best * inner * 16 < chunk_bytes and rows * inner <= 8 * chunk_bytes:
        best = rows
    return (min(best, shape[0]), *shape[1:])


def placement(t: Any, where: str) -> str:
    """``"shard"`` (Shard(0)) or ``"replicate"`` for a DTensor; anything else is refused."""
    (p,) = t.placements if len(t.placements) == 1 else (None,)
    if isinstance(p, Replicate):
        return "replicate"
    if isinstance(p, Shard) and p.dim == 0 and t.ndim > 0:
        return "shard"
    raise CheckpointError(
        f"{where}: only Shard(0) or Replicate() DTensors on a 1-D mesh can be saved, got {t.placements}"
    )


@dataclass(frozen=True, kw_only=True)
class Piece:
    """What this rank writes of one array: ``chunks`` of it, from ``source`` (its local tensor or
    array), whose first byte is byte ``base`` of the global array."""

    spec: ArraySpec
    source: Leaf
    base: int
    chunks: tuple[ChunkSpec, ...]


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """One rank's part of a distributed save."""

    world: World
    specs: list[ArraySpec]
    """The state's arrays (global shapes), in leaf order: every rank knows all of them."""
    rank_specs: list[ArraySpec]
    """This rank's ``PerRank`` arrays (group ``rank-NNNNN``)."""
    pieces: list[Piece]
    """What this rank writes (rank 0 also writes every array's metadata and the trees)."""

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for p in self.pieces for c in p.chunks)


def rank_plan(
    world: World,
    leaves: Sequence[Leaf],
    paths: Sequence[Path],
    rank_leaves: Sequence[Leaf],
    rank_paths: Sequence[Path],
    group: str,
    chunk_bytes: int,
) -> RankPlan:
    """Pure: global array specs, and which chunks of which local tensor this rank writes."""
    specs: list[ArraySpec] = []
    pieces: list[Piece] = []
    for i, (leaf, path) in enumerate(zip(leaves, paths, strict=True)):
        where = f"state[{path_str(path)}]"
        if is_dtensor(leaf):
            kind = placement(leaf, where)
            local = leaf.to_local()
            (spec,) = array_specs([torch.empty(0, dtype=leaf.dtype)], [path], chunk_bytes)
            shape = tuple(int(d) for d in leaf.shape)
            if kind == "shard":
                rows = shard_rows(shape[0], world.size)
                lo, hi = shard_range(shape[0], world.size, world.rank)
                if tuple(local.shape) != (hi - lo, *shape[1:]):
                    raise CheckpointError(
                        f"{where}: local shard has shape {list(local.shape)}; rank {world.rank} of "
                        f"{world.size} should hold rows {lo}:{hi} of {list(shape)} (torch.chunk split)"
                    )
                chunks = sharded_chunk_shape(shape, spec.itemsize, chunk_bytes, rows)
                spec = _respec(spec, i, path, shape, chunks, shard_rows=rows)
                inner = math.prod(shape[1:]) * spec.itemsize
                mine = tuple(c for c in spec.chunks if lo * inner <= c.offset < hi * inner)
                pieces.append(Piece(spec=spec, source=local, base=lo * inner, chunks=mine))
            else:
                spec = _respec(spec, i, path, shape, chunk_shape(shape, spec.itemsize, chunk_bytes))
                if world.rank == 0:
                    pieces.append(Piece(spec=spec, source=local, base=0, chunks=tuple(spec.chunks)))
        else:
            (spec,) = array_specs([leaf], [path], chunk_bytes)
            spec = _respec(spec, i, path, spec.shape, spec.chunk_shape)
            if world.rank == 0:  # a plain tensor in a distributed state: the same on every rank
                pieces.append(Piece(spec=spec, source=leaf, base=0, chunks=tuple(spec.chunks)))
        specs.append(spec)
    rank_specs = []
    for i, spec in enumerate(array_specs(rank_leaves, rank_paths, chunk_bytes)):
        spec = _respec(spec, i, rank_paths[i], spec.shape, spec.chunk_shape, group=group)
        rank_specs.append(spec)
        pieces.append(Piece(spec=spec, source=rank_leaves[i], base=0, chunks=tuple(spec.chunks)))
    return RankPlan(world=world, specs=specs, rank_specs=rank_specs, pieces=pieces)


def _respec(
    spec: ArraySpec, index: int, path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], *, group: str = "",
    shard_rows: int | None = None,
) -> ArraySpec:  # fmt: skip
    from dataclasses import replace

    return replace(
        spec, index=index, key=array_key(index, path), shape=shape, chunk_shape=chunks, group=group,
        shard_rows=shard_rows,
    )  # fmt: skip


def plan_key(
    world: World, leaves: Sequence[Leaf], paths: Sequence[Path], rank_leaves: Sequence[Leaf]
) -> tuple[object, ...]:
    """Everything ``rank_plan`` depends on (with the chunk size): a training loop saves the same
    structure every time, so the plan and staging slots are made once."""

    def sig(t: Leaf) -> tuple[object, ...]:
        if is_dtensor(t):
            local = t.to_local()
            return ("d", t.dtype, tuple(t.shape), tuple(local.shape), str(t.placements), local.device.type)
        if isinstance(t, torch.Tensor):
            return ("t", t.dtype, tuple(t.shape), t.layout, t.device.type, t.is_quantized, t.is_nested)
        return ("n", t.dtype, t.shape)

    return (world, tuple(paths), tuple(sig(t) for t in leaves), tuple(sig(t) for t in rank_leaves))


# -- coordination -------------------------------------------------------------------------------


class Coordinator:
    """JSON messages between the ranks of one save, over a dedicated gloo group.

    The group is created once (``dist.new_group(backend="gloo")``, a collective every rank makes
    in the same order) and used only from the checkpointer's background threads (and ``load``), so
    it never interleaves with the training's collectives. Messages are UTF-8 JSON in uint8 tensors:
    no pickle, whatever a peer sends."""

    def __init__(self, world: World, group: Any) -> None:
        self.world = world
        self.group = group

    @classmethod
    def create(cls, world: World) -> Coordinator:
        group = tdist.new_group(backend="gloo") if world.size > 1 else None
        return cls(world, group)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order."""
        data = json.dumps(obj, allow_nan=False).encode()
        if self.world.size == 1:
            return [json.loads(data)]
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world.size)]
        tdist.all_gather(sizes, size, group=self.group)
        n = max(int(s.item()) for s in sizes)
        buf = torch.zeros(n, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
        bufs = [torch.zeros(n, dtype=torch.uint8) for _ in range(self.world.size)]
        tdist.all_gather(bufs, buf, group=self.group)
        return [json.loads(bytes(b[: int(s.item())].numpy())) for b, s in zip(bufs, sizes, strict=True)]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's JSON-able ``obj`` on every rank."""
        if self.world.size == 1:
            return obj
        data = json.dumps(obj, allow_nan=False).encode() if self.world.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        tdist.broadcast(size, src=self._src, group=self.group)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.world.rank == 0 and data:
            buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        tdist.broadcast(buf, src=self._src, group=self.group)
        return json.loads(bytes(buf.numpy()))

    @property
    def _src(self) -> int:
        return 0  # global rank 0: the group spans the whole job

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return all(self.all_gather(bool(flag)))


# -- loading onto a target ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Want:
    """What a load should produce for one array: rows ``[lo, hi)`` of dim 0 (all of a 0-d array),
    checked against ``shape`` and ``dtype``, built into the result by ``build``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    lo: int
    hi: int
    device: torch.device
    build: Callable[[torch.Tensor], Any]


def target_wants(leaves: Sequence[Leaf], paths: Sequence[Path]) -> dict[str, Want]:
    """The ``Want`` of every tensor of a flattened target state, by state path."""
    out: dict[str, Want] = {}
    for leaf, path in zip(leaves, paths, strict=True):
        if not isinstance(leaf, torch.Tensor):
            continue
        name = path_str(path)
        shape = tuple(int(d) for d in leaf.shape)
        n = shape[0] if shape else 1
        if is_dtensor(leaf):
            kind = placement(leaf, f"target[{name}]")
            mesh = leaf.device_mesh
            if mesh.ndim != 1:
                raise CheckpointError(f"target[{name}]: only 1-D device meshes are supported")
            local = leaf.to_local()
            lo, hi = (0, n)
            if kind == "shard":
                lo, hi = shard_range(n, mesh.size(), mesh.get_local_rank())
            out[name] = Want(
                name=name, shape=shape, dtype=leaf.dtype, lo=lo, hi=hi, device=local.device,
                build=_dtensor_builder(mesh, leaf.placements, leaf.shape, leaf.stride()),
            )  # fmt: skip
        else:
            out[name] = Want(
                name=name, shape=shape, dtype=leaf.dtype, lo=0, hi=n, device=leaf.device, build=lambda t: t
            )
    return out


def _dtensor_builder(mesh: Any, placements: Any, shape: Any, stride: Any) -> Callable[[torch.Tensor], Any]:
    def build(local: torch.Tensor) -> Any:
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

    return build
