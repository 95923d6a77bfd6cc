"""``--parallel fsdp``: the model's parameters, gradients and optimizer state split across ranks.

Every module that owns parameters (each ``Linear`` and ``Conv2d`` of the models: the "blocks" of
these small networks) is wrapped with torch's FSDP2 ``fully_shard``, then the root (which takes the
modules whose parameters are tied to another module's, such as the GPT's token embedding and
output layer: FSDP2 refuses one parameter in two groups): each rank
keeps ``ceil(n / W)`` rows of every parameter (``Shard(0)`` DTensors), all-gathers a block's
parameters just before its forward and backward, and reduce-scatters its gradients, so the
optimizer (created after wrapping) holds Adam moments only for the local rows. Gloo on CPU, NCCL on
GPU, any number of processes including one.

Checkpoints of such a run are sharded (``trainer.checkpointing``): every rank writes its own rows
of each tensor into one Zarr checkpoint, and a resume on another number of processes reads only
the rows its new shards need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from trainer.distributed import Dist


def wrap_fsdp(model: nn.Module, dist: Dist) -> nn.Module:
    """Shard ``model`` in place over all ranks (the process group must be initialised)."""
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in list(model.modules()):
        own = list(module.parameters(recurse=False))
        if module is not model and own and all(owners[id(p)] == 1 for p in own):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local_bytes(t: Any) -> int:
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds now (its shards under
    FSDP, everything under DDP)."""
    total = 0
    for p in model.parameters():
        total += _local_bytes(p) + (_local_bytes(p.grad) if p.grad is not None else 0)
    for s in optimizer.state.values():
        total += sum(_local_bytes(v) for v in s.values())
    return total
