"""Worker processes: windows built in other interpreters, handed over in shared memory.

``Loader(ds, 256, num_workers=2, workers="processes")`` starts ``num_workers`` processes (spawned once
per loader, when it is created; ``loader.start()`` waits until they are ready) that live as long as
the loader, across epochs. Each owns a share of every run's windows but the first (which the
consumer builds itself: ``hpstore.loading.loader._FirstHere``), assigned round-robin
(``plan.assign``), and builds them exactly as thread mode does — plan slicing, chunk reads through
its own storage handle, checksum, decode, its own chunk cache planned with its own windows, gather
(``batch.assemble``) — except that the gathered rows land in a slot of the loader's shared-memory
ring (``hpstore.loading.ring``). The consumer process sends each worker small job messages
(``window j into slot s``) and receives small answers (where each column lies in the slot); it then
lends the slot out as tensors, no copy. Its own interpreter does no reading, decoding or gathering,
so a training thread that holds the GIL competes with nobody for it.

The output is the same as thread mode's, batch for batch (windows depend on the plan only), and
``state_dict`` / ``load_state_dict`` behave identically (the position is kept by the loader, not
here).

Hazards handled here, and tested:

- an exception in a worker re-raises in the consumer at the window that needed it, with its type
  and message (a copy of the worker's traceback is attached as a note); exceptions that cannot be
  pickled arrive as ``WorkerError`` carrying the original type name and message;
- a worker that dies (killed, crashed) is noticed while the consumer waits on it: ``WorkerError``
  names it and its exit code, never a hang; the loader starts fresh workers at the next ``iter``;
- an abandoned run cancels its queued jobs (workers answer them as skipped) and waits only for
  windows already being built, so no worker ever writes into a slot the next run reuses;
- ``close()`` (also on garbage collection and at interpreter exit) stops the workers and unlinks
  every shared-memory file.

Variable-length (Arrow) fields travel pickled in the answer (not in shared memory); fixed-shape
fields and ``index`` travel in the slot. Batches are not pinned (``ring``).

Memory: ``cache_bytes`` is split between the workers (each caches the chunks of its own windows; a
chunk read by windows of two workers is read twice); the ring holds ``2 * num_workers + 2`` slots
of one full window each (``2 * num_workers`` of them made, and their pages touched by the workers,
before the workers report ready), plus one more for every window a consumer keeps alive.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from hpstore.errors import HpstoreError, InputError
from hpstore.format.manifest import FieldSpec, Manifest
from hpstore.loading import batch as batching
from hpstore.loading.affinity import pin_this_process
from hpstore.loading.plan import EpochPlan, History, PlanSpec, Window, assign
from hpstore.loading.ring import Mapped, Ring, Slot, align
from hpstore.storage.base import Storage

START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
"""Not ``fork``: the consumer process may hold threads (its own, torch's), which ``fork`` would copy
in whatever state their locks were. The fork server is one clean process, started once per consumer
process, that has imported this module (and torch) already, so each loader's workers start in a
fraction of a second instead of the several seconds a fresh interpreter takes to import torch."""


class WorkerError(HpstoreError, RuntimeError):
    """A loader worker process died, or raised an exception that could not be sent as itself."""


@dataclass(frozen=True, kw_only=True)
class WorkerSetup:
    """What a worker process needs to build any window of any run (pickled once, at start)."""

    storage: Storage
    manifest: Manifest
    split: str
    fields: tuple[str, ...]
    padded_fields: frozenset[str]
    spec: PlanSpec
    rank: int
    workers: int
    cache_bytes: int
    io_threads: int
    with_index: bool
    cache_dir: str | None
    cache_disk_bytes: int
    fetcher: Callable[..., Any]
    """The loader's ``ChunkFetcher`` (class, pickled by name): injected, so this module does not
    import the loader that imports it."""
    counters: Callable[[], Any]
    """The loader's ``LoaderStats`` class."""
    cpus: tuple[int, ...] | None = None
    """CPUs the workers are pinned to (``hpstore.loading.affinity``); ``None``: not pinned."""


def slot_bytes(fields: dict[str, FieldSpec], rows: int, with_index: bool) -> int:
    """Bytes one slot needs for a window of ``rows`` rows (fixed-shape fields and index)."""
    total = 0
    for f in fields.values():
        if f.is_array:
            total += align(rows * np.dtype(f.dtype or "u1").itemsize * math.prod(f.shape or ()))
    return total + (align(rows * 8) if with_index else 0)


# -- the consumer's side -------------------------------------------------------------------------------


class WorkerPool:
    """The loader's worker processes and its ring; ``windows`` runs one pass over a plan."""

    def __init__(self, setup: WorkerSetup, slot_bytes: int) -> None:
        self.setup = setup
        self.num_workers = setup.workers
        self.ring = Ring(slot_bytes)
        self.max_slots = 2 * setup.workers + 2
        self.totals: list[dict[str, float]] = [{} for _ in range(setup.workers)]
        self.broken: str | None = None
        self._ready = False
        self._runs = 0
        ctx: Any = mp.get_context(START_METHOD)
        if START_METHOD == "forkserver":
            ctx.set_forkserver_preload([__name__])
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        # The slots a run's first jobs go to, made now and touched by the workers before they say
        # they are ready, so no window waits for its slot's pages to be allocated.
        first = [(slot.path, slot.size) for slot in self.ring.reserve(2 * setup.workers)]
        try:
            for i in range(setup.workers):
                mine, theirs = ctx.Pipe(duplex=True)
                warm = first[i :: setup.workers]
                p = ctx.Process(
                    target=serve, args=(theirs, i, setup, warm), name=f"hpstore-worker-{i}", daemon=True
                )
                p.start()
                theirs.close()
                self.procs.append(p)
                self.conns.append(mine)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _stop(self.procs, self.conns)
            self.ring.close()
            raise InputError(f"worker processes need a picklable storage: {exc}") from None
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)

    @property
    def ready(self) -> bool:
        """Whether every worker has opened the store (``start`` has returned)."""
        return self._ready

    def start(self) -> None:
        """Wait until every worker has opened the store (raises what a worker could not do)."""
        if self._ready:
            return
        for i in range(self.num_workers):
            msg = self.recv(i, "starting")
            if msg[0] == "failed":
                self.broken = "a worker failed to start"
                raise _unpack(msg[1], i)
        self._ready = True

    def windows(self, plan: EpochPlan, first: int) -> ProcessWindows:
        self.start()
        self._runs += 1
        return ProcessWindows(self, plan, first, self._runs)

    def send(self, i: int, msg: tuple[Any, ...]) -> None:
        try:
            self.conns[i].send(msg)
        except OSError:
            self.recv(i, "receiving a job")  # reports the dead worker
            raise

    def recv(self, i: int, doing: str) -> tuple[Any, ...]:
        """The next answer of worker ``i``; ``WorkerError`` if it died instead."""
        conn, proc = self.conns[i], self.procs[i]
        while True:
            ready = wait([conn, proc.sentinel])
            if conn in ready or conn.poll():
                try:
                    msg: tuple[Any, ...] = conn.recv()
                    return msg
                except (EOFError, OSError):
                    pass
            proc.join(0.1)
            if proc.exitcode is not None or proc.sentinel in ready:
                self.broken = f"loader worker process {i} (pid {proc.pid}) exited with code {proc.exitcode}"
                raise WorkerError(f"{self.broken} while {doing}")

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.totals:
            for k, v in t.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        """Stop the workers and unlink the ring's files. Idempotent."""
        self._finalizer()
        self.ring.close()


