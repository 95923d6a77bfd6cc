"""Storages that wrap a Storage to add one cross-cutting behaviour each.

``RetryingStorage`` retries transient failures with jittered exponential backoff;
``LatencyStorage`` adds a fixed delay per request (benchmarks and tests of latency hiding).
Both keep the wrapped storage's counters and add their own (``retries``, ``failures``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hpstore.errors import ObjectNotFoundError, StorageError
from hpstore.storage import Range, Storage

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.05
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def is_permanent(exc: BaseException) -> bool:
    """Errors no retry can cure: missing objects, bad credentials, missing buckets."""
    if isinstance(exc, ObjectNotFoundError | FileNotFoundError | PermissionError):
        return True
    text = str(exc)
    return any(
        s in text for s in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    )


class RetryingStorage(Storage):
    def __init__(self, inner: Storage, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.url = inner.url
        self.stats = inner.stats

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.policy.attempts):
            try:
                return fn()
            except Exception as exc:
                if is_permanent(exc):
                    raise
                if attempt + 1 == self.policy.attempts:
                    self.stats.add(failures=1)
                    raise StorageError(
                        f"{self.url}: {what} failed after {self.policy.attempts} attempts: {exc}"
                    ) from exc
                self.stats.add(retries=1)
                time.sleep(self.policy.delay(attempt))
        raise AssertionError("unreachable")

    def read(self, key: str) -> bytes:
        return self._call(f"read {key}", lambda: self.inner.read(key))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._call(f"read {key}[{start}:{end}]", lambda: self.inner.read_range(key, start, end))

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        return self._call(f"read of {len(ranges)} ranges", lambda: self.inner.read_ranges(ranges))

    def write(self, key: str, data: bytes | memoryview) -> None:
        self._call(f"write {key}", lambda: self.inner.write(key, data))

    def size(self, key: str) -> int:
        return self._call(f"stat {key}", lambda: self.inner.size(key))

    def list(self, prefix: str = "") -> dict[str, int]:
        return self._call(f"list {prefix or '/'}", lambda: self.inner.list(prefix))

    def delete_prefix(self, prefix: str) -> None:
        self._call(f"delete {prefix}", lambda: self.inner.delete_prefix(prefix))


class LatencyStorage(Storage):
    """Adds ``seconds`` to every request; ``read_ranges`` pays it once per batch of ranges,
    as concurrent requests would."""

    def __init__(self, inner: Storage, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds
        self.url = inner.url
        self.stats = inner.stats

    def read(self, key: str) -> bytes:
        time.sleep(self.seconds)
        return self.inner.read(key)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        time.sleep(self.seconds)
        return self.inner.read_range(key, start, end)

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        time.sleep(self.seconds)
        return self.inner.read_ranges(ranges)

    def write(self, key: str, data: bytes | memoryview) -> None:
        time.sleep(self.seconds)
        self.inner.write(key, data)

    def size(self, key: str) -> int:
        time.sleep(self.seconds)
        return self.inner.size(key)

    def list(self, prefix: str = "") -> dict[str, int]:
        time.sleep(self.seconds)
        return self.inner.list(prefix)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)
