"""Evaluation across ranks, each sample counted exactly once.

Each rank reads its share of the eval split (no shuffle, no drop) with the loader's global sample
``index`` and scatters per-sample loss and correctness into a table indexed by sample. Summing the
tables over ranks and dividing by how often each sample was seen removes the few wrap-around
duplicates the loader adds so every rank runs the same number of batches; a sample that no rank saw
is an error, not a silently smaller denominator.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.distributed import Dist
from trainer.feeder import Feeder


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    feeder: Feeder,
    *,
    num_samples: int,
    dist: Dist,
    autocast: AbstractContextManager[object],
) -> EvalResult:
    """Mean loss and accuracy of ``model`` over every sample of the split ``feeder`` reads."""
    device = feeder.device
    # Rows: loss sum, correct count, times seen. float64 keeps counts and sums exact.
    table = torch.zeros(3, num_samples, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in feeder:
            if batch.index is None:
                raise RuntimeError("the eval loader must be built with with_index=True")
            idx = batch.index.to(device, non_blocking=True).long()
            with autocast:
                logits = model(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y, reduction="none")
            table[0].index_add_(0, idx, loss.double())
            table[1].index_add_(0, idx, (logits.argmax(1) == batch.y).double())
            table[2].index_add_(0, idx, torch.ones_like(loss, dtype=torch.float64))
    finally:
        model.train(was_training)
    table = dist.all_reduce(table.cpu(), "sum")
    seen = table[2]
    missed = int((seen == 0).sum())
    if missed:
        raise RuntimeError(
            f"evaluation saw {num_samples - missed} of {num_samples} samples: the loader skipped some"
        )
    return EvalResult(
        loss=float((table[0] / seen).mean()),
        accuracy=float((table[1] / seen).mean()),
        samples=num_samples,
    )
