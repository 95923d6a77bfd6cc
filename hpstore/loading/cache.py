"""Cache: decoded chunks kept in RAM under a byte budget, with the eviction policy kept apart.

Two parts with one seam between them:

- a ``Policy`` decides *which* key goes when room is needed and whether a newcomer is worth a place.
  It sees only keys and access positions, never values or bytes, so a local-disk cache (or any other
  store of cached objects) reuses it unchanged;
- ``ChunkCache`` holds values, counts bytes against the budget, and fetches misses through an
  injected ``fetch(keys) -> values`` function (one call per batch of misses, so the caller can
  coalesce the reads). A key being fetched by one thread is waited for, not fetched again, by
  another. ``fetch_ahead`` starts such a fetch on another thread before anyone asks (read-ahead):
  a later ``get_many`` waits for it like for any fetch in flight, and a value the budget does not
  admit is still handed to that one request, so read-ahead never costs a second fetch.

Because the loader's plan knows every future access, ``FurthestUsePolicy`` evicts the resident key
whose next use is furthest ahead (Belady's MIN) and refuses to admit a newcomer needed later than
everything it would displace. Given the access sequence of the current and the next epoch, a cache
holding a fraction ``c`` of the data then hits at least about ``c`` of the next epoch's accesses
(LRU under a fresh permutation each epoch gets ``c + (1-c)·ln(1-c)``: 15% at ``c = 0.5``), and it
degrades smoothly, without a cliff, as the budget shrinks. ``LruPolicy`` is there for comparison.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from hpstore.counters import Counters

NEVER = sys.maxsize
"""Next-use position of a key the known future never touches again."""


class Policy(ABC):
    """Which resident key to evict. Callers serialise calls (the cache holds a lock)."""

    def plan(self, future: Sequence[Hashable]) -> None:  # noqa: B027 (optional hook)
        """The access sequence from now on; ``access`` positions index into it. Policies that do
        not look ahead ignore it."""

    @abstractmethod
    def access(self, key: Hashable, pos: int | None) -> None:
        """``key`` is used now, at position ``pos`` of the planned sequence (``None``: unplanned)."""

    @abstractmethod
    def insert(self, key: Hashable) -> None:
        """``key`` became resident."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """``key`` is no longer resident."""

    @abstractmethod
    def victim(self) -> Hashable | None:
        """The resident key to evict next, or ``None`` when nothing is resident."""

    @abstractmethod
    def keeps(self, key: Hashable, victim: Hashable) -> bool:
        """Whether admitting ``key`` is worth evicting ``victim``."""


class FurthestUsePolicy(Policy):
    """Belady's MIN over a known access sequence: evict what is needed furthest in the future."""

    def __init__(self, future: Sequence[Hashable] = ()) -> None:
        self._resident: set[Hashable] = set()
        self._positions: dict[Hashable, list[int]] = {}
        self._cursor: dict[Hashable, int] = {}
        self._heap: list[tuple[int, int, Hashable]] = []  # (-next_use, tiebreak, key), lazily pruned
        self._tiebreak = itertools.count()
        self.plan(future)

    def plan(self, future: Sequence[Hashable]) -> None:
        positions: dict[Hashable, list[int]] = {}
        for pos, key in enumerate(future):
            positions.setdefault(key, []).append(pos)
        self._positions = positions
        self._cursor = {}
        self._heap = []
        for key in self._resident:
            self._push(key)

    def next_use(self, key: Hashable) -> int:
        uses = self._positions.get(key)
        if uses is None:
            return NEVER
        i = self._cursor.get(key, 0)
        return uses[i] if i < len(uses) else NEVER

    def _push(self, key: Hashable) -> None:
        heapq.heappush(self._heap, (-self.next_use(key), next(self._tiebreak), key))

    def access(self, key: Hashable, pos: int | None) -> None:
        uses = self._positions.get(key)
        if uses is None or pos is None:
            return
        # Threads building neighbouring windows report slightly out of order: never move back.
        self._cursor[key] = max(self._cursor.get(key, 0), bisect.bisect_right(uses, pos))
        if key in self._resident:
            self._push(key)

    def insert(self, key: Hashable) -> None:
        self._resident.add(key)
        self._push(key)

    def remove(self, key: Hashable) -> None:
        self._resident.discard(key)

    def victim(self) -> Hashable | None:
        while self._heap:
            neg, _, key = self._heap[0]
            if key in self._resident and -neg == self.next_use(key):
                return key
            heapq.heappop(self._heap)  # stale: evicted, or its next use has moved
        return None

    def keeps(self, key: Hashable, victim: Hashable) -> bool:
        return self.next_use(key) < self.next_use(victim)


