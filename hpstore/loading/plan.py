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
run the same steps). The remaining work is the window holding batch ``step`` from that batch on;
computing it costs the same at any step.

Elastic resume (a position saved by ``W`` ranks, continued by ``W'``). The *remainder* of an epoch
after ``s`` steps on ``W`` ranks is, for each old rank in turn, the rows of its interrupted window
that it had not yet delivered (sorted back into natural order) followed by the rest of its span.
That remainder becomes the global sequence of a new plan for ``W'`` ranks (steps 2 and 3 above, the
same rules: equal spans, wrap-around or dropped tail, windows, per-window permutations seeded also by
the resume history), so the rest of the epoch is delivered exactly once across the ``W'`` ranks with
equal steps, and the following epochs are ordinary ``W'`` plans. ``history`` lists the
``(world_size, step)`` of every earlier run of the epoch, so a resumed epoch can be resumed again,
on any world size. Its cost is the old ranks' pieces plus at most one window of rows per old rank.

Ramp (``first_window_chunks``). The first windows of an epoch may be smaller, doubling from
``first_window_chunks`` chunks up to ``window_chunks``: a fresh loader's first batch then waits for
one or two chunks instead of a whole window (measured on 28×28 digits: 67 ms for a 16-chunk window
against a few ms), and the prefetch threads are ahead before the full windows start. Those first
windows mix fewer chunks (see the table below), which the loader accepts for its first
``~2·window_chunks`` chunks of each epoch. The first window holds at most ``FIRST_WINDOW_ROWS``
rows whatever the chunks hold: with one-byte samples a 1 MiB chunk holds a million rows, whose
permutation alone would take longer than the first batch may.

Cost. Everything above is computed from per-chunk row counts: the chunk order, the rank spans and
the window boundaries are arrays over chunks (``O(num_chunks)``, recomputed per epoch in
microseconds per thousand chunks), and a window's row permutation is derived when the window is
built, from ``(seed, epoch, rank, window)``. Nothing is ``O(num_samples)``.

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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hpstore.errors import InputError

FIRST_WINDOW_ROWS = 1 << 16
"""Most rows of an epoch's first window (the ramp's start), whatever ``first_window_chunks`` chunks
hold: a permutation of 65,536 rows takes about a millisecond, one of a million about 15 ms."""

