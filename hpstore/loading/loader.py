"""Loader: a dataset split streamed into torch batches, exactly once per epoch across ranks.

``Loader`` composes the parts, each in its own module, and owns only the position and the glue::

    plan (which windows, in which order)  ->  prefetch (windows built ahead, on threads, in a byte
    budget)  ->  cache (decoded chunks, evicted furthest-next-use first)  ->  chunks (read + verify +
    decode)  ->  batch (rows gathered once per window; batches are slices)

Usage::

    ds = hpstore.open("s3://bucket/mnist").split("train")
    loader = hpstore.Loader(ds, 256, num_workers=2, with_index=True)
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # {"image": uint8 tensor (256, 28, 28), "label": ..., "index": ...}
            ...
        ckpt["loader"] = loader.state_dict()   # a few integers; identical on every rank

Semantics worth knowing:

- Every rank yields ``len(loader)`` batches per epoch; across ranks every sample appears exactly once
  (``drop_last=False`` adds fewer than ``world_size`` wrap-around duplicates so every rank runs the
  same number of steps; ``drop_last=True`` leaves out fewer than ``world_size·batch_size`` samples
  instead and every batch is full). See ``hpstore.loading.plan``.
- ``num_workers`` is the number of background threads that build windows (read, decode, gather)
  ahead of the consumer; ``0`` builds them in the consumer's thread when needed, while a read-ahead
  thread reads and decodes the next window's chunks (``ChunkCache.fetch_ahead``). Local files are
  also read and decoded ``io_threads`` chunks at a time within a window (remote backends issue the
  ranges concurrently themselves). The output order does not depend on either.
- ``workers="threads"`` (default) or ``"processes"``: with processes the windows are built in
  ``num_workers`` worker processes started with the loader and kept across epochs, which write
  them into a ring of shared-memory slots; the consumer's interpreter only receives small messages
  and slices tensors (``hpstore.loading.workers``). Same batches, same ``state_dict``. Threads'
  heavy steps release the GIL (zstd, preads, numpy's scatter; only CRC32C holds it), but their
  Python glue still competes with a consumer that holds the GIL; processes do not. Worker
  processes are pinned off one CPU of the rank's share, which the consumer keeps to itself
  (``worker_cpus``, ``hpstore.loading.affinity``).
  ``benchmarks/consumer.py`` measures both side by side; ``"auto"`` follows it
  (``resolve_workers``).
- Pinned memory (``pin_memory``, default: when CUDA is available): window buffers come from torch's
  caching host allocator, so batches are pinned without a copy and ``.to("cuda", non_blocking=True)``
  is safe even if the batch is dropped at once (checked on an H100: 237 batches, no corruption).
- Iterating continues from the current position: after a full epoch the next ``iter`` starts the
  next epoch; after ``load_state_dict`` it yields exactly the rest of the saved epoch, in the same
  order, with any ``num_workers``. ``set_epoch(e)`` jumps to the start of epoch ``e`` (and keeps a
  resumed position when ``e`` is the epoch already pending).
- Fixed-shape fields arrive as tensors; variable-length fields as padded tensors plus
  ``<name>_lengths`` (lists of numbers) or Python lists (bytes, strings, others); see
  ``hpstore.loading.batch``. ``with_index=True`` adds ``index``, the global sample index of each row.
- Memory: decoded chunks up to ``cache_bytes``, plus windows in flight up to ``prefetch_bytes`` (at
  least one window per worker), plus the window being consumed; flat across epochs (the loader tunes
  glibc malloc once per process so freed chunk buffers are reused: ``hpstore.memory``).
- ``cache_dir`` adds a local-disk tier below the RAM cache for remote stores: raw chunk bytes, at
  most ``cache_disk_bytes``, verified before use, kept across restarts, shareable by processes, and
  evicted by the same plan (``hpstore.loading.disk_cache``).
- ``transforms={"image": hpstore.images.RandomResizedCrop(224)}`` runs a per-field transform on
  each window's rows in the window builders (decode, crop, flip into the batch buffer); the field
  then arrives as a fixed-shape tensor. See ``hpstore/images/README.md``.
- Errors from background work (a corrupt chunk names its object; a vanished object) re-raise in the
  consumer at the batch that needed it; the position stays at the last batch delivered.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from hpstore.counters import Counters
from hpstore.dataset import Dataset
from hpstore.errors import InputError
from hpstore.format.chunks import Chunk
from hpstore.format.manifest import FieldSpec
from hpstore.loading import batch as batching
from hpstore.loading.affinity import resolve_worker_cpus
from hpstore.loading.buffers import BufferPool
from hpstore.loading.cache import ChunkCache, FurthestUsePolicy, Policy
from hpstore.loading.disk_cache import ChunkDiskCache
from hpstore.loading.options import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CACHE_DISK_BYTES,
    DEFAULT_IO_THREADS,
    DEFAULT_PREFETCH_BYTES,
    DEFAULT_SHUFFLE_WINDOW,
    LoaderOptions,
)
from hpstore.loading.plan import EpochPlan, History, PlanSpec, Window
from hpstore.loading.prefetch import Prefetcher, ThreadGroup
from hpstore.loading.workers import ProcessWindows, WorkerPool, WorkerSetup, slot_bytes
from hpstore.memory import keep_freed_memory
from hpstore.storage.base import Range

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CACHE_DISK_BYTES",
    "DEFAULT_IO_THREADS",
    "DEFAULT_PREFETCH_BYTES",
    "DEFAULT_SHUFFLE_WINDOW",
    "Loader",
    "LoaderOptions",
    "LoaderStats",
]

STATE_VERSION = 1
WORKER_IO = ("bytes_read", "read_requests", "read_seconds", "decode_seconds", "gather_seconds", "windows")
"""``LoaderStats`` counters that worker processes keep (``hpstore.loading.workers``)."""
INLINE_BYTES = 64 << 10
"""Chunks stored in fewer bytes are read and decoded on the window's thread, not the io threads."""
PLAN_KEYS = (
    "num_samples",
    "chunk_rows",
    "batch_size",
    "seed",
    "shuffle",
    "drop_last",
    "window_chunks",
    "first_window_chunks",
)
"""State entries that must match the loader a state is loaded into (they define the plan).
``world_size`` may differ (elastic resume); ``first_window_chunks`` is absent from states saved
before the ramp existed, whose plans had none."""


