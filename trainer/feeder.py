"""Feeder: a loader's batches as device tensors, with the time spent blocked on the loader counted.

On CUDA each batch is copied from pinned host memory with a non-blocking copy on a side stream, so
the copy of batch i+1 overlaps the kernels of step i (the host runs ahead of the GPU); the compute
stream waits for the copy only where it uses the batch. On CPU the tensors pass through untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None  # global sample indices, when the loader provides them
    wait_s: float  # seconds blocked in next(loader) for this batch
    segments: torch.Tensor | None = None  # per-token document ids of packed windows ([B, T], gpt)

    @property
    def size(self) -> int:
        return int(self.y.shape[0])


class Feeder:
    def __init__(
        self, loader: Iterable[dict[str, Any]], *, device: torch.device, input: str, target: str
    ) -> None:
        self.loader = loader
        self.device = device
        self.input = input
        self.target = target
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                raw = next(it)
            except StopIteration:
                return
            wait = time.perf_counter() - t0
            x, y = raw[self.input], raw[self.target].reshape(-1)
            if self.stream is not None:
                x, y = self._to_device(x), self._to_device(y)
            yield Batch(x=x, y=y.long(), index=raw.get("index"), wait_s=wait)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        assert self.stream is not None
        if t.device == self.device:
            return t
        host = t if t.is_pinned() else t.pin_memory()
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        # The tensor was allocated on the side stream but is used (and freed) on the compute stream.
        out.record_stream(compute)
        return out
