"""Dist: this process's place in the job, from torchrun's environment, and the few collectives used.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is gloo on CPU and NCCL on CUDA; a plain
``python -m trainer`` is a world of one and every collective is a no-op. Collectives take and return
CPU tensors or Python values; NCCL's need for device tensors is handled here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from hpstore.errors import InputError

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective may wait for a missing rank before the job fails."""


@dataclass(frozen=True, kw_only=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    grouped: bool = False
    """A process group is initialised (always under torchrun; for FSDP also in a world of one)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device.type == "cuda" else t

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise ``sum`` or ``max`` of a CPU tensor over all ranks (returned on the CPU)."""
        if not self.active:
            return values.clone()
        t = self._comm(values.clone())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return t.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (the objects never leave this job)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if (self.active or self.grouped) and tdist.is_initialized():
            tdist.destroy_process_group()


def resolve_device(name: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """``auto`` means one GPU per local rank when there are enough of them, else the CPU for every
    rank (ranks of one job never mix devices: gloo and NCCL do not mix)."""
    enough = torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size
    if name == "cuda" or (name == "auto" and enough):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device: str = "auto", *, group: bool = False) -> Dist:
    """Join the job described by torchrun's environment (or make a world of one). ``group``: also
    a world of one gets a process group (FSDP's device mesh needs one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    made = False
    if (world_size > 1 or group) and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        extra: dict[str, Any] = {}
        if world_size == 1 and "MASTER_ADDR" not in os.environ:  # plain python: an in-process store
            extra = {"store": tdist.HashStore(), "rank": 0, "world_size": 1}
        tdist.init_process_group(
            backend=backend, timeout=TIMEOUT, device_id=dev if dev.type == "cuda" else None, **extra
        )
        made = True
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, grouped=made or group)
