"""Storages that wrap a Storage to add one cross-cutting behaviour each.

``RetryingStorage`` retries transient failures with jittered exponential backoff;
``LatencyStorage`` adds a fixed delay per request (benchmarks and tests of latency hiding).
Both keep the wrapped storage's counters and add their own (``retries``, ``failures``,
``retry_wait_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from hpstore.errors import HpstoreError, StorageError
from hpstore.storage.base import Capabilities, ObjectSink, Range, Storage, raise_first
from hpstore.storage.failures import RetryPolicy, is_transient

__all__ = ["ForwardingStorage", "LatencyStorage", "RetryPolicy", "RetryingStorage", "is_transient"]

T = TypeVar("T")


class ForwardingStorage(Storage):
    """Passes every call of the contract to ``inner``, capabilities included: subclass it and
    override only the behaviour you add. ``tests/test_storage.py`` fails when a method of the
    contract is not forwarded here, so a method added to ``Storage`` later cannot be silently
    served by the base class's default behind a wrapper."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url
        self.stats = inner.stats

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    def read(self, key: str) -> bytes:
        return self.inner.read(key)

    def read_into(self, key: str, out: memoryview) -> int:
        return self.inner.read_into(key, out)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self.inner.read_range(key, start, end)

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        return self.inner.read_ranges(ranges)

    def read_ranges_each(self, ranges: Sequence[Range]) -> list[bytes | BaseException]:
        return self.inner.read_ranges_each(ranges)

    def view_range(self, key: str, start: int, end: int) -> memoryview | None:
        # No views through a wrapper: what it adds to reads (latency, faults, retries, records)
        # would be bypassed by a view of the inner backend's mapping; callers then read.
        return None

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self.inner.write(key, data, durable=durable)

    def open_sink(self, key: str, *, durable: bool = True) -> ObjectSink:
        return self.inner.open_sink(key, durable=durable)

    def create(self, key: str, data: bytes) -> bool:
        return self.inner.create(key, data)

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        self.inner.overwrite(key, data)

    def move_prefix(self, src: str, dst: str) -> bool:
        return self.inner.move_prefix(src, dst)

    def sync(self) -> None:
        self.inner.sync()

    def is_scratch(self, key: str) -> bool:
        return self.inner.is_scratch(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str = "") -> dict[str, int]:
        return self.inner.list(prefix)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)


class RetryingStorage(ForwardingStorage):
    """Retries transient failures; permanent ones raise at once. ``read_ranges`` repeats only the
    ranges that failed, so one flaky request out of a hundred in flight costs one request."""

    def __init__(self, inner: Storage, policy: RetryPolicy | None = None) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()

    def _backoff(self, attempt: int, requests: int) -> None:
        wait = self.policy.delay(attempt)
        self.stats.add(retries=requests, retry_wait_seconds=wait)
        time.sleep(wait)

    def _gave_up(self, what: str, key: str, exc: BaseException) -> StorageError:
        self.stats.add(failures=1)
        # Remote backends' messages already name the object; others get the location added.
        text = str(exc) if isinstance(exc, HpstoreError) else f"{self.url}/{key}: {exc}"
        return StorageError(f"{text} ({what} failed after {self.policy.attempts} attempts)")

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.policy.attempts):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt + 1 == self.policy.attempts:
                    raise self._gave_up(what, key, exc) from None
                self._backoff(attempt, 1)
        raise AssertionError("unreachable")

    def read(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.inner.read(key))

    def read_into(self, key: str, out: memoryview) -> int:
        return self._call("read", key, lambda: self.inner.read_into(key, out))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self.read_ranges([(key, start, end)])[0]

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        return raise_first(self._read_ranges(ranges, stop_on_permanent=True))

    def read_ranges_each(self, ranges: Sequence[Range]) -> list[bytes | BaseException]:
        return self._read_ranges(ranges, stop_on_permanent=False)

    def _read_ranges(
        self, ranges: Sequence[Range], *, stop_on_permanent: bool
    ) -> list[bytes | BaseException]:
        results: list[bytes | BaseException] = [b""] * len(ranges)
        pending = list(range(len(ranges)))
        for attempt in range(self.policy.attempts):
            got = self.inner.read_ranges_each([ranges[i] for i in pending])
            failed: list[int] = []
            for i, r in zip(pending, got, strict=True):
                results[i] = r
                if isinstance(r, BaseException):
                    if not is_transient(r):
                        if stop_on_permanent:
                            raise r
                    else:
                        failed.append(i)
            pending = failed
            if not pending:
                return results
            if attempt + 1 < self.policy.attempts:
                self._backoff(attempt, len(pending))
        for i in pending:
            key, start, end = ranges[i]
            last = results[i]
            assert isinstance(last, BaseException)
            results[i] = self._gave_up(f"read of bytes [{start}:{end}]", key, last)
        return results

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self._call("write", key, lambda: self.inner.write(key, data, durable=durable))

    def open_sink(self, key: str, *, durable: bool = True) -> ObjectSink:
        # A stream cannot be replayed after a failed request: the pieces are kept and committed
        # with one retried ``write``.
        return ObjectSink(self, key, durable=durable)

    def create(self, key: str, data: bytes) -> bool:
        # A retried create whose first attempt landed answers False: the caller reads the object
        # back to see that it is its own (see ``Storage.create``).
        return self._call("create", key, lambda: self.inner.create(key, data))

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        self._call("write", key, lambda: self.inner.overwrite(key, data))

    def size(self, key: str) -> int:
        return self._call("stat", key, lambda: self.inner.size(key))

    def list(self, prefix: str = "") -> dict[str, int]:
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def delete_prefix(self, prefix: str) -> None:
        self._call("delete", prefix, lambda: self.inner.delete_prefix(prefix))


class LatencyStorage(ForwardingStorage):
    """Adds ``seconds`` to every request; ``read_ranges`` pays it once per batch of ranges,
    as concurrent requests would."""

    def __init__(self, inner: Storage, seconds: float) -> None:
        super().__init__(inner)
        self.seconds = seconds

    def _wait(self) -> None:
        time.sleep(self.seconds)

    def read(self, key: str) -> bytes:
        self._wait()
        return self.inner.read(key)

    def read_into(self, key: str, out: memoryview) -> int:
        self._wait()
        return self.inner.read_into(key, out)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        self._wait()
        return self.inner.read_range(key, start, end)

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        self._wait()
        return self.inner.read_ranges(ranges)

    def read_ranges_each(self, ranges: Sequence[Range]) -> list[bytes | BaseException]:
        self._wait()
        return self.inner.read_ranges_each(ranges)

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self._wait()
        self.inner.write(key, data, durable=durable)

    def create(self, key: str, data: bytes) -> bool:
        self._wait()
        return self.inner.create(key, data)

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        self._wait()
        self.inner.overwrite(key, data)

    def move_prefix(self, src: str, dst: str) -> bool:
        self._wait()
        return self.inner.move_prefix(src, dst)

    def size(self, key: str) -> int:
        self._wait()
        return self.inner.size(key)

    def list(self, prefix: str = "") -> dict[str, int]:
        self._wait()
        return self.inner.list(prefix)

    def delete_prefix(self, prefix: str) -> None:
        self._wait()
        self.inner.delete_prefix(prefix)
