"""LoaderOptions: every knob of ``hpstore.Loader`` in one frozen object, validated where it is built.

The library's defaults live here and nowhere else; the trainer's flags, the benchmarks and the
README take them from this class (the trainer states its own deviations, with the measurement that
chose them, in ``trainer/config.py``). ``Loader(ds, batch_size, options)`` and
``Loader(ds, batch_size, num_workers=2, ...)`` are the same thing: keyword arguments are fields of
this class, applied on top of ``options``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpstore.errors import InputError

DEFAULT_PREFETCH_BYTES = 256 << 20
DEFAULT_CACHE_BYTES = 512 << 20
DEFAULT_CACHE_DISK_BYTES = 16 << 30
DEFAULT_SHUFFLE_WINDOW = 16
DEFAULT_FIRST_WINDOW = 1
DEFAULT_IO_THREADS = 8
WORKER_KINDS = ("threads", "processes", "auto")


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """How a loader reads and orders a split (see ``hpstore.loading.loader`` for the semantics)."""

    shuffle: bool = True
    seed: int = 0
    fields: tuple[str, ...] | None = None
    """Fields to load (``None``: all)."""
    drop_last: bool = False
    rank: int | None = None
    """This process's rank; ``None``: torch.distributed's when initialised, else 0."""
    world_size: int | None = None
    num_workers: int = 0
    """Threads or processes building windows ahead of the consumer (``0``: in the consumer's thread)."""
    workers: str = "threads"
    """What the ``num_workers`` are: ``"threads"`` in this process, ``"processes"`` (own interpreters
    writing into shared memory: ``hpstore.loading.workers``), or ``"auto"``
    (``hpstore.loading.loader.resolve_workers``)."""
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES
    cache_bytes: int = DEFAULT_CACHE_BYTES
    with_index: bool = False
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW
    """Chunks' worth of rows shuffled together (``hpstore.loading.plan``: the trade-off table)."""
    first_window: int | None = DEFAULT_FIRST_WINDOW
    """Chunks' worth of rows in each epoch's first window, doubling up to ``shuffle_window``
    (a fast first batch); ``None``: every window full size."""
    pin_memory: bool | None = None
    """Batches in pinned memory; ``None``: when CUDA is available."""
    io_threads: int = DEFAULT_IO_THREADS
    worker_cpus: str | tuple[int, ...] | None = "auto"
    """CPUs worker processes run on: ``"auto"`` keeps one CPU of this rank's share for the consumer
    and pins the workers to the rest (``hpstore.loading.affinity``); ``None``: not pinned; or the
    CPU numbers. Threads are never pinned."""
    cache_dir: str | None = None
    cache_disk_bytes: int = DEFAULT_CACHE_DISK_BYTES

    def __post_init__(self) -> None:
        if self.fields is not None:
            if isinstance(self.fields, str):
                raise InputError(f"fields must be a list of names, not the string {self.fields!r}")
            object.__setattr__(self, "fields", tuple(self.fields))
        for name, low in (
            ("seed", 0),
            ("num_workers", 0),
            ("prefetch_bytes", 0),
            ("cache_bytes", 0),
            ("shuffle_window", 1),
            ("io_threads", 0),
            ("cache_disk_bytes", 0),
        ):
            _integer(name, getattr(self, name), low)
        if self.workers not in WORKER_KINDS:
            raise InputError(f"workers must be one of {', '.join(WORKER_KINDS)}, got {self.workers!r}")
        if self.workers == "processes" and self.num_workers < 1:
            raise InputError("workers='processes' needs num_workers >= 1")
        if self.worker_cpus is not None and self.worker_cpus != "auto":
            if isinstance(self.worker_cpus, str) or not self.worker_cpus:
                raise InputError(f"worker_cpus must be 'auto', None or CPU numbers, got {self.worker_cpus!r}")
            for cpu in self.worker_cpus:
                _integer("worker_cpus entry", cpu, 0)
            object.__setattr__(self, "worker_cpus", tuple(int(c) for c in self.worker_cpus))
        if self.first_window is not None:
            _integer("first_window", self.first_window, 1)
        if self.world_size is not None:
            _integer("world_size", self.world_size, 1)
        if self.rank is not None:
            _integer("rank", self.rank, 0)
            if self.world_size is not None and self.rank >= self.world_size:
                raise InputError(f"rank {self.rank} is out of range for world size {self.world_size}")

    def replace(self, **changes: Any) -> LoaderOptions:
        """A copy with ``changes`` (validated); unknown names are refused with the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InputError(
                f"unknown loader option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def of(cls, options: LoaderOptions | None = None, **changes: Any) -> LoaderOptions:
        return (options or cls()).replace(**changes)


def _integer(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