History = tuple[tuple[int, int], ...]
"""``(world_size, step)`` of each earlier run of an epoch, oldest first (see *Elastic resume*)."""


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
    first_window_chunks: int | None = None
    """Chunks' worth of rows in an epoch's first window (doubling up to ``window_chunks``); ``None``:
    every window is full size."""

    def __post_init__(self) -> None:
        checks = {
            "num_samples": (self.num_samples, 0),
            "chunk_rows": (self.chunk_rows, 1),
            "batch_size": (self.batch_size, 1),
            "world_size": (self.world_size, 1),
            "seed": (self.seed, 0),
            "window_chunks": (self.window_chunks, 1),
        }
        if self.first_window_chunks is not None:
            checks["first_window_chunks"] = (self.first_window_chunks, 1)
        for name, (value, low) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_rows)

    def span(self, total: int, world_size: int | None = None) -> int:
        """``P``: samples each rank reads of a global sequence of ``total`` (duplicates from
        wrap-around included)."""
        w = self.world_size if world_size is None else world_size
        if self.drop_last:
            return total // (w * self.batch_size) * self.batch_size
        return math.ceil(total / w)

    @property
    def samples_per_rank(self) -> int:
        """``P`` of an ordinary epoch."""
        return self.span(self.num_samples)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per ordinary epoch on each rank (the same on every rank)."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    @property
    def batches_per_window(self) -> int:
        """Batches of a full-size window."""
        return self._batches_of(self.window_chunks)

    def _batches_of(self, chunks: int) -> int:
        return max(1, math.ceil(chunks * self.chunk_rows / self.batch_size))

    @property
    def window_rows(self) -> int:
        return self.batches_per_window * self.batch_size

    @cached_property
    def ramp(self) -> tuple[int, ...]:
        """Batches of each window of the ramp (those smaller than full size), in order."""
        if self.first_window_chunks is None:
            return ()
        full, out = self.batches_per_window, []
        rows = min(self.first_window_chunks * self.chunk_rows, FIRST_WINDOW_ROWS)
        while (b := max(1, math.ceil(rows / self.batch_size))) < full:
            out.append(b)
            rows *= 2
        return tuple(out)

    @property
    def num_windows(self) -> int:
        """Windows of an ordinary epoch."""
        return self.windows_for(self.steps_per_epoch)

    def windows_for(self, steps: int) -> int:
        """Windows that hold ``steps`` batches."""
        ramp = self.ramp
        done = 0
        for j, b in enumerate(ramp):
            if done >= steps:
                return j
            done += b
        return len(ramp) + math.ceil(max(0, steps - done) / self.batches_per_window)

    def first_step(self, j: int) -> int:
        """The first batch of window ``j`` (counted from the start of the epoch)."""
        ramp = self.ramp
        if j <= len(ramp):
            return sum(ramp[:j])
        return sum(ramp) + (j - len(ramp)) * self.batches_per_window

    def window_of(self, step: int) -> tuple[int, int]:
        """``(window, batch within it)`` of batch ``step``."""
        for j, b in enumerate(self.ramp):
            if step < b:
                return j, step
            step -= b
        j, k = divmod(step, self.batches_per_window)
        return len(self.ramp) + j, k

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
    while a < b and total > 0:
        base = a // total * total
        lo, hi = a - base, min(b - base, total)
        i0 = int(np.searchsorted(ends, lo, side="right"))
        i1 = int(np.searchsorted(starts, hi, side="left"))
        s, e = starts[i0:i1], ends[i0:i1]
        out.append(np.stack([ids[i0:i1], np.maximum(s, lo) - s, np.minimum(e, hi) - s], axis=1))
        a = base + hi
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


class Pieces:
    """A sequence of samples as pieces ``(chunk, first_row, end_row)``, in order; positions in it
    are cut into sub-sequences (``cut``) without listing samples."""

    def __init__(self, pieces: np.ndarray) -> None:
        self.pieces = pieces.reshape(-1, 3).astype(np.int64, copy=False)
        lengths = self.pieces[:, 2] - self.pieces[:, 1]
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def cut(self, a: int, b: int) -> np.ndarray:
        """Pieces of positions ``[a, b)``, wrapping around past the end."""
        out = _cut(np.arange(len(self.pieces)), self.starts, self.ends, len(self), a, b)
        # _cut counts rows from the start of each piece; shift them to rows of the chunk.
        k, lo, hi = out[:, 0], out[:, 1], out[:, 2]
        first = self.pieces[k, 1]
        return np.stack([self.pieces[k, 0], first + lo, first + hi], axis=1)


def _global_sequence(spec: PlanSpec, epoch: int) -> Pieces:
    """Step 1: the chunks in epoch order, whole."""
    order = chunk_order(spec, epoch)
    sizes = np.full(spec.num_chunks, spec.chunk_rows, dtype=np.int64)
    if spec.num_chunks:
        sizes[-1] = spec.num_samples - (spec.num_chunks - 1) * spec.chunk_rows
    return Pieces(np.stack([order, np.zeros_like(order), sizes[order]], axis=1))


def rank_pieces(spec: PlanSpec, epoch: int, rank: int) -> np.ndarray:
    """The rank's span of an ordinary epoch's global sequence as pieces ``(chunk, first_row,
    end_row)``, rows counted within the chunk, in epoch order."""
    spec.check_rank(rank)
    p = spec.samples_per_rank
    return _global_sequence(spec, epoch).cut(rank * p, (rank + 1) * p)


def assign(window: int, first: int, num_workers: int) -> int:
    """The worker that builds ``window`` in a run starting at window ``first``."""
    return (window - first) % max(1, num_workers)


