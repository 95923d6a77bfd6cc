"""Counters: the base of every stage's statistics (storage, caches, loader).

Each stage keeps a dataclass of numbers that many threads bump at once; subclasses declare fields
only. Tests and benchmarks read them through ``as_dict``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass
class Counters:
    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        # Picklable (a loader's storage travels to its worker processes); the lock is not.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, **deltas: float) -> None:
        """Add to several counters at once, atomically with respect to other ``add`` calls."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
