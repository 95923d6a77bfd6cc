"""The staging buffer: one reused host buffer that holds a snapshot of a state's arrays.

A save copies every tensor into its slot of this buffer and returns; the writer then persists the
slots while training goes on and mutates the originals. Reusing one buffer (instead of ``.cpu()``
or ``.clone()`` per save) keeps the copy at memory bandwidth: no allocation, no page faults after
the first save. When any tensor lives on a GPU the buffer is page-locked (pinned) and the copies
are ``non_blocking``: the save returns once they are queued, and ``Snapshot.ready()`` (called by
the writer) waits on an event recorded behind them on each device's current stream. Work the
caller queues later on those streams (an optimizer step) is ordered after the copies, so the
snapshot holds the values of the moment ``save`` was called.

Host-side copies run on a few short-lived threads (up to ``os.cpu_count()``, at most
``COPY_THREADS``), each thread a contiguous run of the state's bytes, each tensor's part of it a
plain byte copy (``np.copyto`` releases the GIL and runs on one core). Why not one ``Tensor.copy_`` per tensor:
torch's own intra-op parallelism opens a parallel region per copy, and when another process holds
one of the cores every region waits a scheduler slice for its second thread — measured on the
2-core machine, a 64 MB state of 192 tensors took 0.2–0.6 s instead of 12 ms. Byte slices on our own
threads have no barrier per tensor and use every core on one large tensor.

Repeated saves of one state (the same tensors, updated in place) reuse the copy tasks of the last
save: the per-tensor views and the split cost ~25 µs a tensor, 5 ms for a 192-tensor state, a
quarter of its copy. The tasks address the sources' memory without holding them, so they are used
only when every leaf is the same tensor object at the same address and layout as when they were
made (``_layout_key``); anything else rebuilds them.

Hazard: the buffer is shared by consecutive snapshots, so a snapshot must be fully persisted
before the next one is taken. The checkpointer guarantees it (at most one save in flight).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpstore.checkpoint.tree import Leaf
from hpstore.storage.direct_io import ALIGN

COPY_THREADS = 8  # memory bandwidth is shared: more threads than this add nothing on big hosts
COPY_SLICE = 1 << 40
"""Bytes per copy task: a thread's run of a tensor in one piece. glibc's ``memcpy`` switches to
non-temporal stores (no read of the destination's lines first) above a threshold set from the
cache size, ~200 MiB on the development VM, and a single large copy runs 1.7x faster there: a
2 x 200 MB state's stall went from 65 to 41 ms (1.65x to 1.01x the copy limit) when each thread
copied its tensor whole instead of in 1 MiB slices; 192 tensors of 100 MB in all, no change."""
COPY_INLINE = 4 << 20  # below this many host bytes in all, threads cost more than they save


@dataclass
class Snapshot:
    """Byte views of each leaf's slot (uint8 numpy arrays over the staging buffer)."""

    views: list[np.ndarray]
    events: list[torch.cuda.Event] = field(default_factory=list)

    def ready(self) -> None:
        """Block until every queued device-to-host copy has landed."""
        for event in self.events:
            event.synchronize()


@dataclass(frozen=True)
class Slots:
    """Where each leaf of one state structure goes in the staging buffer."""

    buffer: torch.Tensor
    views: list[np.ndarray]  # per leaf: its slot's bytes
    targets: list[torch.Tensor | np.ndarray | None]  # per leaf: its slot with its dtype and shape
    reuse: dict[str, Any] = field(default_factory=dict)  # the last snapshot's tasks, by layout key


@dataclass
class StagingStats:
    allocations: int = 0
    capacity: int = 0
    bytes_copied: int = 0
    device_bytes_copied: int = 0
    copy_tasks: int = 0  # host copy tasks (slices) of all snapshots


class StagingBuffer:
    """A growing, reused host buffer (pinned when the state has GPU tensors)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self.stats = StagingStats()

    def _ensure(self, nbytes: int, pin: bool) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < nbytes or (pin and not buf.is_pinned()):
            self._buf = None  # drop the old one first so peak memory is one buffer
            # Page-aligned start, so slots planned aligned can be written with O_DIRECT.
            raw = torch.empty(max(nbytes, 1) + ALIGN, dtype=torch.uint8, pin_memory=pin)
            start = -raw.data_ptr() % ALIGN
            buf = raw[start : start + max(nbytes, 1)]
            self._buf = buf
            self.stats.allocations += 1
            self.stats.capacity = buf.numel()
        return buf

    def slots(self, leaves: Sequence[Leaf], offsets: Sequence[int], nbytes: Sequence[int]) -> Slots:
        """Typed views of slot ``[offsets[i], offsets[i] + nbytes[i])`` for every leaf, growing the
        buffer (pinned when a leaf is on a GPU) as needed. Valid for leaves of the same dtypes and
        shapes while ``holds`` says so; making them costs more than copying 10 MB, so the
        checkpointer keeps them from one save to the next."""
        pin = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in leaves)
        total = max((o + n for o, n in zip(offsets, nbytes, strict=True)), default=0)
        buf = self._ensure(total, pin=pin)
        host = buf.numpy()
        views: list[np.ndarray] = []
        targets: list[torch.Tensor | np.ndarray | None] = []
        for leaf, off, n in zip(leaves, offsets, nbytes, strict=True):
            views.append(host[off : off + n])
            if n == 0:
                targets.append(None)
            elif isinstance(leaf, torch.Tensor):
                targets.append(buf[off : off + n].view(leaf.dtype).view(leaf.shape))
            else:
                dt = leaf.dtype.newbyteorder("<") if leaf.dtype.byteorder == ">" else leaf.dtype
                targets.append(host[off : off + n].view(dt).reshape(leaf.shape))
        return Slots(buffer=buf, views=views, targets=targets)

    def holds(self, slots: Slots) -> bool:
        """Whether ``slots`` still point into this buffer (it has not grown or been released)."""
        return slots.buffer is self._buf

    def snapshot(self, leaves: Sequence[Leaf], slots: Slots) -> Snapshot:
        """Copy every leaf into its slot (``slots`` made by ``slots()`` for leaves like these)."""
        if not self.holds(slots):
            raise ValueError("staging slots are stale: the buffer was reallocated")
        key = _layout_key(leaves)
        if key is not None and slots.reuse.get("key") == key:
            parts = slots.reuse["parts"]
            self.stats.bytes_copied += slots.reuse["bytes"]
            self.stats.copy_tasks += sum(len(p) for p in parts)
            _run(parts)
            return Snapshot(views=slots.views)
        slots.reuse.clear()
        devices = set()
        pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (slot bytes, source bytes)
        others: list[Callable[[], None]] = []  # copies that convert: one task each
        host_bytes = 0
        for leaf, dst, view in zip(leaves, slots.targets, slots.views, strict=True):
            if dst is None:
                continue
            self.stats.bytes_copied += view.nbytes
            if isinstance(dst, torch.Tensor):
                assert isinstance(leaf, torch.Tensor)
                if leaf.device.type == "cuda":  # queued now, on this thread's current stream
                    dst.copy_(leaf.detach(), non_blocking=True)
                    devices.add(leaf.device)
                    self.stats.device_bytes_copied += view.nbytes
                    continue
                src = _tensor_bytes(leaf)
                if src is None:  # strided, conjugate, ...: torch resolves it in one copy
                    others.append(_torch_copy(dst, leaf))
            else:
                assert isinstance(leaf, np.ndarray)
                src = _array_bytes(leaf, dst)
                if src is None:  # strided or byte-swapped: numpy converts it in one copy
                    others.append(_numpy_copy(dst, leaf))
            if src is not None:
                pairs.append((view, src))
            host_bytes += view.nbytes
        workers = min(os.cpu_count() or 1, COPY_THREADS) if host_bytes >= COPY_INLINE else 1
        if key is not None and not others and not devices:  # every leaf a plain host tensor
            pairs = [(dst, _unowned(src)) for dst, src in pairs]
            slots.reuse.update(key=key, bytes=host_bytes, parts=_split(pairs, workers))
        parts = _split(pairs, workers)
        for i, task in enumerate(others):
            parts[i % workers].append(task)
        self.stats.copy_tasks += sum(len(p) for p in parts)
        _run(parts)
        events = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Snapshot(views=slots.views, events=events)

    def release(self) -> None:
        """Drop the buffer (freed once no ``Slots`` refer to it; the next ``slots()`` makes a new one)."""
        self._buf = None
        self.stats.capacity = 0


def _layout_key(leaves: Sequence[Leaf]) -> tuple[object, ...] | None:
    """What makes the last snapshot's copy tasks valid again: each leaf's identity, address and
    layout (shapes and dtypes are fixed by the slots); ``None`` unless every leaf is a host tensor."""
    key: list[object] = []
    for t in leaves:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return None
        key.append((id(t), t.data_ptr(), t.stride(), t.is_conj(), t.is_neg()))
    return tuple(key)


def _unowned(src: np.ndarray) -> np.ndarray:
    """The same bytes, through a view that does not keep their owner alive (reused copy tasks
    must not pin a replaced state's tensors; ``_layout_key`` guards their use)."""
    if not src.nbytes:
        return src
    raw = (ctypes.c_char * src.nbytes).from_address(src.ctypes.data)
    return np.frombuffer(raw, dtype=np.uint8)  # type: ignore[call-overload]


def _tensor_bytes(t: torch.Tensor) -> np.ndarray | None:
    """A host tensor's bytes as a flat uint8 array (no copy), or None when they are not one
    contiguous run that holds exactly its values."""
    t = t.detach()
    if not t.is_contiguous() or t.is_conj() or t.is_neg() or t.layout != torch.strided:
        return None
    try:
        return t.reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):
        return None


def _array_bytes(a: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """An array's bytes as a flat uint8 array when they are ``dst``'s bytes already."""
    if not a.flags.c_contiguous or a.dtype != dst.dtype:
        return None
    return a.reshape(-1).view(np.uint8)


def _numpy_copy(dst: np.ndarray, src: np.ndarray) -> Callable[[], None]:
    return lambda: np.copyto(dst, src, casting="equiv")


def _torch_copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    def copy() -> None:
        dst.copy_(src.detach())

    return copy


def _split(pairs: Sequence[tuple[np.ndarray, np.ndarray]], workers: int) -> list[list[Callable[[], None]]]:
    """Cut the byte stream of ``pairs`` into ``workers`` runs of equal bytes (slicing a tensor at
    each cut), each run in slices of at most ``COPY_SLICE`` bytes. Contiguous runs, not a shared
    queue: a worker takes no lock between its copies."""
    total = sum(src.nbytes for _, src in pairs)
    share = max(-(-total // workers), 1)
    parts: list[list[Callable[[], None]]] = [[] for _ in range(workers)]
    done = 0
    for dst, src in pairs:
        a = 0
        while a < src.nbytes:
            k = min(done // share, workers - 1)
            b = (
                min(src.nbytes, a + COPY_SLICE, a + (k + 1) * share - done)
                if k < workers - 1
                else min(src.nbytes, a + COPY_SLICE)
            )
            parts[k].append(_numpy_copy(dst[a:b], src[a:b]))
            done += b - a
            a = b
    return parts


def _run(parts: list[list[Callable[[], None]]]) -> None:
    """Run each part's tasks in order, the first part on this thread and the others on one new
    thread each; the first error is raised once every part has ended."""
    errors: list[BaseException] = []

    def work(tasks: list[Callable[[], None]]) -> None:
        try:
            for task in tasks:
                task()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,), name="hpstore-staging") for p in parts[1:] if p]
    for t in threads:
        t.start()
    work(parts[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
