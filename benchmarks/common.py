"""The contract every benchmark module follows, so ``python -m benchmarks`` can run them all.

A benchmark module ``benchmarks/<name>.py`` exposes::

    def run(cfg: BenchConfig, progress: Progress) -> list[Figure]

and ends with ``if __name__ == "__main__": raise SystemExit(main(run))`` so it also runs alone
(``python -m benchmarks.<name> [--quick] [--data-dir DIR] [--out DIR]``).

Every figure is a repeated measurement (median, min, max of ``cfg.repeats`` runs) and, where it has
one, the limit or baseline it is compared with, measured in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    quick: bool = False
    data_dir: Path = Path("bench-data")
    out_dir: Path = Path("bench-out")
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One reported number: ``values`` are the repeats; ``baseline`` names what ``ratio`` divides by."""

    bench: str
    name: str
    unit: str
    values: list[float]
    baseline: str | None = None
    baseline_values: list[float] | None = None
    higher_is_better: bool = True
    target: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def ratio(self) -> float | None:
        if not self.baseline_values:
            return None
        base = statistics.median(self.baseline_values)
        return self.median / base if base else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, min=min(self.values), max=max(self.values), ratio=self.ratio)
        return d


def repeat(fn: Callable[[], float], repeats: int) -> list[float]:
    """Call ``fn`` (which returns one measurement) ``repeats`` times."""
    return [fn() for _ in range(repeats)]


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def format_figure(f: Figure) -> str:
    spread = f"[{min(f.values):.4g}–{max(f.values):.4g}]"
    line = f"{f.bench:<11} {f.name:<44} {f.median:>12.4g} {f.unit:<10} {spread}"
    if f.ratio is not None:
        line += f"  = {f.ratio:.3g}× {f.baseline}"
    if f.target:
        line += f"  (target {f.target})"
    return line


def main(run: Callable[[BenchConfig, Progress], list[Figure]], argv: list[str] | None = None) -> int:
    """Stand-alone entry point of one benchmark module."""
    p = argparse.ArgumentParser(description=(run.__module__ or "benchmark"))
    p.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    p.add_argument("--data-dir", type=Path, default=Path("bench-data"))
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    cfg = BenchConfig(
        quick=a.quick, data_dir=a.data_dir, out_dir=a.out, repeats=a.repeats or (1 if a.quick else 3)
    )
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    figures = run(cfg, lambda msg: print(f"  .. {msg}", file=sys.stderr, flush=True))
    for f in figures:
        print(format_figure(f))
    module = run.__module__ or "bench"
    if module == "__main__":  # run as ``python -m benchmarks.<name>``: the spec keeps the real name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else "bench"
    name = module.rsplit(".", 1)[-1]
    (cfg.out_dir / f"{name}.json").write_text(json.dumps([f.to_dict() for f in figures], indent=1))
    return 0
