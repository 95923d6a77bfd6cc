"""The suite's report: progress lines while it runs, the terminal table, and the JSON document.

Each figure is shown as median [min–max] of its repeats, then its ratio to the baseline its module
measured (``Figure.ratio``) and, when it names a machine limit in ``extra["limit"]``, its ratio to that
limit as measured by ``benchmarks.limits`` in the same run. The JSON keeps every raw value, the ratios,
each module's status and error, and the machine description (schema below, ``SCHEMA``).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from benchmarks.common import Figure

SCHEMA = "hpstore-bench/1"
"""JSON layout::

    {"schema": "hpstore-bench/1", "started": ISO time, "seconds": float, "exit_status": int,
     "config": {"quick", "repeats", "data_dir", "out_dir", "modules", "timeout_s"},
     "machine": benchmarks.machine.describe(),
     "modules": [{"name", "module", "status": "ok"|"failed", "error": str|null, "traceback": str|null,
                  "seconds", "budget_s", "figures": int}],
     "figures": [Figure.to_dict() + {"module", "limit", "limit_value", "limit_ratio"}],
     "defaults": [{"param", "chosen", "current", "where", "verdict"}],
     "plots": [file names under out_dir]}
"""

OK, FAILED = "ok", "failed"


@dataclass(frozen=True, kw_only=True)
class ModuleResult:
    """What one benchmark module produced: figures, or a one-line error."""

    name: str
    module: str
    status: str
    seconds: float
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    budget_s: float | None = None

    @property
    def over_budget(self) -> bool:
        return self.budget_s is not None and self.seconds > self.budget_s


def figure_from_dict(d: dict[str, Any]) -> Figure:
    """The inverse of ``Figure.to_dict`` (derived keys such as median are recomputed, not read)."""
    names = {f.name for f in fields(Figure)}
    return Figure(**{k: v for k, v in d.items() if k in names})


def check_figure(f: Any) -> Figure:
    """A module's figure, validated so one bad figure reports as a module error, not a crash later."""
    if not isinstance(f, Figure):
        raise TypeError(f"run() returned {type(f).__name__}, expected Figure")
    if not f.values or not all(isinstance(v, int | float) and math.isfinite(v) for v in f.values):
        raise ValueError(f"figure {f.name!r} has no finite values: {f.values!r}")
    if f.baseline_values is not None and not all(
        isinstance(v, int | float) and math.isfinite(v) for v in f.baseline_values
    ):
        raise ValueError(f"figure {f.name!r} has non-finite baseline values")
    return f


# -- limits -----------------------------------------------------------------------------------------


def limit_index(figures: Sequence[Figure]) -> dict[str, Figure]:
    """Figures that are limits (``extra["limit_key"]``), by key; the first measurement of a key wins."""
    out: dict[str, Figure] = {}
    for f in figures:
        key = f.extra.get("limit_key")
        if isinstance(key, str) and key not in out:
            out[key] = f
    return out


def limit_ratio(f: Figure, limits: dict[str, Figure]) -> tuple[str, float | None] | None:
    """(limit key, median ÷ the limit's median) for figures naming a limit; ratio None if unmeasured.

    Units must agree: a samples/s figure cannot be divided by a MB/s limit, so the module must name a
    limit only for a figure in the same unit.
    """
    key = f.extra.get("limit")
    if not isinstance(key, str):
        return None
    lim = limits.get(key)
    if lim is None or lim.unit != f.unit or lim.median == 0:
        return key, None
    return key, f.median / lim.median


# -- terminal ---------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    """Readable magnitudes: 12,345 / 123 / 12.3 / 1.23 / 0.0123."""
    a = abs(x)
    if a >= 1e4:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def figure_row(f: Figure, limits: dict[str, Figure], name_width: int = 44) -> str:
    spread = f"[{fmt(min(f.values))}–{fmt(max(f.values))}]" if len(f.values) > 1 else "(1 run)"
    row = f"  {f.name:<{name_width}} {fmt(f.median):>10} {f.unit:<10} {spread:<20}"
    notes = []
    if f.ratio is not None:
        notes.append(f"{f.ratio:.3g}× {f.baseline}")
    lr = limit_ratio(f, limits)
    if lr is not None:
        key, ratio = lr
        notes.append(f"{ratio:.0%} of {key}" if ratio is not None else f"{key} not measured")
    if f.target:
        notes.append(f"target {f.target}")
    return (row + "  " + "; ".join(notes)).rstrip()


