"""Plan: which samples a rank reads in one epoch, and in which order, as a pure function.

The inputs are the sample count, the chunk layout, the seed, the epoch, the world size and the
batch size; there is no I/O, no torch.distributed and no global state, so every rank computes the
same global picture independently and the tests check it without a store.

How an epoch is laid out (a two-level shuffle, as in CorgiPile or MosaicML Streaming's ``py1e``):

1. **Chunk order.** The chunks are permuted (seeded by ``seed`` and ``epoch``). Concatenating
   their samples in that order gives the epoch's *global sequence*.
2. **Rank spans.** Rank ``r`` takes the contiguous span ``[r·P, (r+1)·P)`` of the global sequence,
   so it reads about ``1/world_size`` of the chunks (plus at most two it shares with a neighbour),
   never the whole store. ``P`` is the same on every rank, so every rank runs the same number of
   steps (DDP hangs otherwise):

   - ``drop_last=False``: ``P = ceil(N / world_size)``. The ``world_size·P − N < world_size``
     missing samples are filled by wrapping around to the start of the global sequence, so a few
     samples appear twice per epoch (the same rule as ``torch.utils.data.DistributedSampler``).
     Only the last batch of an epoch may be short; it is short on every rank alike.
   - ``drop_last=True``: ``P`` is ``N / world_size`` rounded down to a whole number of batches;
     the tail of the global sequence (fewer than ``world_size·batch_size`` samples, different ones
     each epoch) is left out, and every batch is full.
3. **Windows.** The span is cut into *shuffle windows* of ``window_rows`` samples (``window_chunks``
   chunks' worth, rounded up to whole batches), and the samples of each window are permuted. A
   window is the unit of work downstream: its chunks are read and decoded once, its rows gathered
   into one buffer in output order, and its batches are slices of that buffer. Batches never
   straddle windows.

Workers. Window ``j`` of a run that starts at window ``j0`` belongs to worker ``(j − j0) mod
num_workers`` (``assign``). Whoever builds the windows, they are delivered in window order, so the
output order does not depend on the number of workers at all: a state saved with 4 workers and
loaded with 0 yields the same remaining samples in the same order.

Ranks and caches. The chunk order, and so which chunks a rank reads, changes every epoch (a sample
meets different neighbours and ranks each epoch). The price is cross-epoch reuse: with ``W`` ranks
only about ``1/W`` of the chunks a rank reads in one epoch are its again in the next, so a per-rank
cache's hit rate from epoch 2 on is about ``min(c, 1/W)`` rather than ``c`` (ranks on one machine
still share the page cache).

Resume. A position is two integers, ``(epoch, step)``, and it is the same on every rank (all ranks
run the same steps). The remaining work is window ``step // batches_per_window`` from batch
``step % batches_per_window`` on; computing it costs the same at any step.

The shuffle window trade-off. A bigger window mixes more chunks into each batch but holds more
decoded rows in memory (``window_chunks × chunk_bytes`` per field per window in flight; its cost is
memory, not speed: the gather is one scatter per chunk whatever the window). Measured on 200,000
samples in 150 chunks of 1,337 rows, batch 256 (``benchmarks/loader.py``, ``shuffle window`` rows).
*Neighbour distance* is the mean ``|i_k − i_{k+1}|`` of consecutive samples divided by that of a full
permutation (1.0 = as far apart as a full shuffle); *chunks per batch* is the mean number of distinct
chunks a batch draws from; *labels per batch* is, for a store written sorted by label (10 classes,
the worst case: an image folder ingested class by class), the mean number of distinct labels in a
batch (a full shuffle gives 10.0):

    window_chunks        1      2      4      8     16     32   full permutation
    neighbour distance 0.42   0.62   0.80   0.89   0.93   0.96   1.00
    chunks per batch    2.1    3.1    5.0    8.9   16.7   31.4   123
    labels per batch    2.1    2.9    4.4    6.5    8.6   10.0   10.0

The default, 16 chunks (16 MiB of decoded rows per field with the default 1 MiB chunks), draws each
batch from ~17 random chunks; raise it for stores written in sorted order, lower it to save memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hpstore.errors import InputError


@dataclass(frozen=True, kw_only=True)
class PlanSpec:
    """Everything an epoch plan depends on besides the epoch and the rank."""

    num_samples: int
    chunk_rows: int
    batch_size: int
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    window_chunks: int = 16

    def __post_init__(self) -> None:
        checks = {
            "num_samples": (self.num_samples, 0),
            "chunk_rows": (self.chunk_rows, 1),
            "batch_size": (self.batch_size, 1),
            "world_size": (self.world_size, 1),
            "seed": (self.seed, 0),
            "window_chunks": (self.window_chunks, 1),
        }
        for name, (value, low) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_rows)

    @property
    def samples_per_rank(self) -> int:
        """``P``: samples each rank reads per epoch (duplicates from wrap-around included)."""
        if self.drop_last:
            return self.num_samples // (self.world_size * self.batch_size) * self.batch_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on each rank (the same on every rank)."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    @property
    def batches_per_window(self) -> int:
        return max(1, math.ceil(self.window_chunks * self.chunk_rows / self.batch_size))

    @property
    def window_rows(self) -> int:
        return self.batches_per_window * self.batch_size

    @property
    def num_windows(self) -> int:
        return math.ceil(self.samples_per_rank / self.window_rows)

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise InputError(f"rank {rank} out of range for world size {self.world_size}")


def chunk_order(spec: PlanSpec, epoch: int) -> np.ndarray:
    """The epoch's chunk permutation (identity without shuffle)."""
    if not spec.shuffle:
        return np.arange(spec.num_chunks, dtype=np.int64)
    return np.random.default_rng([spec.seed, epoch, 0]).permutation(spec.num_chunks).astype(np.int64)


