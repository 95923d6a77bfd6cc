"""Row-aligned fields from separate files (``--field NAME=PATH``), zipped into one source.

Each part is a single-field source; its batches are re-cut so that every output batch holds the
same rows of every field. Row counts known up front are compared before anything is written; a
source that only reveals its length by being read (CSV, JSONL) is caught when one part ends before
the others.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from hpstore.errors import InputError
from tools.sources.base import Batch, Column, Source


class _Part:
    """One field's stream with a queue of not-yet-emitted columns."""

    def __init__(self, name: str, source: Source) -> None:
        if len(source.fields) != 1:
            raise InputError(
                f"{source.path}: holds {len(source.fields)} fields ({', '.join(source.fields)}); "
                f"--field {name}=PATH needs a single-field file"
            )
        self.name = name
        self.source = source
        self.batches = iter(source.batches())
        self.queue: deque[Column] = deque()
        self.done = False
        self.rows = 0  # rows taken from the source so far

    def head(self) -> Column | None:
        """The oldest buffered column, reading the next batch when the queue is empty."""
        while not self.queue and not self.done:
            batch = next(self.batches, None)
            if batch is None:
                self.done = True
            elif len(col := batch[self.source.fields[0]]):
                self.queue.append(col)
                self.rows += len(col)
        return self.queue[0] if self.queue else None

    def take(self, n: int) -> Column:
        col = self.queue.popleft()
        if len(col) > n:
            self.queue.appendleft(col[n:])
        return col[:n]


class AlignedSource(Source):
    """Fields ``name -> source`` of equal length, read in step."""

    def __init__(self, parts: list[tuple[str, Source]]) -> None:
        names = [n for n, _ in parts]
        if len(set(names)) != len(names):
            raise InputError(f"--field: a field name is given twice: {names}")
        counts = {s.path: s.num_rows for _, s in parts}
        known = {p: n for p, n in counts.items() if n is not None}
        if len(set(known.values())) > 1:
            raise InputError(f"row-aligned fields have different row counts: {known}")
        self.parts = parts
        self.path = ", ".join(s.path for _, s in parts)
        self.fields = tuple(names)
        self.num_rows = None if None in counts.values() else next(iter(known.values()))
        self.attrs: dict[str, dict[str, Any]] = {
            name: s.attrs[s.fields[0]] for name, s in parts if s.fields and s.fields[0] in s.attrs
        }

    def batches(self) -> Iterator[Batch]:
        parts = [_Part(n, s) for n, s in self.parts]
        while True:
            heads = [p.head() for p in parts]
            if all(h is None for h in heads):
                return
            if any(h is None for h in heads):
                short = next(p for p, h in zip(parts, heads, strict=True) if h is None)
                longer = next(p for p, h in zip(parts, heads, strict=True) if h is not None)
                raise InputError(
                    f"{short.source.path}: ends after {short.rows} rows, but {longer.source.path} "
                    f"has more (row-aligned fields must have the same length)"
                )
            n = min(len(h) for h in heads if h is not None)
            yield {p.name: p.take(n) for p in parts}
