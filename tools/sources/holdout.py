"""Holdout: a seeded random fraction of a split's rows moved to a ``test`` split (any source).

``with_holdout(splits, fraction, seed)`` cuts the ``train`` split (or the only split) into
``train`` and ``test``: row ``i`` goes to ``test`` when its hash ``u(seed, i)`` is among the
``round(fraction * rows)`` smallest (exactly that many when the source knows its row count; else
each row independently with probability ``fraction``). The choice is a pure function of the seed and
the row number, so re-running an ingest reproduces the same split. Each of the two splits reads the
source once more, so memory stays bounded; nothing is held between the passes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from hpstore.errors import InputError
from tools.sources.base import Batch, Source, Split

TEST_SPLIT = "test"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def row_hash(seed: int, rows: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) per row number: splitmix64 of (seed, row)."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * _GOLDEN + np.uint64(seed & (2**64 - 1)) * np.uint64(0xD1B54A32D192ED03)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def threshold(fraction: float, seed: int, num_rows: int | None) -> float:
    """Rows with ``row_hash < threshold`` are held out."""
    if num_rows is None or num_rows == 0:
        return fraction
    k = round(fraction * num_rows)
    if k == 0:
        return 0.0
    if k >= num_rows:
        return 1.0
    u = np.sort(row_hash(seed, np.arange(num_rows, dtype=np.int64)))
    return float(np.nextafter(u[k - 1], 1.0))  # rows with hash <= the k-th smallest


def select(batch: Batch, keep: np.ndarray) -> Batch:
    """The rows of ``batch`` where ``keep`` is true, in every column."""
    out: Batch = {}
    for name, col in batch.items():
        out[name] = col.filter(pa.array(keep)) if isinstance(col, pa.Array) else col[keep]
    return out


class HoldoutSource(Source):
    """The rows of ``base`` on one side of the holdout (``test`` or the rest)."""

    def __init__(self, base: Source, *, test: bool, fraction: float, seed: int) -> None:
        self.base = base
        self.test = test
        self.path = base.path
        self.fields = base.fields
        self.attrs = base.attrs
        self.cut = threshold(fraction, seed, base.num_rows)
        self.seed = seed
        if base.num_rows is None:
            self.num_rows = None
        else:
            held = int((row_hash(seed, np.arange(base.num_rows)) < self.cut).sum())
            self.num_rows = held if test else base.num_rows - held

    def numbered_batches(self) -> Iterator[tuple[np.ndarray, Batch]]:
        """``(row numbers in the base source, batch)``."""
        for rows, batch in numbered(self.base):
            keep = (row_hash(self.seed, rows) < self.cut) == self.test
            yield rows[keep], select(batch, keep)

    def batches(self) -> Iterator[Batch]:
        for _, batch in self.numbered_batches():
            yield batch


def numbered(source: Source) -> Iterator[tuple[np.ndarray, Batch]]:
    """``source``'s batches with the number of each row in the original source (for messages)."""
    if isinstance(source, HoldoutSource):
        yield from source.numbered_batches()
        return
    start = 0
    for batch in source.batches():
        n = len(next(iter(batch.values())))
        yield np.arange(start, start + n, dtype=np.int64), batch
        start += n


def row_name(source: Source, row: int) -> str:
    """How messages name row ``row`` of ``source`` (the original, below any holdout): its file for
    an image folder, else the source and the row number."""
    while isinstance(source, HoldoutSource):
        source = source.base
    files = getattr(source, "files", None)
    if isinstance(files, list) and 0 <= row < len(files) and isinstance(files[row], tuple):
        return str(files[row][0])
    return f"{source.path}: row {row}"


def with_holdout(splits: list[Split], fraction: float, seed: int) -> list[Split]:
    """``splits`` with ``fraction`` of the train (or only) split's rows in a new ``test`` split."""
    if not 0 < fraction < 1:
        raise InputError(f"--holdout must be a fraction between 0 and 1, got {fraction}")
    if any(s.name == TEST_SPLIT for s in splits):
        raise InputError(f"--holdout: the source already has a {TEST_SPLIT!r} split")
    names = [s.name for s in splits]
    target = "train" if "train" in names else names[0] if len(names) == 1 else None
    if target is None:
        raise InputError(f"--holdout: no 'train' split to hold rows out of (splits: {', '.join(names)})")
    out: list[Split] = []
    for s in splits:
        if s.name != target:
            out.append(s)
            continue
        out.append(
            Split(
                name=s.name,
                source=HoldoutSource(s.source, test=False, fraction=fraction, seed=seed),
                format=s.format,
            )
        )
        out.append(
            Split(
                name=TEST_SPLIT,
                source=HoldoutSource(s.source, test=True, fraction=fraction, seed=seed),
                format=s.format,
            )
        )
    return out
