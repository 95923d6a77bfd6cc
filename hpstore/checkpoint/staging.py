"""The staging buffer: one reused host buffer that holds a snapshot of a state's arrays.

A save copies every tensor into its slot of this buffer and returns; the writer then persists the
slots while training goes on and mutates the originals. Reusing one buffer (instead of ``.cpu()``
or ``.clone()`` per save) keeps the copy at memory bandwidth: no allocation, no page faults after
the first save. When any tensor lives on a GPU the buffer is page-locked (pinned) and the copies
are ``non_blocking``: the save returns once they are queued, and ``Snapshot.ready()`` (called by
the writer) waits on an event recorded behind them on each device's current stream. Work the
caller queues later on those streams (an optimizer step) is ordered after the copies, so the
snapshot holds the values of the moment ``save`` was called.

Hazard: the buffer is shared by consecutive snapshots, so a snapshot must be fully persisted
before the next one is taken. The checkpointer guarantees it (at most one save in flight).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hpstore.checkpoint.tree import Leaf
from hpstore.storage.direct_io import ALIGN


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


@dataclass
class StagingStats:
    allocations: int = 0
    capacity: int = 0
    bytes_copied: int = 0
    device_bytes_copied: int = 0


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
        devices = set()
        for leaf, dst, view in zip(leaves, slots.targets, slots.views, strict=True):
            if dst is None:
                continue
            if isinstance(dst, torch.Tensor):
                assert isinstance(leaf, torch.Tensor)
                on_gpu = leaf.device.type == "cuda"
                dst.copy_(leaf.detach(), non_blocking=on_gpu)
                if on_gpu:
                    devices.add(leaf.device)
                    self.stats.device_bytes_copied += view.nbytes
            else:
                np.copyto(dst, leaf, casting="equiv")
            self.stats.bytes_copied += view.nbytes
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