@dataclass
class LoaderStats(Counters):
    """Counters of what the loader did (cumulative over epochs). Cache counters are added in
    ``Loader.stats``."""

    bytes_read: int = 0
    read_requests: int = 0
    read_seconds: float = 0.0
    decode_seconds: float = 0.0
    gather_seconds: float = 0.0
    wait_seconds: float = 0.0
    windows: int = 0
    batches: int = 0
    samples: int = 0
    first_batch_seconds: float = 0.0
    """From the loader's creation to its first batch (set once)."""
    start_seconds: float = 0.0
    """From the latest ``iter`` to its first batch."""

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, else torch.distributed's when it is initialised.

    Explicit values must agree with an initialised process group: a world size that does not would
    give every rank a share of the wrong size, silently skipping or repeating data."""
    import torch.distributed as dist

    live = dist.is_available() and dist.is_initialized()
    if live:
        for name, given, actual in (
            ("world_size", world_size, dist.get_world_size()),
            ("rank", rank, dist.get_rank()),
        ):
            if given is not None and given != actual:
                raise InputError(
                    f"{name}={given} disagrees with the initialised torch.distributed process group "
                    f"({name} {actual}); leave it out to take the group's"
                )
    if world_size is None:
        world_size = dist.get_world_size() if live else 1
    if rank is None:
        rank = dist.get_rank() if live else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is out of range for world size {world_size}")
    return rank, world_size


def _row_bytes(f: FieldSpec, num_samples: int) -> float:
    if f.is_array:
        return np.dtype(f.dtype or "u1").itemsize * float(np.prod(f.shape or ()))
    stored = sum(n for part in f.parts for _, n, _ in part.batches)
    return stored / max(1, num_samples)


class Loader:
    """Batches of one split as dicts of torch tensors; see the module docstring."""

    def __init__(
        self,
        ds: Dataset,
        batch_size: int,
        options: LoaderOptions | None = None,
        *,
        transforms: Mapping[str, batching.FieldTransform] | None = None,
        **changes: Any,
    ) -> None:
        """``options`` (default ``LoaderOptions()``) with ``changes`` applied: any of its fields as
        keyword arguments, e.g. ``Loader(ds, 256, num_workers=2)``."""
        self.created = time.perf_counter()
        self.options = o = LoaderOptions.of(options, **changes)
        self.dataset = ds
        keep_freed_memory()  # reuse chunk buffers instead of faulting in fresh pages (hpstore.memory)
        self.rank, self.world_size = resolve_world(o.rank, o.world_size)
        self.spec = PlanSpec(
            num_samples=len(ds),
            chunk_rows=ds.spec.chunk_rows,
            batch_size=batch_size,
            world_size=self.world_size,
            seed=o.seed,
            shuffle=bool(o.shuffle),
            drop_last=bool(o.drop_last),
            window_chunks=o.shuffle_window,
            first_window_chunks=o.first_window,
        )
        self.fields = {name: ds.spec.fields[name] for name in ds.field_names(o.fields)}
        # Per-field transforms (e.g. hpstore.images.RandomResizedCrop), run by the window builders;
        # objects with state, so a keyword of their own rather than a LoaderOptions field.
        self.transforms = dict(transforms or {})
        unknown = sorted(set(self.transforms) - set(self.fields))
        if unknown:
            raise InputError(f"transforms name fields that are not loaded: {', '.join(unknown)}")
        self.padded_fields = frozenset(
            n for n, f in self.fields.items() if batching.is_padded(f) and n not in self.transforms
        )
        self._check_keys(o.with_index)
        self.num_workers = o.num_workers
        self.prefetch_bytes = o.prefetch_bytes
        self.with_index = o.with_index
        pin_memory = o.pin_memory
        if pin_memory is None:
            import torch

            pin_memory = torch.cuda.is_available()
        self.pin_memory = bool(pin_memory)
        # Enough recycled buffers per kind for every window in flight plus the one being consumed.
        self.buffers = BufferPool(pin=self.pin_memory, limit=o.num_workers + 3)
        self._row_bytes = sum(_row_bytes(f, len(ds)) for f in self.fields.values())
        self._row_bytes += sum(getattr(t, "row_bytes", 0) for t in self.transforms.values())
        self._io = LoaderStats()
        # Optional local-disk tier under the RAM cache (``hpstore.loading.disk_cache``): raw chunk bytes,
        # evicted with the same plan, which it follows through the RAM cache's policy.
        policy: Policy = FurthestUsePolicy()
        self.disk_cache: ChunkDiskCache | None = None
        if o.cache_dir is not None:
            paths = {name: f.path for name, f in ds.spec.fields.items()}
            self.disk_cache = ChunkDiskCache(ds.store.url, paths, o.cache_dir, o.cache_disk_bytes)
            policy = self.disk_cache.follow(policy)
        self.fetcher = ChunkFetcher(ds, self._io, self.disk_cache, o.io_threads)
        # A view whose samples are not stored rows (hpstore.tokens.TokenWindows) names the stored
        # chunks each plan chunk reads and gathers its own rows; a plain split does neither.
        self.view: Any = ds if hasattr(ds, "stored_chunks") else None
        # The cache holds the fetcher, not the loader: no reference cycle, so a dropped loader
        # frees its cache at once instead of at the next full garbage collection (until then
        # each new loader faulted in fresh memory: 1.0-1.3 M vs 1.6-1.9 M samples/s on 28x28).
        self.cache = ChunkCache(o.cache_bytes, self.fetcher, policy=policy)
        plain = self.view is None and not self.transforms
        self.worker_kind = resolve_workers(o.workers, o.num_workers, plain=plain)
        self._pool: WorkerPool | None = None
        if self.worker_kind == "processes" and self.view is not None:
            raise InputError("workers='processes' reads plain splits; use threads for a window view")
        if self.worker_kind == "processes" and self.transforms:
            raise InputError("workers='processes' does not run per-field transforms; use threads")
        if self.worker_kind == "processes":
            self._pool = self._start_pool()  # spawning now: ready by the time batches are asked for
        # The window-building threads, kept from one epoch (run) to the next; they exit when the
        # loader is closed or collected.
        self._threads: ThreadGroup | None = None
        if self.worker_kind == "threads" and o.num_workers:
            self._threads = ThreadGroup(o.num_workers)
            weakref.finalize(self, self._threads.close)
        self._plans: dict[tuple[int, History], EpochPlan] = {}
        self._epoch = 0
        self._step = 0
        self._history: History = ()  # earlier runs of this epoch on other world sizes
        self._run: weakref.ref[_Run] | None = None

    def _start_pool(self) -> WorkerPool:
        o, ds = self.options, self.dataset
        setup = WorkerSetup(
            storage=ds.store.storage,
            manifest=ds.store.manifest,
            split=ds.name,
            fields=tuple(self.fields),
            padded_fields=self.padded_fields,
            spec=self.spec,
            rank=self.rank,
            workers=o.num_workers,
            cache_bytes=o.cache_bytes // o.num_workers,
            io_threads=o.io_threads,
            with_index=o.with_index,
            cache_dir=o.cache_dir,
            cache_disk_bytes=o.cache_disk_bytes,
            fetcher=ChunkFetcher,
            counters=LoaderStats,
            cpus=resolve_worker_cpus(o.worker_cpus),
        )
        return WorkerPool(setup, slot_bytes(self.fields, self.spec.window_rows, o.with_index))

    def _check_keys(self, with_index: bool) -> None:
        keys = list(self.fields)
        keys += [n + batching.LENGTHS_SUFFIX for n in self.padded_fields]
        keys += ["index"] if with_index else []
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise InputError(f"batch keys collide: {', '.join(dup)} (rename the field or drop with_index)")

    # -- the public surface -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.spec.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
            raise InputError(f"epoch must be an integer >= 0, got {epoch!r}")
        if int(epoch) != self._epoch:
            self._close_run()
            self._epoch, self._step, self._history = int(epoch), 0, ()

    @property
    def steps_in_epoch(self) -> int:
        """Batches of the current epoch on this rank: ``len(self)``, except in an epoch resumed on
        another world size (``load_state_dict``), which has the steps of its remainder."""
        if not self._history:
            return len(self)
        return self._plan(self._epoch).steps

    def _plan(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch`` (with this epoch's resume history), memoised: a run plans its own
        epoch and the next (for the cache), so each plan is otherwise built twice (0.13 ms each for
        a store of 12 chunks, a tenth of a small warm epoch)."""
        history = self._history if epoch == self._epoch else ()
        key = (epoch, history)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 4:
                self._plans.clear()
            plan = self._plans[key] = EpochPlan(self.spec, epoch, self.rank, history)
        return plan

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from: ``epoch``, ``step`` (batches of that epoch already
        delivered; ``step == steps_in_epoch`` means the epoch is done and the next ``iter`` starts
        the following one), ``world_size`` and ``history`` (earlier world sizes of this epoch), and
        the plan's inputs, checked on load. The same on every rank, plain JSON."""
        state: dict[str, Any] = {"version": STATE_VERSION, "epoch": self._epoch, "step": self._step}
        state.update({k: getattr(self.spec, k) for k in PLAN_KEYS})
        state["world_size"] = self.world_size
        state["history"] = [list(h) for h in self._history]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``; the next iteration yields exactly the rest of its epoch.

        A state saved on another number of ranks continues elastically: the rest of the interrupted
        epoch is re-planned over this loader's ranks (every remaining sample once across them, the
        same number of steps on each; ``hpstore.loading.plan``, *Elastic resume*), and later epochs
        are ordinary epochs of this world size."""
        missing = [k for k in ("version", "epoch", "step", "world_size", *PLAN_KEYS) if k not in state]
        missing = [k for k in missing if k != "first_window_chunks"]
        if missing:
            raise InputError(f"loader state lacks {', '.join(missing)}")
        if state["version"] != STATE_VERSION:
            raise InputError(f"loader state version {state['version']} is not supported")
        for key in PLAN_KEYS:
            mine = getattr(self.spec, key)
            if state.get(key) != mine:
                raise InputError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has {key}={mine!r}; "
                    "resuming exactly needs the same value"
                )
        try:
            epoch, step, world = int(state["epoch"]), int(state["step"]), int(state["world_size"])
            history: History = tuple((int(w), int(s)) for w, s in state.get("history", ()))
        except (TypeError, ValueError) as exc:
            raise InputError(f"loader state position is malformed: {exc}") from None
        saved = EpochPlan(dataclasses.replace(self.spec, world_size=world), max(epoch, 0), 0, history)
        if epoch < 0 or world < 1 or not 0 <= step <= saved.steps:
            raise InputError(f"loader state position epoch={epoch} step={step} is out of range")
        if world != self.world_size:
            history, step = (*history, (world, step)), 0
        self._close_run()
        self._epoch, self._step, self._history = epoch, step, history

    def start(self) -> None:
        """Start background work now and wait until it is ready: worker processes have opened the
        store (they are started when the loader is created; otherwise the first ``iter`` waits).
        Nothing to wait for with threads."""
        if self.worker_kind == "processes":
            self._workers().start()

    def _workers(self) -> WorkerPool:
        if self._pool is None or self._pool.broken is not None:
            if self._pool is not None:
                self._pool.close()
            self._pool = self._start_pool()
        return self._pool

    @property
    def stats(self) -> dict[str, float]:
        """Bytes read, read requests, chunk hits/misses/evictions, time the consumer waited, ...
        ``index_*``: shard-index reads of the dataset's chunk reader (once per shard, shared by
        every loader of that ``Dataset``), apart from the chunk reads in ``bytes_read``. With worker
        processes: their counters added up, as of the last window received (their shard-index
        reads are not counted)."""
        out = self._io.as_dict()
        out.update(
            index_read_requests=self.fetcher.reader.index_requests,
            index_bytes_read=self.fetcher.reader.index_bytes,
        )
        c = self.cache.stats
        if self._pool is not None:
            done = self._pool.stats()  # the workers' counters; this process's cache is unused
            c = dataclasses.replace(
                c,
                hits=int(done.get("chunk_hits", 0)),
                misses=int(done.get("chunk_misses", 0)),
                hit_bytes=int(done.get("chunk_hit_bytes", 0)),
                fetched_bytes=int(done.get("chunk_fetched_bytes", 0)),
                evictions=int(done.get("evictions", 0)),
                bypassed=int(done.get("cache_bypassed", 0)),
            )
            for k in WORKER_IO:
                out[k] += done.get(k, 0)
        out.update(
            chunk_hits=c.hits,
            chunk_misses=c.misses,
            chunk_ahead=c.ahead,
            chunk_hit_rate=c.hit_rate,
            chunk_hit_bytes=c.hit_bytes,
            chunk_byte_hit_rate=c.byte_hit_rate,
            evictions=c.evictions,
            cache_bypassed=c.bypassed,
            cache_resident_bytes=c.resident_bytes,
            cache_peak_bytes=c.peak_resident_bytes,
        )
        if self.disk_cache is not None:
            out.update({f"disk_{k}": v for k, v in self.disk_cache.stats.as_dict().items()})
        for name, t in self.transforms.items():
            counters = getattr(t, "stats", None)
            if counters is not None:
                out.update({f"{name}_{k}": v for k, v in counters.as_dict().items()})
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._close_run()
        run = _Run(self)
        self._run = weakref.ref(run)
        return run

    def close(self) -> None:
        """Stop background work: an unfinished iteration's (also done on the next ``iter``), the
        read threads and worker processes, and unlink their shared memory (all started again when
        needed)."""
        self._close_run()
        self.fetcher.close()
        if self._threads is not None:
            self._threads.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __repr__(self) -> str:
        return (
            f"Loader({self.dataset.name!r}, batch_size={self.spec.batch_size}, rank={self.rank}/"
            f"{self.world_size}, {len(self)} batches/epoch, epoch={self._epoch}, step={self._step})"
        )

    # -- internals ---------------------------------------------------------------------------------

    def _close_run(self) -> None:
        run = self._run() if self._run is not None else None
        if run is not None:
            run.close()
        self._run = None

    def _stored_chunks(self, plan: EpochPlan, chunks: list[int]) -> list[int]:
        return chunks if self.view is None else self.view.stored_chunks(plan, chunks)

    def _window_cost(self, rows: int) -> int:
        """Bytes a window holds while in flight: its gathered rows, and as much again in chunks."""
        return int(2 * rows * self._row_bytes)


def resolve_workers(kind: str, num_workers: int, *, plain: bool = True) -> str:
    """``"threads"`` or ``"processes"`` for ``LoaderOptions.workers``. ``"auto"`` picks processes
    where they can run (``num_workers >= 1``, a plain split, no per-field transforms): on a quiet
    2-core machine (``python -m benchmarks --only loader``, README) a consumer beside 2 worker
    processes slowed down less than beside 2 threads in all four consumer cases (GIL-holding, 150 k
    samples/s of 28×28: 1.22× vs 1.34×; 20 k/s of 3×64×64: 1.22× vs 1.56×; GIL-releasing: 1.19× vs
    1.22×, 1.16× vs 1.34×). Under contention from other jobs the order flipped in most runs, and
    processes cost a start-up and an interpreter each, which is why the default stays threads."""
    if kind == "auto":
        return "processes" if num_workers >= 1 and plain else "threads"
    return kind


class ChunkFetcher:
    """The loader's I/O, injected into its cache: (field, chunk) keys -> decoded chunks, counted
    in the loader's stats. Holds no reference to the loader."""

    def __init__(
        self, ds: Dataset, io: LoaderStats, disk_cache: ChunkDiskCache | None, io_threads: int
    ) -> None:
        self.reader = ds.reader
        self._io = io
        self.disk_cache = disk_cache
        self.io_threads = io_threads
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._raw_fields: dict[str, bool] = {}

    def __call__(self, keys: list[Any]) -> list[Chunk]:
        """Read and decode chunks ``(field, chunk)``. Backends that keep many requests in flight
        get them in one coalesced call; local files are read and decoded on ``io_threads``
        threads at once (preads and decompression release the GIL)."""
        reader = self.reader
        t0 = time.perf_counter()
        ranges = _ranges_of(reader, keys)
        # Views of mapped local files cost no read, and checking a raw chunk is its CRC32C, which
        # holds the GIL: threads only add hand-offs (3×64×64 raw chunks: 1 thread 71-84 k
        # samples/s, 8 threads 67-70 k), so raw mapped chunks are checked on this thread, while
        # compressed ones (zstd releases the GIL) decode on the io threads meanwhile. Small chunks
        # (a window's labels) cost less to read here than to hand to a thread and back.
        here = {
            i
            for i, ((name, _), (_, a, b)) in enumerate(zip(keys, ranges, strict=True))
            if b - a < INLINE_BYTES or (reader.mapped and self._raw(name))
        }
        pool = self._io_pool() if self.disk_cache is None and len(keys) - len(here) > 1 else None
        if pool is not None:
            away = [
                (i, pool.submit(self._read_one, keys[i], ranges[i]))
                for i in range(len(keys))
                if i not in here
            ]
            done = {i: self._read_one(keys[i], ranges[i]) for i in sorted(here)}
            done.update((i, future.result()) for i, future in away)
            out = [done[i] for i in range(len(keys))]
        else:
            if self.disk_cache is not None:
                raws = self.disk_cache.fetch(keys, ranges, reader.fetch)
            else:
                raws = reader.fetch(ranges)
            t1 = time.perf_counter()
            out = [reader.decode(name, cid, raw) for (name, cid), raw in zip(keys, raws, strict=True)]
            self._io.add(read_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1)
        self._io.add(bytes_read=sum(e - s for _, s, e in ranges), read_requests=len(ranges))
        return out

    def _raw(self, name: str) -> bool:
        """Whether a field's chunks are stored uncompressed (decoding is the checksum alone)."""
        raw = self._raw_fields.get(name)
        if raw is None:
            raw = self._raw_fields[name] = self.reader.field(name).codec.get("name") == "none"
        return raw

    def _read_one(self, key: tuple[str, int], rng: tuple[str, int, int]) -> Chunk:
        reader = self.reader
        t0 = time.perf_counter()
        (raw,) = reader.fetch([rng])
        t1 = time.perf_counter()
        chunk = reader.decode(key[0], key[1], raw)
        self._io.add(read_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1)
        return chunk

    def ahead(self, job: Callable[[], None]) -> None:
        """Run ``job`` (a read-ahead of the cache) on the read-ahead thread, started when needed."""
        with self._pool_lock:
            if self._ahead is None:
                self._ahead = ThreadPoolExecutor(1, thread_name_prefix="hpstore-ahead")
                weakref.finalize(self, self._ahead.shutdown, wait=False)
            self._ahead.submit(job)

    def _io_pool(self) -> ThreadPoolExecutor | None:
        """The read/decode threads, for backends whose ``read_ranges`` is a serial loop."""
        if self.io_threads < 2 or self.reader.storage.capabilities.concurrent_ranges:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="hpstore-io")
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    def close(self) -> None:
        """Stop the read threads (started again when needed)."""
        with self._pool_lock:
            pools = (self._ahead, self._pool)
            self._ahead = self._pool = None
        for pool in pools:  # read-ahead first: its jobs use the read threads
            if pool is not None:
                pool.shutdown(wait=True)


