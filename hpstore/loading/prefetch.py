"""Prefetcher: runs a known sequence of jobs ahead of the consumer, on background threads, within a
byte budget, and hands the results back in order.

The loader's jobs are shuffle windows (read, decode and gather the rows of one window). Because the
plan lists them in advance, prefetch is exact: job ``i`` is started only when everything before it
has been started, and only while the jobs started but not yet released by the consumer cost at most
``budget_bytes`` in total. One job is always allowed when nothing else is outstanding, so a job
larger than the budget slows things down but never deadlocks.

Hazards handled here, and tested:

- an exception in a job re-raises in the consumer when it reaches that job (never a silent hang, never
  a short epoch); after an error no new jobs start;
- ``close()`` stops the threads and joins them (a job already running is allowed to finish), so an
  abandoned epoch leaves no threads behind; consumers should call it (the loader does, on exhaustion,
  on error, and when an abandoned iterator is collected);
- a consumer waiting on a job whose threads have all died raises instead of waiting forever;
- a program that exits mid-epoch without closing its loader: at interpreter exit every live
  prefetcher is closed before the interpreter stops its daemon threads. Python 3.11 stops a daemon
  thread that wakes inside C code during finalization with ``pthread_exit``, whose forced unwind
  through C++ frames aborts the process ("terminate called without an active exception", SIGABRT).

``threads=ThreadGroup(n)`` runs the workers on threads kept across prefetchers (a loader's epochs)
instead of starting ``workers`` new ones for each: ``Thread.start`` returns only once the new thread
has been scheduled and has taken the GIL, which the consumer waited for at the start of every epoch
(0.2 ms for two threads on a quiet 2-core machine; 5-14 ms measured on a loaded one, while a
worker already building held the GIL).

``workers=0`` runs every job inline in the consumer's thread, with the same interface.
``inline_first=k`` runs the first ``k`` jobs inline too; the threads start on the jobs after them
at ``go()`` (or when the consumer asks for a job of theirs): a fresh loader's first window then
never waits for a thread to be scheduled and hand its result over, nor competes with threads
running Python for the GIL (each hand-back of the GIL can cost a switch interval, 5 ms). The loader
calls ``go()`` when the consumer comes back for its second batch.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

J = TypeVar("J")
T = TypeVar("T")

_POLL_SECONDS = 1.0
"""How often a waiting consumer checks that the threads it waits on are still alive."""

_LIVE: weakref.WeakSet[Prefetcher[Any, Any]] = weakref.WeakSet()
"""Prefetchers with threads, closed at interpreter exit (see the module docstring)."""
_LIVE_GROUPS: weakref.WeakSet[ThreadGroup] = weakref.WeakSet()
"""Thread groups with threads, closed and joined at interpreter exit."""


@atexit.register
def _close_live_prefetchers() -> None:
    for p in list(_LIVE):
        p.close()
    for g in list(_LIVE_GROUPS):
        g.close(join=True)


_IN_LOOP = threading.local()
"""``owner``: the prefetcher whose worker loop this group thread is running."""


@dataclass
class PrefetchStats:
    wait_seconds: float = 0.0
    jobs: int = 0
    peak_inflight_bytes: int = 0


class ThreadGroup:
    """Daemon threads that run tasks one after another, started on first use and kept until
    ``close`` (see the module docstring). Holds no reference to a task once it has run. A
    prefetcher closed before its last job was taken (an error, an abandoned or replaced iteration)
    closes its group too, so no thread outlives work that was cut short; at interpreter exit every
    group is closed and its threads joined, like the prefetchers' own threads."""

    def __init__(self, size: int, name: str = "hpstore-prefetch") -> None:
        if size < 1:
            raise ValueError(f"a thread group needs at least one thread, got {size}")
        self.size = size
        self.name = name
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[Callable[[], object] | None] | None = None
        self._threads: list[threading.Thread] = []

    def run(self, task: Callable[[], object]) -> None:
        """Run ``task`` on the next free thread of the group."""
        with self._lock:
            if self._tasks is None:
                self._tasks = queue.SimpleQueue()
                self._threads = [
                    threading.Thread(target=_serve, args=(self._tasks,), name=f"{self.name}-{i}", daemon=True)
                    for i in range(self.size)
                ]
                for t in self._threads:
                    t.start()
                _LIVE_GROUPS.add(self)
            self._tasks.put(task)

    def close(self, *, join: bool = False) -> None:
        """Let the threads exit once their tasks are done (and with ``join`` wait for that); new
        ones start if ``run`` is called again."""
        with self._lock:
            tasks, self._tasks = self._tasks, None
            threads, self._threads = self._threads, []
        if tasks is not None:
            for _ in threads:
                tasks.put(None)
        if join:
            me = threading.current_thread()
            for t in threads:
                if t is not me:
                    t.join()


def _serve(tasks: queue.SimpleQueue[Callable[[], object] | None]) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        task()
        del task  # an idle thread must not keep the last task (and what it references) alive