def _cut(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, total: int, a: int, b: int) -> np.ndarray:
    """Pieces ``(id, begin, end)`` covering positions ``[a, b)`` of a sequence made of segments
    ``ids[k]`` at ``[starts[k], ends[k])``, repeated cyclically with period ``total``."""
    out = []
    while a < b:
        base = a // total * total
        lo, hi = a - base, min(b - base, total)
        i0 = int(np.searchsorted(ends, lo, side="right"))
        i1 = int(np.searchsorted(starts, hi, side="left"))
        s, e = starts[i0:i1], ends[i0:i1]
        out.append(np.stack([ids[i0:i1], np.maximum(s, lo) - s, np.minimum(e, hi) - s], axis=1))
        a = base + hi
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def rank_pieces(spec: PlanSpec, epoch: int, rank: int) -> np.ndarray:
    """The rank's span of the global sequence as pieces ``(chunk, first_row, end_row)``, rows
    counted within the chunk, in epoch order."""
    spec.check_rank(rank)
    order = chunk_order(spec, epoch)
    sizes = np.full(spec.num_chunks, spec.chunk_rows, dtype=np.int64)
    if spec.num_chunks:
        sizes[-1] = spec.num_samples - (spec.num_chunks - 1) * spec.chunk_rows
    ends = np.cumsum(sizes[order])
    p = spec.samples_per_rank
    return _cut(order, ends - sizes[order], ends, spec.num_samples, rank * p, (rank + 1) * p)


def assign(window: int, first: int, num_workers: int) -> int:
    """The worker that builds ``window`` in a run starting at window ``first``."""
    return (window - first) % max(1, num_workers)


