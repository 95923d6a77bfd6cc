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

One process writes a checkpoint root at a time (in DDP, rank 0); any number may read it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from typing import Any

from hpstore.checkpoint.manifest import MANIFEST_KEY
from hpstore.checkpoint.plan import (
    ArraySpec,
    array_specs,
    plan_signature,
    retention_plan,
    staging_offsets,
    step_prefix,
)
from hpstore.checkpoint.reader import (
    SPARE_PREFIX,
    checkpoint_steps,
    read_checkpoint,
    read_manifest,
    scan_root,
)
from hpstore.checkpoint.staging import Slots, StagingBuffer
from hpstore.checkpoint.tree import Leaf, Path, flatten
from hpstore.checkpoint.writer import prune_generations, write_checkpoint
from hpstore.errors import CheckpointError, InputError
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
        with self._lock:
            self._stats.append(record)
            index = len(self._stats) - 1
        future: Future[None] = Future()

        def persist() -> None:
            try:
                self._persist(step, specs, snap, tree, index)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

        self._pending = future
        # Non-daemon: a script that returns right after save() still gets its checkpoint.
        threading.Thread(target=persist, name=f"hpstore-ckpt-{step}").start()

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
        try:
            prune_generations(self.storage, step, manifest.generation)
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
            gen = self._generation(step) if self._can_recycle() and self._spare is None else None
            self.storage.delete_prefix(f"{prefix}/{MANIFEST_KEY}")  # uncommit first, then remove
            if gen is not None:
                spare = f"{SPARE_PREFIX}{uuid.uuid4().hex[:12]}"
                if self.storage.move_prefix(f"{prefix}/{gen}", spare):
                    self._spare = spare
            self.storage.delete_prefix(prefix)
        for step in found.incomplete:
            if step < current:  # an interrupted save: nothing will ever reference it
                self.storage.delete_prefix(step_prefix(step))
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

    def load(self, step: int | None = None, map_location: Any = None) -> Any:
        """The saved state, verified byte for byte; tensors on CPU or on ``map_location``.

        ``step=None`` loads the newest committed checkpoint that verifies, warning
        (``CheckpointFallbackWarning``) about newer ones it skipped.
        """
        if step is not None:
            return read_checkpoint(
                self.storage, step, workers=self.layout.read_workers, map_location=map_location
            )
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.storage.url}: no committed checkpoint")
        skipped: list[str] = []
        for candidate in reversed(steps):
            try:
                state = read_checkpoint(
                    self.storage, candidate, workers=self.layout.read_workers, map_location=map_location
                )
            except CheckpointError as exc:
                skipped.append(f"step {candidate}: {exc}")
                continue
            if skipped:
                message = f"loaded checkpoint step {candidate}; skipped newer ones: " + "; ".join(skipped)
                log.warning(message)
                warnings.warn(message, CheckpointFallbackWarning, stacklevel=2)
            return state
        raise CheckpointError(f"{self.storage.url}: no checkpoint verifies: " + "; ".join(skipped))
