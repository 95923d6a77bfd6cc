"""The prefetcher: order, byte budget, errors surfacing in the consumer, clean shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from hpstore.loading.prefetch import Prefetcher, ThreadGroup


class Jobs:
    """Jobs that record how much work is in flight at once."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.002) -> None:
        self.fail_at = fail_at
        self.delay = delay
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, i: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(i)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        if i == self.fail_at:
            raise ValueError(f"job {i} failed")
        return i * i


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_come_in_order_within_the_budget(workers: int) -> None:
    jobs = Jobs()
    p = Prefetcher(range(40), jobs, workers=workers, budget_bytes=300, cost=lambda i: 100)
    assert list(p) == [i * i for i in range(40)]
    assert p.stats.jobs == 40
    assert p.stats.peak_inflight_bytes <= 300
    assert sorted(jobs.started) == list(range(40))
    p.close()
    assert p.alive_threads == 0


def test_a_job_larger_than_the_budget_still_runs_alone() -> None:
    p = Prefetcher(range(5), Jobs(), workers=2, budget_bytes=10, cost=lambda i: 1000)
    assert list(p) == [0, 1, 4, 9, 16]
    assert p.stats.peak_inflight_bytes == 1000


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_reraises_at_its_job_and_nothing_hangs(workers: int) -> None:
    p = Prefetcher(range(30), Jobs(fail_at=7), workers=workers, budget_bytes=500, cost=lambda i: 100)
    got = []
    with pytest.raises(ValueError, match="job 7 failed"):
        for v in p:
            got.append(v)
    assert got == [i * i for i in range(7)]
    p.close()
    assert p.alive_threads == 0


def test_close_mid_stream_joins_threads_and_drops_results() -> None:
    jobs = Jobs(delay=0.01)
    p = Prefetcher(range(1000), jobs, workers=3, budget_bytes=400, cost=lambda i: 100)
    assert next(p) == 0
    p.close()
    assert p.alive_threads == 0
    assert len(jobs.started) < 20  # the budget stopped it from running far ahead
    with pytest.raises(RuntimeError, match="closed"):
        next(p)


@pytest.mark.parametrize("workers", [1, 3])
def test_inline_first_jobs_run_on_the_consumer_and_threads_start_at_go(workers: int) -> None:
    jobs = Jobs()
    names: list[str] = []

    def produce(i: int) -> int:
        names.append(threading.current_thread().name)
        return jobs(i)

    p = Prefetcher(range(12), produce, workers=workers, budget_bytes=300, cost=lambda i: 100, inline_first=2)
    assert next(p) == 0 and next(p) == 1
    assert names == [threading.current_thread().name] * 2
    assert p.alive_threads == 0 and jobs.started == [0, 1]  # nothing ran ahead before go()
    p.go()
    assert list(p) == [i * i for i in range(2, 12)]
    assert all(n.startswith("hpstore-prefetch") for n in names[2:])
    assert sorted(jobs.started) == list(range(12))
    p.close()
    assert p.alive_threads == 0


def test_inline_first_without_go_starts_threads_when_their_job_is_asked_for() -> None:
    p = Prefetcher(range(6), Jobs(), workers=2, budget_bytes=1000, cost=lambda i: 1, inline_first=1)
    assert list(p) == [i * i for i in range(6)]
    p.close()
    unstarted = Prefetcher(range(6), Jobs(), workers=2, budget_bytes=1000, cost=lambda i: 1, inline_first=1)
    unstarted.close()  # never started: closing joins nothing and does not hang
    unstarted.go()  # after close: starts nothing
    assert unstarted.alive_threads == 0


def test_an_inline_first_job_that_fails_raises_and_starts_no_threads() -> None:
    p = Prefetcher(range(6), Jobs(fail_at=0), workers=2, budget_bytes=1000, cost=lambda i: 1, inline_first=1)
    with pytest.raises(ValueError, match="job 0 failed"):
        next(p)
    p.close()
    assert p.alive_threads == 0


def _group_threads(name: str) -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(name)}


def test_a_thread_group_keeps_its_threads_across_prefetchers_until_one_is_cut_short() -> None:
    import gc
    import weakref

    name = "hpstore-prefetch-kept"
    group = ThreadGroup(2, name=name)
    for _ in range(3):  # successive runs (a loader's epochs) on the same two threads
        jobs = Jobs()
        p = Prefetcher(range(20), jobs, workers=2, budget_bytes=300, cost=lambda i: 100, threads=group)
        assert list(p) == [i * i for i in range(20)]
        p.close()
        assert p.alive_threads == 0 and sorted(jobs.started) == list(range(20))
        assert _group_threads(name) == {f"{name}-0", f"{name}-1"}
    # An idle thread holds no reference to the last job it ran (a loader must be collectable).
    held = Jobs()
    ref = weakref.ref(held)
    p = Prefetcher(range(3), held, workers=2, budget_bytes=300, cost=lambda i: 100, threads=group)
    assert list(p) == [0, 1, 4]
    p.close()
    del p, held
    gc.collect()
    assert ref() is None
    # Cut short (abandoned mid-way, or failed): the group's threads stop, and start again if needed.
    p = Prefetcher(range(30), Jobs(), workers=2, budget_bytes=300, cost=lambda i: 100, threads=group)
    next(p)
    p.close()
    assert not _group_threads(name)
    p = Prefetcher(range(30), Jobs(fail_at=3), workers=2, budget_bytes=300, cost=lambda i: 100, threads=group)
    with pytest.raises(ValueError, match="job 3 failed"):
        list(p)
    p.close()
    assert not _group_threads(name)
    p = Prefetcher(range(5), Jobs(), workers=2, budget_bytes=300, cost=lambda i: 100, threads=group)
    assert list(p) == [0, 1, 4, 9, 16]
    p.close()
    group.close(join=True)
    assert not _group_threads(name)