def _stop(procs: list[BaseProcess], conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except OSError:
            pass
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()


class ProcessWindows:
    """One run's windows, in order, as ``WindowRows`` over ring slots (the interface of
    ``Prefetcher``: ``next`` and ``close``)."""

    def __init__(self, pool: WorkerPool, plan: EpochPlan, first: int, run: int) -> None:
        self.pool = pool
        self.plan = plan
        self.first = first
        self.run = run
        self.end = plan.num_windows
        self.next_job = first
        self.next_out = first
        self.pending: deque[tuple[int, Slot]] = deque()
        self.closed = False
        self.limit = 2 * pool.num_workers
        self.slot_bytes = pool.ring.slot_bytes
        for i in range(pool.num_workers):
            pool.send(i, ("run", run, plan.epoch, plan.history, first))
        self._fill(grow=False)

    def _fill(self, *, grow: bool) -> None:
        """Hand free slots to the workers for the next windows, up to ``limit`` in flight."""
        pool, ring = self.pool, self.pool.ring
        while self.next_job < self.end and len(self.pending) < self.limit:
            slot = ring.take(self.slot_bytes, grow=grow or len(ring.slots) < pool.max_slots)
            if slot is None:
                return
            j = self.next_job
            pool.send(assign(j, self.first, pool.num_workers), ("build", self.run, j, slot.path, slot.size))
            self.pending.append((j, slot))
            self.next_job += 1
            grow = False

    def __iter__(self) -> ProcessWindows:
        return self

    def __next__(self) -> batching.WindowRows:
        if self.closed:
            raise RuntimeError("worker run is closed")
        if self.next_out >= self.end:
            raise StopIteration
        if not self.pending:  # every slot is held by batches still alive: make another
            self._fill(grow=True)
        j, slot = self.pending.popleft()
        w = assign(j, self.first, self.pool.num_workers)
        msg = self.pool.recv(w, f"building window {j}")
        if msg[0] != "done":
            self.pool.ring.give_back(slot)
            if msg[0] == "error":
                raise _unpack(msg[3], w)
            self.pool.broken = f"loader worker process {w} failed"
            raise _unpack(msg[1], w) if msg[0] == "crashed" else WorkerError(f"unexpected answer {msg[0]}")
        _, run, jj, layout, variable, index, used, totals = msg
        assert (run, jj) == (self.run, j), f"answer for run {run} window {jj}, expected {self.run} {j}"
        self.pool.totals[w] = totals
        self.next_out += 1
        rows = self._rows(j, self.pool.ring.lend(slot, used), layout, variable, index)
        self._fill(grow=False)
        return rows

    def _rows(
        self, j: int, view: np.ndarray, layout: dict[str, Any], variable: dict[str, Any], index: Any
    ) -> batching.WindowRows:
        columns: dict[str, Any] = {}
        for name in self.pool.setup.fields:
            columns[name] = _tensor(view, *layout[name]) if name in layout else variable[name]
        spec = self.plan.spec
        # Bounds only: the rows were permuted by the worker, so this window keeps no ``order``.
        window = Window(
            index=j,
            first_step=spec.first_step(j),
            pieces=self.plan.window_pieces(j),
            order=None,
            chunk_rows=spec.chunk_rows,
            batch_size=spec.batch_size,
        )
        idx = _tensor(view, *index) if index is not None else None
        return batching.WindowRows(window, columns, self.pool.setup.padded_fields, index=idx, pin=False)

    def close(self) -> None:
        """Cancel queued jobs and wait for the ones being built (so no slot is written later)."""
        if self.closed:
            return
        self.closed = True
        pool = self.pool
        if pool.broken is None:
            for i in {assign(j, self.first, pool.num_workers) for j, _ in self.pending}:
                try:
                    pool.send(i, ("cancel", self.run))
                except (OSError, WorkerError):
                    break
        while self.pending and pool.broken is None:
            j, slot = self.pending[0]
            try:
                pool.recv(assign(j, self.first, pool.num_workers), f"finishing window {j}")
            except WorkerError:
                break
            self.pending.popleft()
            pool.ring.give_back(slot)
        self.pending.clear()


def _tensor(flat: np.ndarray, offset: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """A view of the lent slot (it references ``flat``, which marks the slot in use)."""
    dt = np.dtype(dtype)
    return torch.from_numpy(flat[offset : offset + math.prod(shape) * dt.itemsize].view(dt).reshape(shape))


# -- exceptions across the process boundary ----------------------------------------------------------


def _pack(exc: BaseException) -> tuple[bytes | None, str, str]:
    """``(pickled exception or None, "Type: message", traceback)``."""
    tb = "".join(traceback.format_exception(exc))
    text = f"{type(exc).__name__}: {exc}"
    try:
        raw = pickle.dumps(exc)
        pickle.loads(raw)  # an exception whose __init__ does not match its args fails here
        data: bytes | None = raw
    except Exception:
        data = None
    return data, text, tb


def _unpack(packed: tuple[bytes | None, str, str], worker: int) -> BaseException:
    data, text, tb = packed
    if data is not None:
        exc: BaseException = pickle.loads(data)
    else:
        exc = WorkerError(text)
    exc.add_note(f"raised in loader worker process {worker}:\n{tb}")
    return exc


# -- the worker's side ---------------------------------------------------------------------------------


def serve(conn: Connection, index: int, setup: WorkerSetup, warm: list[tuple[str, int]]) -> None:
    """A worker process's loop: answer ``run`` / ``build`` / ``cancel`` / ``stop`` messages in order.
    ``warm``: slots to map and touch before saying it is ready."""
    torch.set_num_threads(1)  # the consumer's cores are not ours to oversubscribe
    try:
        pin_this_process(setup.cpus)  # before any thread starts: the io threads inherit it
        builder = _WorkerBuilder(index, setup)
        for path, size in warm:
            builder.mapped.warm(path, size)
    except BaseException as exc:
        conn.send(("failed", _pack(exc)))
        return
    conn.send(("ready", os.getpid()))
    try:
        _loop(conn, builder)
    except Exception as exc:  # a bug here, not in a window: tell the consumer, then exit
        try:
            conn.send(("crashed", _pack(exc)))
        except OSError:
            pass
        raise


def _loop(conn: Connection, builder: _WorkerBuilder) -> None:
    pending: deque[tuple[Any, ...]] = deque()
    cancelled: set[int] = set()
    while True:
        try:
            if not pending:
                pending.append(conn.recv())
            while conn.poll():  # read ahead: a cancel skips the jobs queued before it
                pending.append(conn.recv())
        except (EOFError, OSError):
            return  # the consumer has gone
        cancelled.update(m[1] for m in pending if m[0] == "cancel")
        msg = pending.popleft()
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "run":
            builder.start_run(*msg[2:])
        elif kind == "build":
            _, run, j, path, size = msg
            if run in cancelled:
                reply: tuple[Any, ...] = ("skip", run, j)
            else:
                try:
                    reply = ("done", run, j, *builder.build(j, path, size))
                except Exception as exc:
                    reply = ("error", run, j, _pack(exc))
            conn.send(reply)


class _Allocator:
    """``take`` for ``batch.assemble``: tensors laid out one after another in a slot's mapping."""

    def __init__(self, mapping: Any) -> None:
        self.mapping = mapping
        self.offset = 0
        self.placed: dict[int, tuple[int, tuple[int, ...], str]] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor:
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        if self.offset + n > len(self.mapping):
            raise RuntimeError(f"window needs more than the slot's {len(self.mapping)} bytes")
        arr = np.ndarray(shape, dtype=dtype, buffer=self.mapping, offset=self.offset)
        t = torch.from_numpy(arr)
        self.placed[t.data_ptr()] = (self.offset, tuple(shape), dtype.str)
        self.offset = align(self.offset + n)
        return t


class _WorkerBuilder:
    """One worker's reader, cache and plan; builds the windows assigned to it."""

    def __init__(self, index: int, setup: WorkerSetup) -> None:
        from hpstore.dataset import Store
        from hpstore.loading.cache import ChunkCache, FurthestUsePolicy, Policy
        from hpstore.loading.disk_cache import ChunkDiskCache
        from hpstore.memory import keep_freed_memory

        keep_freed_memory()
        self.index = index
        self.setup = setup
        ds = Store(setup.storage, setup.manifest).split(setup.split)
        self.fields = {name: ds.spec.fields[name] for name in setup.fields}
        self.io = setup.counters()
        policy: Policy = FurthestUsePolicy()
        disk = None
        if setup.cache_dir is not None:
            paths = {name: f.path for name, f in ds.spec.fields.items()}
            disk = ChunkDiskCache(ds.store.url, paths, setup.cache_dir, setup.cache_disk_bytes)
            policy = disk.follow(policy)
        self.cache = ChunkCache(
            setup.cache_bytes, setup.fetcher(ds, self.io, disk, setup.io_threads), policy=policy
        )
        self.mapped = Mapped()
        self.plan: EpochPlan | None = None
        self.bases: dict[int, int] = {}

    def start_run(self, epoch: int, history: History, first: int) -> None:
        """Plan this worker's cache: its windows of this run, then its share of the next epoch."""
        s = self.setup
        self.plan = EpochPlan(s.spec, epoch, s.rank, history)
        names = list(self.fields)
        future: list[tuple[str, int]] = []
        self.bases = {}
        for j, chunks in enumerate(self.plan.chunks_by_window(first), start=first):
            if assign(j, first, s.workers) == self.index:
                self.bases[j] = len(future)
                future.extend((name, c) for c in chunks for name in names)
        following = EpochPlan(s.spec, epoch + 1, s.rank)
        for j, chunks in enumerate(following.chunks_by_window()):
            if assign(j, 0, s.workers) == self.index:
                future.extend((name, c) for c in chunks for name in names)
        self.cache.plan(future)

    def build(self, j: int, path: str, size: int) -> tuple[Any, ...]:
        """Window ``j`` into the slot at ``path``: ``(layout, variable columns, index, bytes used,
        counters)``."""
        import time

        assert self.plan is not None, "build before run"
        window = self.plan.window(j)
        keys = [(name, c) for c in window.chunks for name in self.fields]
        base = self.bases[j]
        values = self.cache.get_many(keys, range(base, base + len(keys)))
        chunks = dict(zip(keys, values, strict=True))
        t0 = time.perf_counter()
        alloc = _Allocator(self.mapped.get(path, size))
        rows = batching.assemble(
            window,
            self.fields,
            lambda name, c: chunks[(name, c)],
            take=alloc.take,
            padded_fields=self.setup.padded_fields,
            with_index=self.setup.with_index,
        )
        self.io.add(gather_seconds=time.perf_counter() - t0, windows=1)
        layout = {}
        variable = {}
        for name, col in rows.columns.items():
            if isinstance(col, torch.Tensor):
                layout[name] = alloc.placed[col.data_ptr()]
            else:
                variable[name] = col
        index = alloc.placed[rows.index.data_ptr()] if rows.index is not None else None
        return layout, variable, index, alloc.offset, self._totals()

    def _totals(self) -> dict[str, float]:
        c = self.cache.stats
        io = self.io
        return {
            "bytes_read": io.bytes_read,
            "read_requests": io.read_requests,
            "read_seconds": io.read_seconds,
            "decode_seconds": io.decode_seconds,
            "gather_seconds": io.gather_seconds,
            "windows": io.windows,
            "chunk_hits": c.hits,
            "chunk_misses": c.misses,
            "chunk_hit_bytes": c.hit_bytes,
            "chunk_fetched_bytes": c.fetched_bytes,
            "evictions": c.evictions,
            "cache_bypassed": c.bypassed,
        }