def _runs(chunk: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Pieces of single rows ``(chunk, row)``, consecutive rows of one chunk merged."""
    if not len(chunk):
        return np.zeros((0, 3), dtype=np.int64)
    brk = np.flatnonzero((np.diff(chunk) != 0) | (np.diff(row) != 1)) + 1
    first = np.concatenate([[0], brk])
    last = np.concatenate([brk, [len(row)]])
    return np.stack([chunk[first], row[first], row[last - 1] + 1], axis=1)


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

    def natural_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk, row)`` of each natural position."""
        lengths = self.pieces[:, 2] - self.pieces[:, 1]
        chunk = np.repeat(self.pieces[:, 0], lengths)
        row = np.repeat(self.pieces[:, 1] - self.offsets[:-1], lengths) + np.arange(self.rows, dtype=np.int64)
        return chunk, row

    def natural_indices(self) -> np.ndarray:
        """Global sample index of each natural position."""
        chunk, row = self.natural_rows()
        return chunk * self.chunk_rows + row

    def indices(self) -> np.ndarray:
        """Global sample index of each output position."""
        natural = self.natural_indices()
        return natural if self.order is None else natural[self.order]

    def batch_bounds(self, k: int) -> tuple[int, int]:
        start = k * self.batch_size
        return start, min(start + self.batch_size, self.rows)

    def rest(self, k: int) -> np.ndarray:
        """Pieces of the rows from batch ``k`` on, in natural order (what an interrupted run of this
        window had not delivered)."""
        chunk, row = self.natural_rows()
        if self.order is not None:
            keep = np.sort(self.order[k * self.batch_size :])
            chunk, row = chunk[keep], row[keep]
        else:
            chunk, row = chunk[k * self.batch_size :], row[k * self.batch_size :]
        return _runs(chunk, row)


class EpochPlan:
    """One rank's epoch: windows of ``spec.batches_per_window`` batches (smaller ones first with a
    ramp; the last may be short). Windows are computed on demand; the plan holds only the rank's
    pieces. ``history``: earlier runs of this epoch on other world sizes (elastic resume)."""

    def __init__(
        self, spec: PlanSpec, epoch: int, rank: int, history: Sequence[tuple[int, int]] = ()
    ) -> None:
        if epoch < 0:
            raise InputError(f"epoch must be >= 0, got {epoch}")
        spec.check_rank(rank)
        self.spec = spec
        self.epoch = epoch
        self.rank = rank
        self.history: History = tuple((int(w), int(s)) for w, s in history)
        seq = _global_sequence(spec, epoch)
        for level, (w, s) in enumerate(self.history):
            seq = _remainder(spec, epoch, seq, self.history[:level], w, s)
        self._take_span(seq)

    @classmethod
    def _over(cls, spec: PlanSpec, epoch: int, rank: int, history: History, seq: Pieces) -> EpochPlan:
        """The plan of ``rank`` over a given global sequence (one level of an elastic resume)."""
        plan = cls.__new__(cls)
        plan.spec, plan.epoch, plan.rank, plan.history = spec, epoch, rank, history
        plan._take_span(seq)
        return plan

    def _take_span(self, seq: Pieces) -> None:
        """Step 2: this rank's span of the global sequence."""
        self.total = len(seq)
        self.span = self.spec.span(self.total)
        self.pieces = seq.cut(self.rank * self.span, (self.rank + 1) * self.span)
        self._mine = Pieces(self.pieces)

    @property
    def steps(self) -> int:
        """Batches of this plan on each rank (the same on every rank)."""
        return math.ceil(self.span / self.spec.batch_size)

    @property
    def num_windows(self) -> int:
        return self.spec.windows_for(self.steps)

    def window_bounds(self, j: int) -> tuple[int, int]:
        """Positions ``[a, b)`` of window ``j`` in the rank's span."""
        if not 0 <= j < self.num_windows:
            raise IndexError(f"window {j} out of range ({self.num_windows} windows)")
        b = self.spec.batch_size
        return self.spec.first_step(j) * b, min(self.spec.first_step(j + 1) * b, self.span)

    def window_pieces(self, j: int) -> np.ndarray:
        """Pieces ``(chunk, first_row, end_row)`` of window ``j`` in natural order (no shuffle)."""
        return self._mine.cut(*self.window_bounds(j))

    def window_chunks(self, j: int) -> list[int]:
        """Distinct chunks window ``j`` reads, in order of first use."""
        return list(dict.fromkeys(self.window_pieces(j)[:, 0].tolist()))

    def chunks_by_window(self, first: int = 0) -> list[list[int]]:
        """``window_chunks(j)`` for every window from ``first`` on, in one vectorised pass (a fresh
        loader lists them all before its first batch)."""
        n = self.num_windows
        if first >= n:
            return []
        b = self.spec.batch_size
        bounds = np.array([min(self.spec.first_step(j) * b, self.span) for j in range(first, n + 1)])
        starts, ends = self._mine.starts, self._mine.ends
        k0 = np.searchsorted(ends, bounds[:-1], side="right").tolist()
        k1 = np.searchsorted(starts, bounds[1:], side="left").tolist()
        ids = self.pieces[:, 0].tolist()
        return [list(dict.fromkeys(ids[a:z])) for a, z in zip(k0, k1, strict=True)]

    def window(self, j: int) -> Window:
        spec = self.spec
        a, b = self.window_bounds(j)
        order = None
        if spec.shuffle:
            # Ordinary epochs keep the seeding they always had (same orders as before elastic resume).
            key = [spec.seed, self.epoch, 1, self.rank, j] + [x for ws in self.history for x in ws]
            order = np.random.default_rng(key).permutation(b - a).astype(np.int64)
        return Window(
            index=j,
            first_step=spec.first_step(j),
            pieces=self.window_pieces(j),
            order=order,
            chunk_rows=spec.chunk_rows,
            batch_size=spec.batch_size,
        )

    def start_of(self, step: int) -> tuple[int, int]:
        """``(window, batch within it)`` where a run resuming after ``step`` batches begins."""
        if not 0 <= step <= self.steps:
            raise InputError(f"step {step} out of range (an epoch has {self.steps} steps on each rank)")
        return self.spec.window_of(step)

    def rest(self, step: int) -> np.ndarray:
        """Pieces of everything this rank has not delivered after ``step`` batches: the rest of the
        interrupted window in natural order, then the rest of the span."""
        if step >= self.steps:
            return np.zeros((0, 3), dtype=np.int64)
        j, k = self.start_of(step)
        _, end = self.window_bounds(j)
        return np.concatenate([self.window(j).rest(k), self._mine.cut(end, self.span)])

    def indices(self, step: int = 0) -> np.ndarray:
        """Every global sample index this rank yields from ``step`` on, in output order (for tests
        and tools; the loader never materialises this)."""
        j0, k0 = self.start_of(step)
        parts = []
        for j in range(j0, self.num_windows):
            idx = self.window(j).indices()
            parts.append(idx[k0 * self.spec.batch_size :] if j == j0 else idx)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _remainder(
    spec: PlanSpec, epoch: int, seq: Pieces, history: History, world_size: int, step: int
) -> Pieces:
    """The global sequence left after ``step`` steps of the plan over ``seq`` on ``world_size`` ranks:
    each old rank's undelivered rows, old rank by old rank."""
    if world_size < 1:
        raise InputError(f"resume history holds world size {world_size}")
    old = dataclasses.replace(spec, world_size=world_size)
    parts = []
    for r in range(world_size):
        plan = EpochPlan._over(old, epoch, r, history, seq)
        if not 0 <= step <= plan.steps:
            raise InputError(f"resume step {step} out of range ({plan.steps} steps on {world_size} ranks)")
        parts.append(plan.rest(step))
    return Pieces(np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64))