def module_header(r: ModuleResult) -> str:
    took = f"{r.seconds:.1f} s"
    if r.over_budget:
        took += f", over its {r.budget_s:.0f} s budget"
    if r.status == OK:
        return f"{r.name} ({len(r.figures)} figures, {took})"
    return f"{r.name}: FAILED after {took}: {r.error}"


def module_block(r: ModuleResult, limits: dict[str, Figure], name_width: int) -> list[str]:
    lines = [module_header(r)]
    lines += [figure_row(f, limits, name_width) for f in r.figures]
    for f in r.figures:
        note = f.extra.get("note")
        if note:
            lines.append(f"    note ({f.name}): {note}")
    return lines


def table(results: Sequence[ModuleResult], machine_line: str = "") -> str:
    """The whole report as text: a header, one block per module, the defaults table, a verdict."""
    figures = [f for r in results for f in r.figures]
    limits = limit_index(figures)
    width = min(60, max([44, *(len(f.name) for f in figures)]))
    lines = []
    if machine_line:
        lines += [f"machine: {machine_line}", ""]
    lines.append(f"  {'figure':<{width}} {'median':>10} {'unit':<10} {'[min–max]':<20}  ratios")
    for r in results:
        lines += module_block(r, limits, width)
    defaults = defaults_rows(figures)
    if defaults:
        lines += ["", "defaults (sweep → chosen | in the code now):"]
        for d in defaults:
            lines.append(
                f"  {d['param']:<16} {d['chosen']!s:>14} | {d['current']!s:<14} {d.get('verdict') or ''}"
            )
    failed = [r.name for r in results if r.status != OK]
    total = sum(r.seconds for r in results)
    lines += ["", f"{len(results) - len(failed)} of {len(results)} benchmarks ran in {total:.0f} s"]
    slow = [r for r in results if r.over_budget]
    if slow:
        names = ", ".join(f"{r.name} ({r.seconds:.0f} s)" for r in slow)
        lines.append(f"over the --quick budget of {slow[0].budget_s:.0f} s per module: {names}")
    if failed:
        lines.append(f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def defaults_rows(figures: Sequence[Figure]) -> list[dict[str, Any]]:
    """The sweep's choices: figures carrying ``extra["default"]`` = {param, chosen, current, ...}."""
    rows = []
    for f in figures:
        d = f.extra.get("default")
        if isinstance(d, dict) and "param" in d:
            rows.append({"param": d["param"], "chosen": d.get("chosen"), "current": d.get("current"), **d})
    return rows


class Console:
    """Progress lines on stderr: elapsed suite time, module, message."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def line(self, module: str, msg: str) -> None:
        elapsed = time.perf_counter() - self.t0
        print(f"[{elapsed:6.1f}s] {module}: {msg}", file=self.stream, flush=True)


# -- JSON -------------------------------------------------------------------------------------------


def document(
    results: Sequence[ModuleResult],
    *,
    machine: dict[str, Any],
    config: dict[str, Any],
    started: str,
    seconds: float,
    plots: Sequence[str],
    exit_status: int,
) -> dict[str, Any]:
    figures = [f for r in results for f in r.figures]
    limits = limit_index(figures)
    rows = []
    for r in results:
        for f in r.figures:
            d = f.to_dict()
            lr = limit_ratio(f, limits)
            lim = limits.get(lr[0]) if lr else None
            d.update(
                module=r.name,
                spread=[min(f.values), max(f.values)],
                stdev=statistics.stdev(f.values) if len(f.values) > 1 else 0.0,
                limit=lr[0] if lr else None,
                limit_value=lim.median if lim else None,
                limit_ratio=lr[1] if lr else None,
            )
            rows.append(d)
    return {
        "schema": SCHEMA,
        "started": started,
        "seconds": seconds,
        "exit_status": exit_status,
        "config": config,
        "machine": machine,
        "modules": [
            {
                "name": r.name,
                "module": r.module,
                "status": r.status,
                "error": r.error,
                "traceback": r.traceback,
                "seconds": r.seconds,
                "budget_s": r.budget_s,
                "figures": len(r.figures),
            }
            for r in results
        ],
        "figures": rows,
        "defaults": defaults_rows(figures),
        "plots": list(plots),
    }


def to_jsonable(x: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays, paths, sets; anything else as its str."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, set | frozenset | tuple):
        return list(x)
    return str(x)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=to_jsonable, allow_nan=True))
    tmp.replace(path)
