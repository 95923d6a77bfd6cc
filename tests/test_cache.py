"""The chunk cache and its policies, driven by an in-memory fetch function and asserted on counters."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpstore.loading.cache import ChunkCache, FurthestUsePolicy, LruPolicy, Policy


class Source:
    """An in-memory fetch function that counts what it was asked for."""

    def __init__(self, size: int = 100, delay: float = 0.0, fail: set[Hashable] | None = None) -> None:
        self.size = size
        self.delay = delay
        self.fail = fail or set()
        self.calls: list[list[Hashable]] = []
        self.lock = threading.Lock()

    def __call__(self, keys: list[Hashable]) -> list[np.ndarray]:
        with self.lock:
            self.calls.append(list(keys))
        time.sleep(self.delay)
        bad = [k for k in keys if k in self.fail]
        if bad:
            raise OSError(f"cannot read {bad[0]}")
        return [np.full(self.size, hash(k) % 251, dtype=np.uint8) for k in keys]

    @property
    def fetched(self) -> list[Any]:
        return [k for call in self.calls for k in call]


def run(cache: ChunkCache, sequence: list[int]) -> None:
    for pos, key in enumerate(sequence):
        (value,) = cache.get_many([key], [pos])
        assert value[0] == hash(key) % 251


def optimal_misses(sequence: list[int], capacity: int) -> int:
    """Belady's MIN by brute force over the sequence (small cases), counting misses."""
    resident: set[int] = set()
    misses = 0
    for i, key in enumerate(sequence):
        if key in resident:
            continue
        misses += 1
        if capacity == 0:
            continue
        if len(resident) < capacity:
            resident.add(key)
            continue
        rest = sequence[i + 1 :]

        def next_use(k: int, rest: list[int] = rest) -> int:
            return rest.index(k) if k in rest else len(rest) + 1

        worst = max(resident, key=next_use)
        if next_use(worst) > next_use(key):
            resident.remove(worst)
            resident.add(key)
    return misses


@settings(max_examples=80, deadline=None)
@given(
    sequence=st.lists(st.integers(0, 12), min_size=1, max_size=80),
    capacity=st.integers(0, 8),
)
def test_furthest_use_is_optimal_and_respects_the_budget(sequence: list[int], capacity: int) -> None:
    src = Source(size=100)
    cache = ChunkCache(capacity * 100, src, policy=FurthestUsePolicy())
    cache.plan(sequence)
    for pos, key in enumerate(sequence):
        cache.get_many([key], [pos])
        assert cache.stats.resident_bytes <= capacity * 100
        assert cache.stats.resident_bytes == len(cache) * 100
    assert cache.stats.misses == optimal_misses(sequence, capacity) == len(src.fetched)
    assert cache.stats.hits + cache.stats.misses == len(sequence)
    assert cache.stats.peak_resident_bytes <= capacity * 100


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_known_future_hits_the_cached_fraction_where_lru_does_not(fraction: float) -> None:
    """Fresh permutations each epoch (what a shuffled loader asks for): the clairvoyant cache hits
    at least about the cached fraction from the second epoch on; LRU gets c + (1-c)ln(1-c)."""
    n, epochs = 400, 4
    rng = np.random.default_rng(0)
    orders = [rng.permutation(n).tolist() for _ in range(epochs + 1)]
    rates = {}
    for name, policy in (("future", FurthestUsePolicy()), ("lru", LruPolicy())):
        cache = ChunkCache(int(fraction * n) * 100, Source(size=100), policy=policy)
        per_epoch = []
        for e in range(epochs):
            cache.plan(orders[e] + orders[e + 1])  # this epoch and the next, as the loader does
            before = cache.stats.hits
            run(cache, orders[e])
            per_epoch.append((cache.stats.hits - before) / n)
        rates[name] = min(per_epoch[1:])
    assert rates["future"] >= fraction - 0.02
    lru = fraction + (1 - fraction) * np.log(1 - fraction)
    assert rates["lru"] < lru + 0.08
    assert rates["future"] > rates["lru"] + 0.1