class _Builder:
    """Builds the windows of one run (on prefetch threads). Kept apart from ``_Run`` so the threads
    hold no reference to the iterator: an abandoned iterator is collected and stops them."""

    def __init__(
        self, loader: Loader, plan: EpochPlan, first_window: int, *, only_first: bool = False
    ) -> None:
        self.loader = loader
        self.plan = plan
        self.future: list[tuple[str, int]] = []
        self.first_window = first_window
        self.bases = self._plan_cache(first_window, only_first)
        # Built on the consumer's thread (no window threads): while it works on window j, window
        # j+1's chunks are read and decoded on the fetcher's read-ahead thread, so the consumer,
        # the gather and the decode overlap as they do with window threads.
        self.read_ahead = loader.num_workers == 0 and not only_first

    def _plan_cache(self, first_window: int, only_first: bool) -> dict[int, int]:
        """Give the cache this run's chunk accesses and the next epoch's (so what the next epoch
        starts with is kept), or with ``only_first`` the first window's alone; return where each
        window's accesses start."""
        names = list(self.loader.fields)
        if only_first:
            chunks = self.loader._stored_chunks(self.plan, self.plan.window_chunks(first_window))
            self.loader.cache.plan([(name, c) for c in chunks for name in names])
            return {first_window: 0}
        future = self.future
        bases: dict[int, int] = {}
        for j, chunks in enumerate(self.plan.chunks_by_window(first_window), start=first_window):
            bases[j] = len(future)
            chunks = self.loader._stored_chunks(self.plan, chunks)
            future.extend((name, c) for c in chunks for name in names)
        bases[self.plan.num_windows] = len(future)  # where this run's accesses end
        following = self.loader._plan(self.plan.epoch + 1)
        for chunks in following.chunks_by_window():
            chunks = self.loader._stored_chunks(following, chunks)
            future.extend((name, c) for c in chunks for name in names)
        self.loader.cache.plan(future)
        return bases

    def cost(self, j: int) -> int:
        a, b = self.plan.window_bounds(j)
        return self.loader._window_cost(b - a)

    def build(self, j: int) -> batching.WindowRows:
        loader = self.loader
        window = self.plan.window(j)
        keys = [(name, c) for c in loader._stored_chunks(self.plan, window.chunks) for name in loader.fields]
        base = self.bases[j]
        values = loader.cache.get_many(keys, range(base, base + len(keys)))
        ahead = self.read_ahead and j + 1 < self.plan.num_windows
        # A run's first window is gathered first: its batch is the one waited for, and the
        # read-ahead thread's start and Python would compete with the gather for the GIL.
        if ahead and j != self.first_window:
            self._read_ahead(j + 1)
        rows = self._assemble(window, dict(zip(keys, values, strict=True)))
        if ahead and j == self.first_window:
            self._read_ahead(j + 1)
        return rows

    def _read_ahead(self, j: int) -> None:
        ahead = self.future[self.bases[j] : self.bases[j + 1]]
        self.loader.cache.fetch_ahead(ahead, self.loader.fetcher.ahead)

    def _assemble(self, window: Window, chunks: dict[tuple[str, int], Chunk]) -> batching.WindowRows:
        loader = self.loader
        t0 = time.perf_counter()
        if loader.view is not None:
            rows = loader.view.assemble(
                window,
                self.plan,
                lambda name, c: chunks[(name, c)],
                take=loader.buffers.take,
                with_index=loader.with_index,
                pin=loader.pin_memory,
            )
            loader._io.add(gather_seconds=time.perf_counter() - t0, windows=1)
            return rows
        rows = batching.assemble(
            window,
            loader.fields,
            lambda name, c: chunks[(name, c)],
            take=loader.buffers.take,
            padded_fields=loader.padded_fields,
            with_index=loader.with_index,
            pin=loader.pin_memory,
            transforms=loader.transforms,
            seed=loader.spec.seed,
            epoch=self.plan.epoch,
        )
        loader._io.add(gather_seconds=time.perf_counter() - t0, windows=1)
        return rows


