"""Reading one checkpoint: trust only its manifest, verify every byte, build only known types.

The manifest is validated before anything is allocated; every chunk read is checked against its
recorded size and CRC32C (a missing object is reported as missing, by the read that needed it: a
listing up front would read every directory of the checkpoint, the slowest part of a cold load
on a local disk). Any failure raises ``CheckpointError`` naming the
array (or the tree) it belongs to. Nothing here unpickles: tensors are rebuilt from raw bytes and
the rest from the tagged JSON tree (``hpstore.checkpoint.tree``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpstore.checkpoint.manifest import GROUP_KEY, CheckpointManifest, parse_manifest, rank_group
from hpstore.checkpoint.plan import ArraySpec, ChunkSpec, parse_step, step_prefix
from hpstore.checkpoint.sharded import Want
from hpstore.checkpoint.tree import TORCH_DTYPES, Leaf, unflatten
from hpstore.checksum import crc32c_hex
from hpstore.errors import CheckpointError, HpstoreError, ObjectNotFoundError, StoreNotFoundError
from hpstore.format import commit
from hpstore.format.commit import MANIFEST_KEY, GenerationNaming
from hpstore.storage.base import Storage
from hpstore.threads import run_parallel

SPARES = GenerationNaming(prefix="spare", stamped=False, hex_digits=12)
"""Root-level names of a retired checkpoint's files kept for the next save to rewrite in place
(``spare-<12 hex>``); only names of exactly this form are ever removed as spares."""
SPARE_PREFIX = f"{SPARES.prefix}-"


@dataclass(frozen=True)
class RootScan:
    """What one listing of a checkpoint root holds. Committed = has a manifest; incomplete =
    objects but no manifest (an interrupted save, or only what is not ours); spares = retired
    data kept for reuse."""

    committed: list[int]
    incomplete: list[int]
    spares: list[str]


def scan_root(storage: Storage) -> RootScan:
    committed: set[int] = set()
    seen: set[int] = set()
    spares: set[str] = set()
    for key in storage.list():
        head, _, rest = key.partition("/")
        if SPARES.owns(head):
            spares.add(head)
        step = parse_step(head)
        if step is None:
            continue
        seen.add(step)
        if rest == MANIFEST_KEY:
            committed.add(step)
    return RootScan(sorted(committed), sorted(seen - committed), sorted(spares))


def checkpoint_steps(storage: Storage) -> tuple[list[int], list[int]]:
    """``(committed, incomplete)`` steps under a checkpoint root, ascending."""
    found = scan_root(storage)
    return found.committed, found.incomplete


def read_manifest(storage: Storage, step: int) -> CheckpointManifest:
    """The committed manifest of ``step`` (``hpstore.format.commit.read_manifest`` under its
    prefix), which must say that step; every failure is a ``CheckpointError``."""
    st = storage.child(step_prefix(step))
    where = f"{st.url}/{MANIFEST_KEY}"
    try:
        manifest = commit.read_manifest(st, parse_manifest)
    except StoreNotFoundError:
        raise CheckpointError(f"{st.url}: no committed checkpoint for step {step}") from None
    except HpstoreError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where}: cannot read: {exc}") from None
    if manifest.step != step:
        raise CheckpointError(f"{where}: manifest says step {manifest.step}, its prefix step {step}")
    return manifest


def read_checkpoint(
    storage: Storage,
    step: int,
    *,
    workers: int,
    map_location: Any = None,
    wants: Mapping[str, Want] | None = None,
) -> Any:
    """The state saved as ``step``, verified; tensors on ``map_location`` (default: CPU).

    ``wants``: by state path, the rows of a tensor to read (a rank's shard of a resharded load)
    and how to build the result (a DTensor); only the chunks overlapping those rows are read.
    A wanted tensor that the checkpoint lacks, or holds with another shape or dtype, is an error
    naming it."""
    manifest = read_manifest(storage, step)
    st = storage.child(step_prefix(step))
    tree = _read_tree(st, manifest, manifest.tree_key)
    rank_trees = [_read_tree(st, manifest, manifest.rank_tree_key(r)) for r in range(manifest.ranks)]
    arrays = manifest.arrays
    wanted = _match_wants(st.url, arrays, wants or {})
    outputs: list[Leaf] = []
    bases: list[int] = []
    for i, a in enumerate(arrays):
        w = wanted.get(i)
        if w is None:
            outputs.append(_empty(a))
            bases.append(0)
        else:
            row = math.prod(a.shape[1:]) * a.itemsize if a.shape else a.itemsize
            outputs.append(torch.empty((w.hi - w.lo, *a.shape[1:]) if a.shape else (), dtype=w.dtype))
            bases.append(w.lo * row if a.shape else 0)
    views = [_byte_view(o) for o in outputs]
    jobs: list[tuple[int, ChunkSpec] | str] = [
        (i, c)
        for i, a in enumerate(arrays)
        for c in a.chunks
        if c.offset < bases[i] + views[i].nbytes and bases[i] < c.offset + c.nbytes
    ]
    jobs.sort(key=lambda j: -j[1].stored if isinstance(j, tuple) else 0)
    # The Zarr metadata (group and array zarr.json) is what any other reader trusts: verify it too,
    # in the same pool, after the chunks (a few small reads that hide behind the big ones).
    jobs.extend(metadata_keys(manifest))
    # An array moves to map_location as soon as its last chunk lands, from the reading thread,
    # so host-to-device copies overlap the reads of the other arrays.
    pending = [0] * len(arrays)
    for job in jobs:
        if isinstance(job, tuple):
            pending[job[0]] += 1
    lock = threading.Lock()

    def fetch(job: tuple[int, ChunkSpec] | str) -> None:
        if isinstance(job, str):
            _read_verified(st, manifest, job)
            return
        i, c = job
        a, base, dst = arrays[i], bases[i], views[i]
        key = manifest.array_object(a, c.key)
        lo, hi = max(c.offset, base), min(c.offset + c.nbytes, base + dst.nbytes)
        if c.stored == c.nbytes and lo == c.offset and hi == c.offset + c.nbytes:
            _read_verified_into(st, manifest, key, dst[lo - base : hi - base])  # no copy
        else:  # a zero-padded edge chunk, or one that only partly overlaps the wanted rows
            data = np.frombuffer(_read_verified(st, manifest, key), dtype=np.uint8)
            dst[lo - base : hi - base] = data[lo - c.offset : hi - c.offset]
        with lock:
            pending[i] -= 1
            done = pending[i] == 0
        if done and i not in wanted:
            outputs[i] = _place(outputs[i], map_location)

    run_parallel(fetch, jobs, workers, name="hpstore-ckpt-read")
    for i, _a in enumerate(arrays):
        w = wanted.get(i)
        if w is not None:
            local = outputs[i]
            assert isinstance(local, torch.Tensor)
            outputs[i] = w.build(local.to(map_location if map_location is not None else w.device))
        elif not any(isinstance(j, tuple) and j[0] == i for j in jobs):  # nothing to trigger the move
            outputs[i] = _place(outputs[i], map_location)
    main = [outputs[i] for i, a in enumerate(arrays) if not a.group]
    per_rank = None
    if manifest.ranks:
        per_rank = []
        for r, rank_tree in enumerate(rank_trees):
            group = rank_group(r)
            mine = [outputs[i] for i, a in enumerate(arrays) if a.group == group]
            values = unflatten(rank_tree, mine, where=f"{st.url}/{manifest.rank_tree_key(r)}")
            if not isinstance(values, list):
                raise CheckpointError(f"{st.url}/{manifest.rank_tree_key(r)}: expected a list of values")
            per_rank.append(values)
    return unflatten(tree, main, where=f"{st.url}/{manifest.tree_key}", per_rank=per_rank)


def _match_wants(url: str, arrays: Sequence[ArraySpec], wants: Mapping[str, Want]) -> dict[int, Want]:
    """Array index -> its ``Want``; every wanted tensor must exist with the same shape and dtype."""
    by_name = {a.name: i for i, a in enumerate(arrays) if not a.group}
    out: dict[int, Want] = {}
    for name, w in wants.items():
        i = by_name.get(name)
        if i is None:
            raise CheckpointError(f"{url}: target tensor {name!r} is not in the checkpoint")
        a = arrays[i]
        dtype = str(w.dtype).removeprefix("torch.")
        if a.kind != "tensor" or a.shape != w.shape or a.dtype != dtype:
            raise CheckpointError(
                f"{url}: tensor {name!r} is saved as {a.kind} {a.dtype}{list(a.shape)}, "
                f"the target wants tensor {dtype}{list(w.shape)}"
            )
        out[i] = w
    return out


def metadata_keys(manifest: CheckpointManifest) -> list[str]:
    """Every Zarr metadata object of a checkpoint (``zarr.json`` of its groups and arrays)."""
    return [k for k in manifest.objects if k == GROUP_KEY or k.endswith(f"/{GROUP_KEY}")]


def _place(leaf: Leaf, map_location: Any) -> Leaf:
    if map_location is None or not isinstance(leaf, torch.Tensor):
        return leaf
    return leaf.to(map_location)


def _read_verified(st: Storage, manifest: CheckpointManifest, key: str) -> bytes:
    entry = manifest.objects[key]
    try:
        data = st.read(key)
    except HpstoreError as exc:
        raise _read_error(st, manifest, key, exc) from None
    if len(data) != entry.size:
        raise CheckpointError(
            f"{st.url}: {manifest.owner(key)}: {key} has {len(data)} bytes, manifest says {entry.size}"
        )
    if crc32c_hex(data) != entry.crc32c:
        raise CheckpointError(f"{st.url}: {manifest.owner(key)}: checksum mismatch in {key}")
    return data


def _read_verified_into(st: Storage, manifest: CheckpointManifest, key: str, dst: np.ndarray) -> None:
    entry = manifest.objects[key]
    try:
        n = st.read_into(key, dst.data)
    except HpstoreError as exc:
        raise _read_error(st, manifest, key, exc) from None
    if n != entry.size:
        raise CheckpointError(
            f"{st.url}: {manifest.owner(key)}: {key} has {n} bytes, manifest says {entry.size}"
        )
    if crc32c_hex(dst) != entry.crc32c:
        raise CheckpointError(f"{st.url}: {manifest.owner(key)}: checksum mismatch in {key}")


def _read_error(st: Storage, manifest: CheckpointManifest, key: str, exc: HpstoreError) -> CheckpointError:
    if isinstance(exc, ObjectNotFoundError):
        return CheckpointError(f"{st.url}: {manifest.owner(key)}: {key} is missing")
    return CheckpointError(f"{st.url}: {manifest.owner(key)}: cannot read {key}: {exc}")


def _read_tree(st: Storage, manifest: CheckpointManifest, key: str) -> Any:
    raw = _read_verified(st, manifest, key)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{st.url}/{key}: not valid JSON ({exc})") from None


def _empty(a: ArraySpec) -> Leaf:
    if a.kind == "tensor":
        return torch.empty(a.shape, dtype=TORCH_DTYPES[a.dtype])
    return np.empty(a.shape, dtype=np.dtype(a.dtype).newbyteorder("<"))


def _byte_view(leaf: Leaf) -> np.ndarray:
    """The leaf's memory as a flat writable uint8 array (tensors of any dtype, incl. bfloat16)."""
    if isinstance(leaf, torch.Tensor):
        return leaf.reshape(-1).view(torch.uint8).numpy()
    return leaf.reshape(-1).view(np.uint8)
