"""Write-behind checkpoints in Zarr v3 + JSON: no training stall, no pickle, nothing lost.

::

    ck = hpstore.Checkpointer("ckpt/", keep=3)          # or "s3://bucket/run1", "memory://x"
    ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict(), "rng": ...})
    ...                                                   # training goes on while it is written
    ck.wait()                                             # persisted; background errors re-raise
    state = ck.load()                                     # newest checkpoint that verifies

``save`` flattens the state (``checkpoint_tree``), plans its arrays (``checkpoint_plan``), copies
every tensor into a reused host staging buffer (``staging``; pinned, non-blocking from GPUs) and
returns. One background thread per save writes the arrays and commits the manifest
(``checkpoint_writer``), then applies retention. ``load`` verifies every byte against the manifest
(``checkpoint_reader``). The layout is described in ``checkpoint_plan``, the format in
``checkpoint_manifest``.

Contract:

* At most one save in flight. A second ``save`` first waits for the previous one; that wait is
  reported separately (``SaveStats.wait_s``) from the copy (``snapshot_s``).
* A failed background write re-raises from ``wait()`` or from the next ``save()`` (which then
  saves nothing). Whatever failed, earlier committed checkpoints are untouched.
* Saving a step that is already committed replaces it atomically (the old one stays valid until the
  new manifest lands).
* Retention keeps the newest ``keep`` committed checkpoints by step number, never the one just
  written, never the newest; interrupted saves of older steps are removed with them. The data of
  the one it retires is kept as a spare that the next save rewrites in place
  (``CheckpointLayout.recycle``); ``close()`` removes it.
* ``load()`` without a step tries committed checkpoints newest first and warns
  (``CheckpointFallbackWarning``) when it had to skip any.

One process writes a checkpoint root at a time (in DDP, rank 0); any number may read it. The
exception is a distributed save (``hpstore.checkpoint.sharded``): a state holding DTensors or
``PerRank`` values is saved by every rank of the job together, each writing its own chunks of the
same checkpoint, and rank 0 commits it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from hpstore.checkpoint.manifest import (
    GROUP_KEY,
    TREE_KEY,
    CheckpointManifest,
    array_doc,
    array_from_doc,
    array_json,
    group_json,
    rank_group,
)
from hpstore.checkpoint.plan import (
    ArraySpec,
    array_specs,
    plan_signature,
    retention_plan,
    staging_offsets,
    step_prefix,
)
from hpstore.checkpoint.reader import (
    SPARES,
    checkpoint_steps,
    read_checkpoint,
    read_manifest,
    scan_root,
)
from hpstore.checkpoint.sharded import (
    Coordinator,
    RankPlan,
    World,
    find_world,
    has_dtensors,
    is_dtensor,
    plan_key,
    rank_plan,
    target_wants,
)
from hpstore.checkpoint.staging import Slots, Snapshot, StagingBuffer
from hpstore.checkpoint.tree import FlatState, Leaf, Path, flatten
from hpstore.checkpoint.writer import (
    discard_generation,
    discard_step,
    prune_generations,
    write_checkpoint,
    write_objects,
)
from hpstore.errors import CheckpointError, InputError
from hpstore.format.commit import CHECKPOINT_GENERATIONS, MANIFEST_KEY, commit_manifest
from hpstore.format.manifest import ObjectEntry
from hpstore.storage.base import Storage
from hpstore.storage.open import open_storage

log = logging.getLogger(__name__)


class CheckpointFallbackWarning(UserWarning):
    """``load()`` skipped newer checkpoints that did not verify and loaded an older one."""


@dataclass(frozen=True, kw_only=True)
class CheckpointLayout:
    """How checkpoints are written and read. Defaults chosen by ``benchmarks/checkpoint.py``."""

    chunk_bytes: int = 8 << 20
    """Target bytes per Zarr chunk: big enough for sequential disk writes, small enough that a big
    tensor is written and read by many threads at once."""
    workers: int = 8
    """Threads writing the chunks of one checkpoint in parallel (as many again write the small
    objects, whose cost is latency rather than bandwidth, beside them)."""
    read_workers: int = 16
    """Threads reading chunks in parallel on load."""
    recycle: bool = True
    """Keep the files of the checkpoint retention retires (as ``spare-*`` beside the steps) and
    rewrite them in place in the next save instead of creating new files: fewer file creations,
    blocks already allocated. Costs one checkpoint's worth of disk between saves (the same peak
    as without it, when a new checkpoint exists beside the one about to be retired);
    ``close()`` removes it. Only where the storage can move a prefix cheaply (local disks)."""

    def __post_init__(self) -> None:
        if self.chunk_bytes < 4096:
            raise InputError(f"chunk_bytes must be at least 4096, got {self.chunk_bytes}")
        if self.workers < 1 or self.read_workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers} and {self.read_workers}")


@dataclass(frozen=True, kw_only=True)
class SaveStats:
    """One ``save``. ``stall_s`` is all the caller waited (``wait_s + snapshot_s``). In the
    background: ``persist_s`` writes every object and commits the manifest (None until then),
    ``retention_s`` then removes older checkpoints."""

    step: int
    wait_s: float
    snapshot_s: float
    stall_s: float
    bytes: int
    arrays: int
    persist_s: float | None = None
    retention_s: float | None = None
    objects: int = 0
    failed: bool = False

    @property
    def throughput(self) -> float | None:
        """Persisted bytes per second of ``persist_s``."""
        return self.bytes / self.persist_s if self.persist_s else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}


class Checkpointer:
    """Write-behind checkpoints under one root (local directory or fsspec URL)."""

    def __init__(
        self,
        url: str,
        *,
        keep: int = 3,
        storage_options: Mapping[str, Any] | None = None,
        layout: CheckpointLayout | None = None,
    ) -> None:
        if type(keep) is not int or keep < 1:
            raise InputError(f"keep must be an integer of at least 1, got {keep!r}")
        self.url = url
        self.keep = keep
        self.layout = layout or CheckpointLayout()
        self.storage: Storage = open_storage(url, storage_options)
        self._staging = StagingBuffer()
        self._pending: Future[None] | None = None
        self._stats: list[SaveStats] = []
        self._lock = threading.Lock()
        self._plan: tuple[tuple[object, ...], list[ArraySpec], Slots] | None = None
        self._spare: str | None = None  # retired files the next save rewrites (layout.recycle)
        self._coord: Coordinator | None = None  # the gloo group of distributed saves, made once
        self._dplan: tuple[tuple[object, ...], RankPlan, Slots] | None = None
        self._distributed = False  # a distributed save happened: no recycling (rank 0 retains)

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: Any) -> None:
        """Snapshot ``state`` to host memory and return; a background thread persists it.

        Raises the error of a previous save that failed in the background (this state is then not
        saved), ``CheckpointError`` for a state holding something that cannot be saved.
        """
        t0 = time.perf_counter()
        if type(step) is not int or step < 0:
            raise InputError(f"step must be a non-negative integer, got {step!r}")
        if sys.byteorder != "little":
            raise CheckpointError("checkpoints are written little-endian; this host is big-endian")
        self._finish_pending()
        t1 = time.perf_counter()
        flat = flatten(state)
        if flat.per_rank or has_dtensors(flat.leaves):
            self._save_distributed(step, flat, t0, t1)
            return
        specs, slots = self._array_plan(flat.leaves, flat.paths)
        tree = json.dumps(flat.tree, separators=(",", ":"), allow_nan=False).encode()
        snap = self._staging.snapshot(flat.leaves, slots)
        t2 = time.perf_counter()
        record = SaveStats(
            step=step,
            wait_s=t1 - t0,
            snapshot_s=t2 - t1,
            stall_s=t2 - t0,
            bytes=sum(a.nbytes for a in specs),
            arrays=len(specs),
        )
        self._write_behind(step, record, lambda index: self._persist(step, specs, snap, tree, index))

    def _write_behind(self, step: int, record: SaveStats, persist: Callable[[int], None]) -> None:
        """Record the save's stats and persist it on a background thread; ``wait()`` (or the next
        save) re-raises what it raised. ``persist`` gets the index of the save's stats record."""
        with self._lock:
            self._stats.append(record)
            index = len(self._stats) - 1
        future: Future[None] = Future()

        def run() -> None:
            try:
                persist(index)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

        self._pending = future
        # Non-daemon: a script that returns right after save() still gets its checkpoint.
        threading.Thread(target=run, name=f"hpstore-ckpt-{step}").start()

    # -- distributed saves ---------------------------------------------------------------------

    def _coordinator(self, world: World) -> Coordinator | None:
        """The dedicated gloo group (created on first use: a collective every rank makes)."""
        if world.size == 1:
            return None
        if self._coord is None or self._coord.world != world:
            self._coord = Coordinator.create(world)
        return self._coord

    def _save_distributed(self, step: int, flat: FlatState, t0: float, t1: float) -> None:
        """Every rank snapshots what it writes (its shards, its ``PerRank`` values; rank 0 also
        the replicated tensors) and returns; the commit runs in the background threads."""
        world = find_world(flat.leaves)
        coord = self._coordinator(world)
        self._distributed = True
        ranked = flatten(flat.per_rank)
        if ranked.per_rank:
            raise CheckpointError("a PerRank value cannot hold another PerRank value")
        rank_paths = [(*flat.per_rank_paths[p[0]], *p[1:]) for p in ranked.paths]
        group = rank_group(world.rank)
        key = (plan_key(world, flat.leaves, flat.paths, ranked.leaves), self.layout.chunk_bytes)
        sources = [
            self._source(p.spec, flat.leaves, ranked.leaves)
            for p in (self._dplan[1].pieces if self._dplan and self._dplan[0] == key else [])
        ]
        if self._dplan is None or self._dplan[0] != key or not self._staging.holds(self._dplan[2]):
            self._dplan = None
            plan = rank_plan(
                world, flat.leaves, flat.paths, ranked.leaves, rank_paths, group, self.layout.chunk_bytes
            )
            sources = [self._source(p.spec, flat.leaves, ranked.leaves) for p in plan.pieces]
            sizes = [
                t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes for t in sources
            ]
            offsets, _total = staging_offsets(sizes)
            self._dplan = (key, plan, self._staging.slots(sources, offsets, sizes))
        _key, plan, slots = self._dplan
        tree = json.dumps(flat.tree, separators=(",", ":"), allow_nan=False).encode()
        rank_tree = json.dumps(ranked.tree, separators=(",", ":"), allow_nan=False).encode()
        snap = self._staging.snapshot(sources, slots)
        t2 = time.perf_counter()
        record = SaveStats(
            step=step, wait_s=t1 - t0, snapshot_s=t2 - t1, stall_s=t2 - t0, bytes=plan.nbytes,
            arrays=len(plan.specs) + len(plan.rank_specs),
        )  # fmt: skip
        self._write_behind(
            step,
            record,
            lambda index: self._persist_distributed(step, plan, snap, tree, rank_tree, coord, index),
        )

    @staticmethod
    def _source(spec: ArraySpec, leaves: list[Leaf], rank_leaves: list[Leaf]) -> Leaf:
        leaf = rank_leaves[spec.index] if spec.group else leaves[spec.index]
        return leaf.to_local() if is_dtensor(leaf) else leaf

    def _persist_distributed(
        self, step: int, plan: RankPlan, snap: Snapshot, tree: bytes, rank_tree: bytes,
        coord: Coordinator | None, index: int,
    ) -> None:  # fmt: skip
        """Phase 1: write and sync this rank's objects, report them; phase 2: rank 0 writes the
        manifest and tells every rank whether the checkpoint committed."""
        t0 = time.perf_counter()
        world = plan.world
        fresh = CHECKPOINT_GENERATIONS.new()
        gen = str(coord.broadcast(fresh)) if coord is not None else fresh
        st = self.storage.child(step_prefix(step))
        report: dict[str, Any]
        try:
            snap.ready()
            group = rank_group(world.rank)
            docs = [
                (f"{gen}/{group}/{GROUP_KEY}", group_json(step)),
                (f"{gen}/{group}/{TREE_KEY}", rank_tree),
            ]
            docs += [(f"{gen}/{a.prefix}/{GROUP_KEY}", array_json(a)) for a in plan.rank_specs]
            if world.rank == 0:
                docs += [(GROUP_KEY, group_json(step)), (f"{gen}/{GROUP_KEY}", group_json(step))]
                docs += [(f"{gen}/{TREE_KEY}", tree)]
                docs += [(f"{gen}/{a.prefix}/{GROUP_KEY}", array_json(a)) for a in plan.specs]
            chunks = [
                (
                    f"{gen}/{p.spec.prefix}/{c.key}",
                    view[c.offset - p.base : c.offset - p.base + c.nbytes],
                    c.stored,
                )
                for p, view in zip(plan.pieces, snap.views, strict=True)
                for c in p.chunks
            ]
            objects = write_objects(st, gen, docs, chunks, workers=self.layout.workers)
            report = {
                "ok": True,
                "objects": {k: [e.size, e.crc32c] for k, e in objects.items()},
                "arrays": [array_doc(a) for a in plan.rank_specs],
            }
        except BaseException as exc:
            report = {"ok": False, "error": f"rank {world.rank}: {type(exc).__name__}: {exc}"}
        reports = coord.all_gather(report) if coord is not None else [report]
        result: dict[str, Any] = {"ok": True}
        if world.rank == 0:
            result = self._commit(step, gen, plan, reports)
        if coord is not None:
            result = coord.broadcast(result)
        t1 = time.perf_counter()
        if not result["ok"]:
            self._record(index, persist_s=t1 - t0, failed=True)
            raise CheckpointError(f"{self.storage.url}: saving step {step} failed: {result['error']}")
        self._record(index, persist_s=t1 - t0, objects=len(report.get("objects", ())))
        if world.rank == 0:
            self._after_commit(step, gen, index, t1)

    def _commit(self, step: int, gen: str, plan: RankPlan, reports: list[Any]) -> dict[str, Any]:
        """Rank 0: the manifest of every rank's objects, written last; or the failed save removed."""
        errors = [str(r.get("error")) for r in reports if not r.get("ok")]
        if not errors:
            try:
                where = f"{self.storage.url}/{step_prefix(step)}"
                objects: dict[str, ObjectEntry] = {}
                arrays = list(plan.specs)
                for r in reports:
                    objects.update(
                        {k: ObjectEntry(size=int(v[0]), crc32c=str(v[1])) for k, v in r["objects"].items()}
                    )
                    arrays += [array_from_doc(i, d, where) for i, d in enumerate(r["arrays"])]
                manifest = CheckpointManifest(
                    step=step, generation=gen, arrays=tuple(arrays), objects=objects, ranks=len(reports)
                )
                # What the reader will check, checked before anything is committed.
                CheckpointManifest.from_json(manifest.to_json().encode(), where=where)
                commit_manifest(self.storage.child(step_prefix(step)), manifest.to_json().encode())
                return {"ok": True}
            except Exception as exc:
                errors = [f"rank 0: committing: {type(exc).__name__}: {exc}"]
        discard_generation(self.storage, step, gen)
        return {"ok": False, "error": "; ".join(errors)}

    def _array_plan(self, leaves: list[Leaf], paths: list[Path]) -> tuple[list[ArraySpec], Slots]:
        """Array specs and staging slots; remade only when the state's structure changes (or the
        staging buffer was released)."""
        signature = plan_signature(leaves, paths)
        if self._plan is None or self._plan[0] != signature or not self._staging.holds(self._plan[2]):
            self._plan = None  # the old slots pin the buffer: let it go before a bigger one is made
            specs = array_specs(leaves, paths, self.layout.chunk_bytes)
            sizes = [a.nbytes for a in specs]
            offsets, _total = staging_offsets(sizes)
            self._plan = (signature, specs, self._staging.slots(leaves, offsets, sizes))
        return self._plan[1], self._plan[2]

    def _persist(self, step: int, specs: Any, snap: Any, tree: bytes, index: int) -> None:
        t0 = time.perf_counter()
        spare, self._spare = self._spare, None
        try:
            manifest = write_checkpoint(
                self.storage, step, specs, snap, tree, workers=self.layout.workers, spare=spare
            )
        except BaseException as exc:
            self._record(index, persist_s=time.perf_counter() - t0, failed=True)
            raise self._write_error(step, exc) from exc
        t1 = time.perf_counter()
        self._record(index, persist_s=t1 - t0, objects=len(manifest.objects))
        self._after_commit(step, manifest.generation, index, t1)

    def _after_commit(self, step: int, gen: str, index: int, t1: float) -> None:
        """Retention once ``step`` is committed: its other generations, then old steps."""
        try:
            prune_generations(self.storage, step, gen)
            self._retain(step)
        except Exception as exc:
            self._record(index, retention_s=time.perf_counter() - t1, failed=True)
            raise CheckpointError(
                f"{self.storage.url}: step {step} is committed, but removing old checkpoints failed: {exc}"
            ) from exc
        self._record(index, retention_s=time.perf_counter() - t1)

    def _write_error(self, step: int, exc: BaseException) -> BaseException:
        if isinstance(exc, OSError | CheckpointError):
            return exc  # already names the object; re-raised as is (StorageError is an OSError)
        return CheckpointError(f"{self.storage.url}: saving step {step} failed: {type(exc).__name__}: {exc}")

    def _record(self, index: int, **changes: Any) -> None:
        with self._lock:
            self._stats[index] = replace(self._stats[index], **changes)

    def _retain(self, current: int) -> None:
        found = scan_root(self.storage)
        for step in retention_plan(found.committed, current, self.keep):
            prefix = step_prefix(step)
            recycle = self._can_recycle() and self._spare is None and not self._distributed
            gen = self._generation(step) if recycle else None
            self.storage.delete_prefix(f"{prefix}/{MANIFEST_KEY}")  # uncommit first, then remove
            if gen is not None:
                spare = SPARES.new()
                if self.storage.move_prefix(f"{prefix}/{gen}", spare):
                    self._spare = spare
            discard_step(self.storage, step)
        for step in found.incomplete:
            if step < current:  # an interrupted save: nothing will ever reference it
                discard_step(self.storage, step)
        for spare in found.spares:
            if spare != self._spare:  # left by a process that ended without close()
                self.storage.delete_prefix(spare)

    def _can_recycle(self) -> bool:
        """Recycling is on and the storage can move a prefix (else the manifest read is wasted)."""
        return self.layout.recycle and self.storage.capabilities.move_prefix

    def _generation(self, step: int) -> str | None:
        """The data generation of a committed step (None if its manifest does not read)."""
        try:
            return read_manifest(self.storage, step).generation
        except CheckpointError:
            return None

    def _finish_pending(self) -> None:
        future, self._pending = self._pending, None
        if future is not None:
            future.result()

    def wait(self) -> None:
        """Block until every save is persisted; re-raise a background error (once)."""
        self._finish_pending()

    def close(self) -> None:
        """``wait()``, then free the staging buffer."""
        try:
            self.wait()
        finally:
            self._plan = None
            self._staging.release()
            spare, self._spare = self._spare, None
            if spare is not None:
                self.storage.delete_prefix(spare)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> list[SaveStats]:
        """One record per ``save`` call, oldest first (a copy)."""
        with self._lock:
            return list(self._stats)

    # -- finding and loading ------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed checkpoints' steps, ascending (incomplete ones are not listed)."""
        return checkpoint_steps(self.storage)[0]

    def latest(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def load(self, step: int | None = None, map_location: Any = None, *, target: Any = None) -> Any:
        """The saved state, verified byte for byte; tensors on CPU or on ``map_location``.

        ``step=None`` loads the newest committed checkpoint that verifies, warning
        (``CheckpointFallbackWarning``) about newer ones it skipped.

        ``target``: a state like the one saved whose tensors give the shapes, dtypes and (for
        DTensors, ``Shard(0)`` or ``Replicate()`` on a 1-D mesh of any size) the placements to load
        onto: each rank reads only the chunks overlapping its shards, and the result holds DTensors
        of the target's placements there (everything else as saved). With DTensors on more than one
        rank, every rank must call ``load`` together: they agree on the step to load.
        """
        wants = None
        coord = None
        if target is not None:
            flat = flatten(target)
            wants = target_wants(flat.leaves, flat.paths)
            if has_dtensors(flat.leaves):
                coord = self._coordinator(find_world(flat.leaves))
        if coord is not None:
            self._finish_pending()  # its commit uses the same group
        read = self._reader(map_location, wants)
        if step is not None:
            return self._agreed(coord, step, read)
        if coord is None:
            steps = self.steps()
        else:  # rank 0 lists, every rank tries the same steps
            steps = [int(s) for s in coord.broadcast(self.steps() if coord.world.rank == 0 else None)]
        if not steps:
            raise CheckpointError(f"{self.storage.url}: no committed checkpoint")
        skipped: list[str] = []
        for candidate in reversed(steps):
            try:
                state = self._agreed(coord, candidate, read)
            except CheckpointError as exc:
                skipped.append(f"step {candidate}: {exc}")
                continue
            if skipped:
                message = f"loaded checkpoint step {candidate}; skipped newer ones: " + "; ".join(skipped)
                log.warning(message)
                warnings.warn(message, CheckpointFallbackWarning, stacklevel=2)
            return state
        raise CheckpointError(f"{self.storage.url}: no checkpoint verifies: " + "; ".join(skipped))

    def _reader(self, map_location: Any, wants: Any) -> Any:
        def read(step: int) -> Any:
            return read_checkpoint(
                self.storage, step, workers=self.layout.read_workers, map_location=map_location, wants=wants
            )

        return read

    @staticmethod
    def _agreed(coord: Coordinator | None, step: int, read: Any) -> Any:
        """``read(step)`` on every rank; a failure on any rank fails it on all (so all ranks fall
        back alike, and none is left waiting for the others)."""
        if coord is None:
            return read(step)
        state, failure = None, None
        try:
            state = read(step)
        except Exception as exc:  # any error: the other ranks must still hear about it
            failure = exc
        errors = [e for e in coord.all_gather(f"{type(failure).__name__}: {failure}" if failure else "") if e]
        if failure is not None:
            raise failure
        if errors:
            raise CheckpointError(f"step {step}: another rank failed: {errors[0]}")
        return state
