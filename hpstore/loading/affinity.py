"""Which CPUs a loader's worker processes run on, so the consumer keeps a core to itself.

A training process's Python thread is the pipeline's bottleneck on a GPU: it launches kernels,
holding the GIL and one core. Worker processes take the GIL question away, but not the core one:
whenever a refill wakes every worker at once, a machine with ``num_workers + 1`` runnable threads
on fewer cores preempts the training thread, however little CPU the loader needs on average. So
each rank keeps one CPU of its share for its consumer and lets its workers run on the others.

Shares: torchrun's ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (or the arguments) cut the CPUs this
process may use (``os.sched_getaffinity``) into that many contiguous, equal groups; rank ``r``
takes group ``r``. A group of one CPU is left unpinned (there is nothing to keep apart), as is a
machine where affinity cannot be set. Only the workers are pinned; the consumer process's own
affinity is left as it was (the scheduler moves its thread to the CPU the workers leave free).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hpstore.errors import InputError


def plan_worker_cpus(
    allowed: Sequence[int], local_rank: int = 0, local_size: int = 1
) -> tuple[int, ...] | None:
    """The CPUs for rank ``local_rank``'s workers out of ``allowed`` shared by ``local_size``
    ranks: its group less the group's first CPU (kept for its consumer); ``None`` when the group
    has fewer than two CPUs. Pure."""
    cpus = sorted(set(allowed))
    if local_size < 1 or not 0 <= local_rank < local_size:
        raise InputError(f"local rank {local_rank} is out of range for {local_size} local ranks")
    share = len(cpus) // local_size
    group = cpus[local_rank * share : (local_rank + 1) * share]
    return tuple(group[1:]) if len(group) >= 2 else None


def resolve_worker_cpus(setting: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``LoaderOptions.worker_cpus`` for this process: ``"auto"`` plans from the process's
    affinity and torchrun's local rank; ``None`` pins nothing; explicit CPUs must be ones this
    process may use."""
    if setting is None or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if setting == "auto":
        try:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            return plan_worker_cpus(sorted(allowed), local_rank, local_size)
        except (ValueError, InputError):
            return None  # a launcher's odd environment is no reason to fail a loader
    cpus = tuple(int(c) for c in setting)
    outside = sorted(set(cpus) - allowed)
    if outside:
        raise InputError(
            f"worker_cpus {', '.join(map(str, outside))} are not available to this process "
            f"(it may use {', '.join(map(str, sorted(allowed)))})"
        )
    return cpus


def pin_this_process(cpus: tuple[int, ...] | None) -> None:
    """Restrict the calling process (a worker, before it starts threads) to ``cpus``."""
    if cpus:
        os.sched_setaffinity(0, cpus)