class _FirstHere:
    """A run's windows in process mode: the first built on the consumer's thread (no worker to wait
    for, as threads do: a fresh epoch's first batch waits for one small window, not for a message
    round trip and another process's build), the rest by the worker processes. The workers get
    their jobs as soon as they are ready: before the first window is built when they are started
    (``loader.start()`` or an earlier run; no GIL is shared, so they build the next windows
    meanwhile), else when the consumer asks for the second window."""

    def __init__(self, loader: Loader, plan: EpochPlan, first: int) -> None:
        self.loader = loader
        self.plan = plan
        self.first = first
        self.here = first < plan.num_windows
        self.rest: ProcessWindows | None = None

    def _workers(self) -> ProcessWindows:
        if self.rest is None:
            start = self.first + 1 if self.first < self.plan.num_windows else self.first
            self.rest = self.loader._workers().windows(self.plan, start)
        return self.rest

    def __iter__(self) -> _FirstHere:
        return self

    def __next__(self) -> batching.WindowRows:
        if self.here:
            self.here = False
            pool = self.loader._pool
            if pool is not None and pool.ready and pool.broken is None:
                self._workers()  # on their own CPUs, they start on the next windows meanwhile
            return _Builder(self.loader, self.plan, self.first, only_first=True).build(self.first)
        return next(self._workers())

    def close(self) -> None:
        self.here = False
        if self.rest is not None:
            self.rest.close()