class Prefetcher(Generic[J, T]):
    """``iter(Prefetcher(jobs, produce, ...))`` yields ``produce(job)`` for each job, in order."""

    def __init__(
        self,
        jobs: Sequence[J],
        produce: Callable[[J], T],
        *,
        workers: int,
        budget_bytes: int,
        cost: Callable[[J], int],
        name: str = "hpstore-prefetch",
        inline_first: int = 0,
        threads: ThreadGroup | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if inline_first < 0:
            raise ValueError(f"inline_first must be >= 0, got {inline_first}")
        self._jobs = jobs
        self._produce = produce
        self._cost = cost
        self._budget = budget_bytes
        self.stats = PrefetchStats()
        self._cond = threading.Condition()
        self._results: dict[int, tuple[bool, object]] = {}
        self._costs: dict[int, int] = {}
        self._next_job = 0  # next job a thread may claim
        self._next_out = 0  # next result the consumer takes
        self._inflight = 0  # cost of claimed jobs not yet released by the consumer
        self._stop = False
        self._failed = False
        self._group = threads if workers else None
        self._workers = workers
        self._running = 0  # worker loops handed to the group and not yet returned
        self._threads = (
            []
            if self._group is not None
            else [
                threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
            ]
        )
        self._inline_first = min(inline_first, len(jobs)) if workers else 0
        self._started = False
        if not self._inline_first:
            self._start()

    def go(self) -> None:
        """Start the threads now, on the jobs after the ``inline_first`` ones (idempotent)."""
        with self._cond:
            if self._stop:
                return
            self._next_job = max(self._next_job, self._inline_first)
        self._start()

    def _start(self) -> None:
        if self._started or not self._workers:
            return
        self._started = True
        if self._group is not None:
            with self._cond:
                self._running = self._workers
            for _ in range(self._workers):
                self._group.run(self._work_in_group)
        for t in self._threads:
            t.start()
        _LIVE.add(self)

    # -- background side ---------------------------------------------------------------------------

    def _claim(self) -> int | None:
        with self._cond:
            while True:
                if self._stop or self._failed or self._next_job >= len(self._jobs):
                    return None
                i = self._next_job
                c = self._cost(self._jobs[i])
                if self._inflight == 0 or self._inflight + c <= self._budget:
                    self._next_job += 1
                    self._costs[i] = c
                    self._inflight += c
                    self.stats.peak_inflight_bytes = max(self.stats.peak_inflight_bytes, self._inflight)
                    return i
                self._cond.wait()

    def _work_in_group(self) -> None:
        _IN_LOOP.owner = self
        try:
            self._work()
        finally:
            _IN_LOOP.owner = None
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _work(self) -> None:
        while (i := self._claim()) is not None:
            try:
                result: tuple[bool, object] = (True, self._produce(self._jobs[i]))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                result = (False, exc)
            with self._cond:
                self._results[i] = result
                self._failed = self._failed or not result[0]
                self._cond.notify_all()

    # -- consumer side -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        with self._cond:
            self._release()
            if self._stop:
                raise RuntimeError("prefetcher is closed")
            if self._next_out >= len(self._jobs):
                raise StopIteration
            i = self._next_out
            inline = not self._workers or i < self._inline_first
            if inline:
                self._next_job, self._costs[i] = i + 1, 0
        t0 = time.perf_counter()
        if inline:
            ok, value = self._inline(i)
        else:
            self._start()
            ok, value = self._wait(i)
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.jobs += 1
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def _inline(self, i: int) -> tuple[bool, object]:
        self._next_out = i + 1
        try:
            return True, self._produce(self._jobs[i])
        except BaseException as exc:
            return False, exc

    def _wait(self, i: int) -> tuple[bool, object]:
        with self._cond:
            while i not in self._results:
                if not self.alive_threads:
                    raise RuntimeError(f"prefetch threads exited before job {i} finished")
                self._cond.wait(_POLL_SECONDS)
            self._next_out = i + 1
            return self._results.pop(i)

    def _release(self) -> None:
        """Free the budget of the result the consumer has finished with (the previous one)."""
        done = self._next_out - 1
        if done in self._costs:
            self._inflight -= self._costs.pop(done)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop starting jobs, wait for the running ones, drop unconsumed results. Idempotent."""
        with self._cond:
            first, self._stop = not self._stop, True
            self._results.clear()
            self._cond.notify_all()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me and self._started:
                t.join()
        if self._group is not None and self._started and first:
            mine = 1 if getattr(_IN_LOOP, "owner", None) is self else 0  # closed from a job of its own
            with self._cond:  # the group's threads run this prefetcher's loops: wait for them to return
                while self._running > mine:
                    self._cond.wait(_POLL_SECONDS)
                cut_short = self._failed or self._next_out < len(self._jobs)
            if cut_short:
                self._group.close(join=True)

    @property
    def alive_threads(self) -> int:
        """Worker loops still running (threads still alive, without a group)."""
        if self._group is not None:
            return self._running
        return sum(t.is_alive() for t in self._threads)

    def __enter__(self) -> Prefetcher[J, T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