@dataclass(frozen=True, eq=False)
class Window:
    """One shuffle window: ``pieces`` of chunks in natural order, and the permutation ``order``
    (output position -> natural position; ``None`` keeps the natural order)."""

    index: int
    first_step: int
    pieces: np.ndarray
    order: np.ndarray | None
    chunk_rows: int
    batch_size: int

    @cached_property
    def rows(self) -> int:
        return int((self.pieces[:, 2] - self.pieces[:, 1]).sum())

    @cached_property
    def num_batches(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @cached_property
    def chunks(self) -> list[int]:
        """Distinct chunks the window reads, in order of first use."""
        return list(dict.fromkeys(self.pieces[:, 0].tolist()))

    @cached_property
    def offsets(self) -> np.ndarray:
        """Natural position where each piece starts (length ``len(pieces) + 1``)."""
        return np.concatenate([[0], np.cumsum(self.pieces[:, 2] - self.pieces[:, 1])])

    @cached_property
    def destinations(self) -> np.ndarray:
        """Output position of each natural position (the inverse of ``order``)."""
        if self.order is None:
            return np.arange(self.rows, dtype=np.int64)
        inv = np.empty(self.rows, dtype=np.int64)
        inv[self.order] = np.arange(self.rows, dtype=np.int64)
        return inv

    def natural_indices(self) -> np.ndarray:
        """Global sample index of each natural position."""
        lengths = self.pieces[:, 2] - self.pieces[:, 1]
        first = self.pieces[:, 0] * self.chunk_rows + self.pieces[:, 1] - self.offsets[:-1]
        return np.repeat(first, lengths) + np.arange(self.rows, dtype=np.int64)

    def indices(self) -> np.ndarray:
        """Global sample index of each output position."""
        natural = self.natural_indices()
        return natural if self.order is None else natural[self.order]

    def batch_bounds(self, k: int) -> tuple[int, int]:
        start = k * self.batch_size
        return start, min(start + self.batch_size, self.rows)


class EpochPlan:
    """One rank's epoch: ``num_windows`` windows of ``spec.batches_per_window`` batches each (the
    last may have fewer). Windows are computed on demand; the plan holds only the rank's pieces."""

    def __init__(self, spec: PlanSpec, epoch: int, rank: int) -> None:
        if epoch < 0:
            raise InputError(f"epoch must be >= 0, got {epoch}")
        self.spec = spec
        self.epoch = epoch
        self.rank = rank
        self.pieces = rank_pieces(spec, epoch, rank)
        lengths = self.pieces[:, 2] - self.pieces[:, 1]
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths

    @property
    def num_windows(self) -> int:
        return self.spec.num_windows

    @property
    def steps(self) -> int:
        return self.spec.steps_per_epoch

    def window_bounds(self, j: int) -> tuple[int, int]:
        """Positions ``[a, b)`` of window ``j`` in the rank's span."""
        if not 0 <= j < self.num_windows:
            raise IndexError(f"window {j} out of range ({self.num_windows} windows)")
        a = j * self.spec.window_rows
        return a, min(a + self.spec.window_rows, self.spec.samples_per_rank)

    def window_pieces(self, j: int) -> np.ndarray:
        """Pieces ``(chunk, first_row, end_row)`` of window ``j`` in natural order (no shuffle)."""
        a, b = self.window_bounds(j)
        pieces = _cut(self.pieces[:, 0], self._starts, self._ends, self.spec.samples_per_rank, a, b)
        # _cut counts rows from the start of each rank piece; shift them back to rows of the chunk.
        k0 = int(np.searchsorted(self._ends, a, side="right"))
        pieces[:, 1:] += self.pieces[k0 : k0 + len(pieces), 1:2]
        return pieces

    def window_chunks(self, j: int) -> list[int]:
        """Distinct chunks window ``j`` reads, in order of first use."""
        return list(dict.fromkeys(self.window_pieces(j)[:, 0].tolist()))

    def window(self, j: int) -> Window:
        spec = self.spec
        a, b = self.window_bounds(j)
        order = None
        if spec.shuffle:
            rng = np.random.default_rng([spec.seed, self.epoch, 1, self.rank, j])
            order = rng.permutation(b - a).astype(np.int64)
        return Window(
            index=j,
            first_step=j * spec.batches_per_window,
            pieces=self.window_pieces(j),
            order=order,
            chunk_rows=spec.chunk_rows,
            batch_size=spec.batch_size,
        )

    def start_of(self, step: int) -> tuple[int, int]:
        """``(window, batch within it)`` where a run resuming after ``step`` batches begins."""
        if not 0 <= step <= self.steps:
            raise InputError(f"step {step} out of range (an epoch has {self.steps} steps on each rank)")
        return divmod(step, self.spec.batches_per_window)

    def indices(self, step: int = 0) -> np.ndarray:
        """Every global sample index this rank yields from ``step`` on, in output order (for tests
        and tools; the loader never materialises this)."""
        j0, k0 = self.start_of(step)
        parts = []
        for j in range(j0, self.num_windows):
            idx = self.window(j).indices()
            parts.append(idx[k0 * self.spec.batch_size :] if j == j0 else idx)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
