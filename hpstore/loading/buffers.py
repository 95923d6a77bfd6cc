"""Buffers: window-sized arrays recycled once nothing references them any more.

Gathering a window writes tens of megabytes; into freshly allocated memory that costs a page fault
per 4 KiB on first touch, which measured slower than the gather itself. The pool hands out arrays
it keeps, and takes one back only when its reference count shows that no batch tensor, view or slice
of it is alive (``torch.from_numpy`` and numpy views all hold a reference to the owning array), so a
user who keeps a batch keeps its memory, and recycling never overwrites data someone can still see.

Pinned buffers are not recycled here: a batch copied to the GPU with ``non_blocking=True`` may
still be read by the copy engine after the last Python reference is gone. They come from torch's
caching host allocator instead, which reuses a pinned block only after the copies recorded on it
have finished (and so costs no page faults either). Nor is the pool used for shared-memory buffers
handed to another process, which may still read them after this process lets go.
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
    """Arrays by ``(shape, dtype)``; at most ``limit`` of each kind are kept for reuse. With
    ``pin=True`` every array is pinned, from torch's caching host allocator (see above)."""

    def __init__(self, *, pin: bool = False, limit: int = 8) -> None:
        self.pin = pin
        self.limit = limit
        self.allocated = 0
        self.reused = 0
        self._arrays: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor:
        """An uninitialised tensor whose memory nobody else references."""
        if self.pin:
            # The tensor itself, not a numpy view of it: copies record their events on its block.
            like = torch.from_numpy(np.empty(0, dtype=dtype))
            self.allocated += 1
            return torch.empty(tuple(shape), dtype=like.dtype, pin_memory=True)
        return torch.from_numpy(self._array(shape, dtype))

    def _array(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            kept = self._arrays.setdefault(key, [])
            for i in range(len(kept)):
                if sys.getrefcount(kept[i]) == _IDLE_REFS:
                    arr = kept.pop(i)
                    kept.append(arr)  # most recently used last
                    self.reused += 1
                    return arr
            arr = np.empty(shape, dtype=dtype)
            kept.append(arr)
            if len(kept) > self.limit:
                del kept[0]  # forget the oldest; whoever still holds it keeps it alive
            self.allocated += 1
            return arr

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()
