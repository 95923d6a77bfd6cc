"""Ring: reusable shared-memory slots that worker processes fill with windows and the consumer lends
out as tensors, without a copy and without a file descriptor or a pickle per batch.

Each slot is one file in ``/dev/shm`` (tmpfs; the system temp directory where there is none),
created by the consumer process, mapped once by it and once by each worker that writes into it, and
reused window after window. A window's columns are views of the slot's mapping, handed to the
consumer as tensors (``torch.from_numpy`` over views of one numpy array of the mapping).

When is a slot free again? A window is lent out through a fresh flat numpy array over the slot; every
column is a view of it and every tensor, view or slice built from those keeps it alive (numpy views
reference it as their ``base``; torch views share a storage that holds the numpy view), so the slot
is free exactly when that array's reference count shows the ring's own reference only. (Not a
``memoryview``: ``np.frombuffer`` takes a buffer of its own and does not keep the one it was given.) A consumer that keeps a
batch therefore keeps its slot, and the ring makes another slot rather than overwrite data someone
can still see (``BufferPool`` follows the same rule for thread mode).

Cleanup (tested): ``close()`` unlinks every slot file at once; the mappings themselves go when the
last tensor over them goes. ``close`` also runs when the ring is garbage-collected and at
interpreter exit. Only a consumer process killed outright (SIGKILL) can leave files behind; their
names (``hpstore-<pid>-...``) say which process made them.

Not pinned: a slot is pageable memory. ``.to("cuda", non_blocking=True)`` from it is safe (the copy
is synchronous for pageable memory); registering slots with CUDA would also need an event per slot
before reuse, which is not done here.
"""

from __future__ import annotations

import mmap
import os
import secrets
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

ALIGN = 64
"""Columns start on cache-line boundaries within a slot."""

_IDLE_REFS = 2
"""``sys.getrefcount(slot.lent)``: the slot's own reference plus the call's argument."""

PREFIX = "hpstore-"


def shm_dir() -> str:
    """Where slot files live: tmpfs when the system has it."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)
class Slot:
    index: int
    path: str
    size: int
    mapping: mmap.mmap
    lent: np.ndarray | None = field(default=None, repr=False)
    busy: bool = False
    """Handed to a worker and not yet returned (a job in flight, or its answer not yet taken)."""


class Ring:
    """Slots of at least ``slot_bytes`` each, created on demand (see the module docstring)."""

    def __init__(self, slot_bytes: int, *, directory: str | None = None) -> None:
        self.slot_bytes = max(ALIGN, align(slot_bytes))
        self.directory = directory or shm_dir()
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.slots: list[Slot] = []
        self.created_bytes = 0
        self._lock = threading.Lock()
        self._paths: list[str] = []
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)

    def reserve(self, count: int) -> list[Slot]:
        """Create slots (free) until there are ``count``; the new ones."""
        with self._lock:
            return [self._create(self.slot_bytes) for _ in range(count - len(self.slots))]

    def take(self, nbytes: int, *, grow: bool) -> Slot | None:
        """A slot nobody uses (not in flight, no tensor over it alive) of at least ``nbytes``;
        a new one when there is none and ``grow``, else ``None``."""
        with self._lock:
            for slot in self.slots:
                if not slot.busy and slot.size >= nbytes and self._idle(slot):
                    slot.busy, slot.lent = True, None
                    return slot
            if not grow:
                return None
            slot = self._create(max(self.slot_bytes, align(nbytes)))
            slot.busy = True
            return slot

    @staticmethod
    def _idle(slot: Slot) -> bool:
        return slot.lent is None or sys.getrefcount(slot.lent) == _IDLE_REFS

    def _create(self, size: int) -> Slot:
        path = os.path.join(self.directory, f"{self.tag}-{len(self.slots)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._paths.append(path)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slot = Slot(len(self.slots), path, size, mapping)
        self.slots.append(slot)
        self.created_bytes += size
        return slot

    def lend(self, slot: Slot, nbytes: int) -> np.ndarray:
        """The slot's first ``nbytes`` as a fresh flat ``uint8`` array whose lifetime (its views' and
        their tensors') marks the slot in use."""
        with self._lock:
            slot.busy = False
            slot.lent = np.frombuffer(slot.mapping, dtype=np.uint8, count=nbytes)
            return slot.lent

    def give_back(self, slot: Slot) -> None:
        """Return a slot whose job produced nothing to lend (skipped, failed)."""
        with self._lock:
            slot.busy, slot.lent = False, None

    def close(self) -> None:
        """Unlink every slot file now; mappings still viewed by live tensors stay valid until those
        go. Idempotent."""
        with self._lock:
            self._finalizer()
            for slot in self.slots:
                slot.lent = None
                try:
                    slot.mapping.close()
                except BufferError:  # a tensor still views it: unmapped when that tensor dies
                    pass
            self.slots.clear()


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    paths.clear()


class Mapped:
    """A worker's mappings of the slots it has been asked to fill, by path."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def warm(self, path: str, size: int) -> None:
        """Map a slot and touch each of its pages: a fresh slot's first write otherwise pays the
        file system's page allocation on the window it carries (a 16 MiB slot: ~20 ms)."""
        pages = np.frombuffer(self.get(path, size), dtype=np.uint8)
        pages[:: mmap.PAGESIZE] = 0
        del pages

    def get(self, path: str, size: int) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None or len(m) != size:
            fd = os.open(path, os.O_RDWR)
            try:
                m = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._maps[path] = m
        return m