def test_concurrent_requests_for_one_key_fetch_it_once() -> None:
    src = Source(delay=0.05)
    cache = ChunkCache(10_000, src)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.extend(cache.get_many([7, 8]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(src.fetched) == [7, 8]
    assert len(results) == 8
    assert cache.stats.misses == 2 and cache.stats.hits == 6


def test_fetch_errors_reach_every_waiter_and_are_not_cached() -> None:
    src = Source(delay=0.05, fail={3})
    cache = ChunkCache(10_000, src)
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            cache.get_many([3])
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all("cannot read 3" in str(e) for e in errors)
    assert 3 not in cache
    src.fail.clear()
    assert cache.get_many([3])[0][0] == hash(3) % 251


def test_zero_budget_caches_nothing_and_oversized_values_bypass() -> None:
    cache = ChunkCache(0, Source(size=100))
    run(cache, [1, 1, 1])
    assert len(cache) == 0 and cache.stats.misses == 3 and cache.stats.bypassed == 3
    small = ChunkCache(50, Source(size=100))
    run(small, [1, 2])
    assert len(small) == 0 and small.stats.bypassed == 2


def test_keys_never_used_again_are_evicted_first_and_newcomers_needed_later_bypass() -> None:
    src = Source(size=100)
    cache = ChunkCache(200, src)
    cache.plan([1, 2, 3, 1, 2])
    run(cache, [1, 2])  # both resident, both needed again
    cache.get_many([3], [2])  # 3 is never needed again: not admitted, nothing evicted
    assert 1 in cache and 2 in cache and 3 not in cache
    assert cache.stats.bypassed == 1 and cache.stats.evictions == 0
    cache.get_many([1, 2], [3, 4])
    assert cache.stats.hits == 2


def test_lru_evicts_the_least_recently_used() -> None:
    cache = ChunkCache(200, Source(size=100), policy=LruPolicy())
    run(cache, [1, 2, 1, 3])
    assert 1 in cache and 3 in cache and 2 not in cache
    assert cache.stats.evictions == 1


def test_policies_share_one_interface() -> None:
    for policy in (FurthestUsePolicy(), LruPolicy()):
        assert isinstance(policy, Policy)
        policy.plan(["a", "b"])
        policy.access("a", 0)
        policy.insert("a")
        assert policy.victim() == "a"
        policy.remove("a")
        assert policy.victim() is None


@pytest.mark.parametrize("budget", [0, 10_000])
def test_keys_fetched_ahead_are_fetched_once_on_the_other_thread_even_when_not_admitted(budget: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    src = Source(delay=0.05)
    cache = ChunkCache(budget, src)
    cache.plan(["a", "b", "c"])
    threads: list[str] = []

    def submit(job: Any) -> Any:
        def named() -> None:
            threads.append(threading.current_thread().name)
            job()

        return pool.submit(named)

    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as pool:
        assert cache.fetch_ahead(["b", "c"], submit) == 2
        assert cache.fetch_ahead(["b", "c"], submit) == 0  # already in flight: not started twice
        a, b, c = cache.get_many(["a", "b", "c"], [0, 1, 2])  # b and c: waited for, not fetched again
    assert [a[0], b[0], c[0]] == [hash(k) % 251 for k in "abc"]
    assert sorted(src.fetched) == ["a", "b", "c"] and ["b", "c"] in src.calls
    assert threads == ["ahead_0"]
    assert cache.stats.ahead == 2 and cache.stats.misses == 3 and cache.stats.hits == 2
    assert ("b" in cache) is (budget > 0)
    (b,) = cache.get_many(["b"])  # once handed over, a value the budget refused is gone
    assert len(src.fetched) == (3 if budget else 4)


def test_a_failed_fetch_ahead_raises_in_the_request_that_waits_for_it() -> None:
    gate = threading.Event()
    src = Source(fail={"x"})
    cache = ChunkCache(10_000, lambda keys: gate.wait(10) and src(keys))  # type: ignore[arg-type, return-value]
    ahead: list[threading.Thread] = []

    def submit(job: Any) -> None:
        ahead.append(threading.Thread(target=job))
        ahead[-1].start()

    errors: list[BaseException] = []

    def request() -> None:
        try:
            cache.get_many(["x"])
        except OSError as exc:
            errors.append(exc)

    cache.fetch_ahead(["x"], submit)
    waiter = threading.Thread(target=request)
    waiter.start()
    deadline = time.monotonic() + 10
    while cache.stats.hits == 0 and time.monotonic() < deadline:  # the request waits on the fetch
        time.sleep(0.001)
    gate.set()
    waiter.join()
    ahead[0].join()
    assert [str(e) for e in errors] == ["cannot read x"]
    assert "x" not in cache and src.fetched == ["x"]  # the failure reached the waiter: no refetch