class _Run:
    """One pass from the loader's current position to the end of its epoch."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.started = time.perf_counter()
        plan = loader._plan(loader._epoch)
        first_window, self.skip = plan.start_of(loader._step)
        if loader._step >= plan.steps:  # resumed after the last batch: the rest is empty
            first_window = plan.num_windows
        self.prefetcher: Prefetcher[int, batching.WindowRows] | _FirstHere
        if loader.worker_kind == "processes":
            self.prefetcher = _FirstHere(loader, plan, first_window)
        else:
            builder = _Builder(loader, plan, first_window)
            self.prefetcher = Prefetcher(
                range(first_window, plan.num_windows),
                builder.build,
                workers=loader.num_workers,
                budget_bytes=loader.prefetch_bytes,
                cost=builder.cost,
                inline_first=1,  # the first window on this thread: no thread start or hand-off to wait for
                threads=loader._threads,
            )
        self.current: batching.WindowRows | None = None
        self.k = 0
        self.batches = self.rows = self.size = 0  # of the current window
        self.closed = False
        self.held = isinstance(self.prefetcher, Prefetcher)  # until go() after the first batch

    def __iter__(self) -> _Run:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.closed:
            raise StopIteration
        loader = self.loader
        if self.held and not self.started:  # back after the first batch: the threads may build now
            self.held = False
            if isinstance(self.prefetcher, Prefetcher):
                self.prefetcher.go()
        while self.k >= self.batches:
            t0 = time.perf_counter()
            try:
                self.current = next(self.prefetcher)
            except StopIteration:
                self.close()
                loader._epoch, loader._step, loader._history = loader._epoch + 1, 0, ()
                raise
            except BaseException:
                self.close()
                raise
            finally:
                loader._io.wait_seconds += time.perf_counter() - t0
            self.k, self.skip = self.skip, 0
            # Per window, not per batch: at 16 × 1024 tokens a batch's copy is ~10 µs, so each
            # attribute walk and call saved here shows in tokens/s.
            window = self.current.window
            self.batches, self.rows, self.size = self.current.num_batches, window.rows, window.batch_size
        assert self.current is not None
        out = self.current.batch(self.k)
        first = self.k * self.size
        self.k += 1
        loader._step += 1
        if self.started:
            now = time.perf_counter()
            loader._io.start_seconds = now - self.started
            if not loader._io.batches:
                loader._io.first_batch_seconds = now - loader.created
            self.started = 0.0
        io = loader._io  # counters only this thread writes: no lock (the others are added under it)
        io.batches += 1
        io.samples += min(self.size, self.rows - first)
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.current = None
            self.prefetcher.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _ranges_of(reader: Any, keys: list[Any]) -> list[Range]:
    """The byte range of each ``(field, chunk)`` key, in order. One ``reader.ranges`` call per field,
    so the shard indices a window needs load in one batch of requests (on S3 one round trip,
    not one per shard)."""
    by_field: dict[str, list[int]] = {}
    for name, cid in keys:
        by_field.setdefault(name, []).append(cid)
    found = {name: iter(reader.ranges(name, cids)) for name, cids in by_field.items()}
    return [next(found[name]) for name, _ in keys]
