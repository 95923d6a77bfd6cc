"""Buffers: window-sized arrays recycled once nothing references them any more.

Gathering a window writes tens of megabytes; into freshly allocated memory that costs a page fault
per 4 KiB on first touch, which measured slower than the gather itself. The pool hands out arrays
it keeps, and takes one back only when its reference count shows that no batch tensor, view or slice
of it is alive (``torch.from_numpy`` and numpy views all hold a reference to the owning array), so a
user who keeps a batch keeps its memory, and recycling never overwrites data someone can still see.

Not used for shared-memory buffers handed to another process, which may still read them after this
process lets go.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import torch

_IDLE_REFS = 2
"""``sys.getrefcount(pool_list[i])`` of an array referenced only by the pool's list."""


class BufferPool:
    """Arrays by ``(shape, dtype)``; at most ``limit`` of each kind are kept for reuse."""

    def __init__(self, *, pin: bool = False, limit: int = 8) -> None:
        self.pin = pin
        self.limit = limit
        self.allocated = 0
        self.reused = 0
        self._arrays: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """An uninitialised array nobody else references."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            kept = self._arrays.setdefault(key, [])
            for i in range(len(kept)):
                if sys.getrefcount(kept[i]) == _IDLE_REFS:
                    arr = kept.pop(i)
                    kept.append(arr)  # most recently used last
                    self.reused += 1
                    return arr
            arr = self._new(shape, np.dtype(dtype))
            kept.append(arr)
            if len(kept) > self.limit:
                del kept[0]  # forget the oldest; whoever still holds it keeps it alive
            self.allocated += 1
            return arr

    def _new(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        if not self.pin:
            return np.empty(shape, dtype=dtype)
        like = torch.from_numpy(np.empty(0, dtype=dtype))
        return torch.empty(shape, dtype=like.dtype, pin_memory=True).numpy()

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()