class LruPolicy(Policy):
    """Least recently used (what most loaders do); admits everything."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def access(self, key: Hashable, pos: int | None) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key: Hashable) -> None:
        self._order[key] = None

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def keeps(self, key: Hashable, victim: Hashable) -> bool:
        return True


@dataclass
class CacheStats(Counters):
    """``hits`` counts requests served without a fetch (resident, or already being fetched by
    another thread); ``misses`` the keys fetched; ``bypassed`` fetched keys not admitted."""

    hits: int = 0
    misses: int = 0
    ahead: int = 0
    """Of ``misses``: keys fetched by ``fetch_ahead`` before they were asked for."""
    evictions: int = 0
    bypassed: int = 0
    hit_bytes: int = 0
    fetched_bytes: int = 0
    fetch_seconds: float = 0.0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def byte_hit_rate(self) -> float:
        """Fraction of the bytes asked for that came without a fetch (small fields weigh little)."""
        total = self.hit_bytes + self.fetched_bytes
        return self.hit_bytes / total if total else 0.0


def nbytes(value: Any) -> int:
    """Bytes a cached value holds (numpy arrays and Arrow arrays both say)."""
    return int(getattr(value, "nbytes", 0) or sys.getsizeof(value))


class ChunkCache:
    """Values by key under ``budget_bytes``; misses fetched via ``fetch`` in one call per request."""

    def __init__(
        self,
        budget_bytes: int,
        fetch: Callable[[list[Hashable]], Sequence[Any]],
        *,
        policy: Policy | None = None,
        size_of: Callable[[Any], int] = nbytes,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.policy = policy if policy is not None else FurthestUsePolicy()
        self.stats = CacheStats()
        self._fetch = fetch
        self._size_of = size_of
        self._values: dict[Hashable, tuple[Any, int]] = {}
        self._inflight: dict[Hashable, Future[Any]] = {}
        self._ahead: dict[Hashable, Any] = {}  # fetched ahead, not admitted: kept for one request
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def plan(self, future: Sequence[Hashable]) -> None:
        """Tell the policy the access sequence from now on (positions restart at 0); what was
        fetched ahead for the old sequence and not admitted is dropped."""
        with self._lock:
            self.policy.plan(future)
            self._ahead.clear()

    def get_many(self, keys: Sequence[Hashable], positions: Sequence[int | None] | None = None) -> list[Any]:
        """Values of ``keys``; ``positions`` places each access in the planned sequence."""
        pos = list(positions) if positions is not None else [None] * len(keys)
        found: dict[Hashable, Any] = {}
        waits: dict[Hashable, Future[Any]] = {}
        mine: list[Hashable] = []
        with self._lock:
            for key, p in zip(keys, pos, strict=True):
                self.policy.access(key, p)
                if key in found or key in waits:
                    continue
                if key in self._values:
                    value, size = self._values[key]
                    found[key] = value
                    self.stats.add(hits=1, hit_bytes=size)
                elif key in self._ahead:
                    found[key] = value = self._ahead.pop(key)
                    self.stats.add(hits=1, hit_bytes=self._size_of(value))
                elif key in self._inflight:
                    waits[key] = self._inflight[key]
                    self.stats.add(hits=1)
                else:
                    self._inflight[key] = Future()
                    mine.append(key)
        if mine:
            found.update(self._load(mine))
        for key, fut in waits.items():
            found[key] = fut.result()  # re-raises the fetching thread's error
            self.stats.add(hit_bytes=self._size_of(found[key]))
        if waits and self._ahead:
            with self._lock:
                for key in waits:
                    self._ahead.pop(key, None)  # handed over through the future
        return [found[key] for key in keys]

    def fetch_ahead(self, keys: Sequence[Hashable], submit: Callable[[Callable[[], None]], Any]) -> int:
        """Start fetching the ``keys`` that are neither resident nor in flight, in one call run by
        ``submit`` (e.g. an executor's), and return how many. Errors reach the requests that wait
        for those keys; a key nobody has asked for yet is fetched again by its request."""
        mine: list[Hashable] = []
        with self._lock:
            for key in keys:
                if key not in self._values and key not in self._inflight and key not in self._ahead:
                    self._inflight[key] = Future()
                    mine.append(key)
        if mine:

            def load() -> None:
                try:
                    self._load(mine, ahead=True)
                except BaseException:  # handed to the waiting requests by _load
                    pass

            submit(load)
        return len(mine)

    def _load(self, keys: list[Hashable], *, ahead: bool = False) -> dict[Hashable, Any]:
        t0 = time.perf_counter()
        try:
            values = list(self._fetch(keys))
            if len(values) != len(keys):
                raise RuntimeError(f"fetch returned {len(values)} values for {len(keys)} keys")
        except BaseException as exc:
            with self._lock:
                for key in keys:
                    self._inflight.pop(key).set_exception(exc)
            raise
        sizes = [self._size_of(v) for v in values]
        self.stats.add(
            misses=len(keys),
            ahead=len(keys) if ahead else 0,
            fetched_bytes=sum(sizes),
            fetch_seconds=time.perf_counter() - t0,
        )
        with self._lock:
            for key, value, size in zip(keys, values, sizes, strict=True):
                if not self._admit(key, value, size) and ahead:
                    self._ahead[key] = value
                self._inflight.pop(key).set_result(value)
        return dict(zip(keys, values, strict=True))

    def _admit(self, key: Hashable, value: Any, size: int) -> bool:
        """Make room by evicting what the policy ranks below ``key``; bypass if there is not enough.
        Whether ``key`` is resident now."""
        resident = self.stats.resident_bytes
        admitted = True
        while resident + size > self.budget_bytes:
            victim = self.policy.victim()
            if victim is None or not self.policy.keeps(key, victim):
                admitted = False
                break
            resident -= self._values.pop(victim)[1]
            self.policy.remove(victim)
            self.stats.add(evictions=1)
        if admitted:
            self._values[key] = (value, size)
            self.policy.insert(key)
            resident += size
        else:
            self.stats.add(bypassed=1)
        self.stats.add(
            resident_bytes=resident - self.stats.resident_bytes,
            peak_resident_bytes=max(0, resident - self.stats.peak_resident_bytes),
        )
        return admitted

    def clear(self) -> None:
        with self._lock:
            for key in list(self._values):
                self.policy.remove(key)
            self._values.clear()
            self._ahead.clear()
            self.stats.add(resident_bytes=-self.stats.resident_bytes)
