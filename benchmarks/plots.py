"""PNG plots of the figures that ask for one, written with matplotlib's Agg backend.

A figure joins a plot by carrying, in ``extra``:

- ``plot``: one of ``PLOTS`` (``chunk_size``, ``prefetch``, ``cache``, ``data_wait``);
- ``x``: its x value (chunk bytes; prefetch depth; cache bytes ÷ dataset bytes in 0..1; epoch number);
- ``series`` (optional): the line it belongs to, e.g. ``"hpstore, cold"``; default: the figure's name;
- ``x_label`` (optional): overrides the plot's x-axis label (e.g. ``"prefetch bytes"``).

The y value is the figure's median with a min–max error bar. Figures of one plot with different units
go to side-by-side panels, one per unit. The limits get a bar chart of their own (``limits.png``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Figure


@dataclass(frozen=True, kw_only=True)
class PlotSpec:
    file: str
    title: str
    x_label: str
    log_x: bool = False
    bytes_x: bool = False


PLOTS = {
    "chunk_size": PlotSpec(
        file="loader_vs_chunk_size.png",
        title="Loader throughput vs chunk size",
        x_label="chunk size",
        log_x=True,
        bytes_x=True,
    ),
    "prefetch": PlotSpec(
        file="loader_vs_prefetch.png",
        title="Loader throughput vs prefetch depth",
        x_label="prefetch depth",
        log_x=True,
    ),
    "cache": PlotSpec(
        file="hit_rate_vs_cache_fraction.png",
        title="Chunk hit rate vs cache size (from epoch 2)",
        x_label="cache size ÷ dataset size",
    ),
    "data_wait": PlotSpec(
        file="data_wait_per_epoch.png",
        title="Data-wait fraction per epoch",
        x_label="epoch",
    ),
}
LIMITS_FILE = "limits.png"


def grouped(figures: Sequence[Figure]) -> dict[str, list[Figure]]:
    """Plot name -> its figures; figures with an unknown plot name or a non-numeric x are skipped."""
    out: dict[str, list[Figure]] = defaultdict(list)
    for f in figures:
        plot, x = f.extra.get("plot"), f.extra.get("x")
        if plot in PLOTS and isinstance(x, int | float) and math.isfinite(x):
            out[str(plot)].append(f)
    return dict(out)


def series(figures: Sequence[Figure]) -> dict[str, dict[str, list[Figure]]]:
    """unit -> series label -> figures sorted by x."""
    out: dict[str, dict[str, list[Figure]]] = defaultdict(lambda: defaultdict(list))
    for f in figures:
        out[f.unit][str(f.extra.get("series") or f.name)].append(f)
    return {u: {s: sorted(fs, key=lambda f: f.extra["x"]) for s, fs in by.items()} for u, by in out.items()}


def write_plots(figures: Sequence[Figure], out_dir: Path) -> list[str]:
    """Write every plot that has data; returns the file names written (relative to ``out_dir``)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines; must precede pyplot
    import matplotlib.pyplot as plt

    written = []
    for name, figs in grouped(figures).items():
        spec = PLOTS[name]
        fig = _draw(plt, spec, name, series(figs))
        fig.savefig(out_dir / spec.file, dpi=110)
        plt.close(fig)
        written.append(spec.file)
    limits = [f for f in figures if f.extra.get("limit_key") and f.unit == "MB/s"]
    if limits:
        fig = _draw_limits(plt, limits)
        fig.savefig(out_dir / LIMITS_FILE, dpi=110)
        plt.close(fig)
        written.append(LIMITS_FILE)
    return written


def _draw(plt: Any, spec: PlotSpec, name: str, by_unit: dict[str, dict[str, list[Figure]]]) -> Any:
    units = sorted(by_unit)
    fig, axes = plt.subplots(1, len(units), figsize=(6.4 * len(units), 4.4), squeeze=False)
    for ax, unit in zip(axes[0], units, strict=True):
        x_label = spec.x_label
        for label, figs in by_unit[unit].items():
            xs = [f.extra["x"] for f in figs]
            ys = [f.median for f in figs]
            lo = [f.median - min(f.values) for f in figs]
            hi = [max(f.values) - f.median for f in figs]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
            x_label = next((str(f.extra["x_label"]) for f in figs if f.extra.get("x_label")), x_label)
        if name == "cache":
            _cache_references(ax, unit)
        if spec.log_x:
            ax.set_xscale("log", base=2)
        if spec.bytes_x:
            ticks = sorted({f.extra["x"] for figs in by_unit[unit].values() for f in figs})
            ax.set_xticks(ticks, [_bytes_label(t) for t in ticks])
        ax.set_xlabel(x_label)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec.title)
    fig.tight_layout()
    return fig


def _cache_references(ax: Any, unit: str) -> None:
    """The two curves a plan-aware cache is judged against (see ANCHORS: what knowing the future is worth)."""
    scale = 100.0 if unit == "%" else 1.0
    cs = [i / 50 for i in range(51)]
    lru = [(c + (1 - c) * math.log(1 - c)) * scale if c < 1 else scale for c in cs]
    ax.plot(cs, [c * scale for c in cs], "k--", lw=1, label="known order: c")
    ax.plot(cs, lru, "k:", lw=1, label="LRU, fresh shuffle: c+(1−c)ln(1−c)")


def _draw_limits(plt: Any, limits: Sequence[Figure]) -> Any:
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(limits) + 1.2))
    names = [f.name for f in limits]
    med = [f.median for f in limits]
    err = [[f.median - min(f.values) for f in limits], [max(f.values) - f.median for f in limits]]
    ax.barh(names, med, xerr=err, capsize=3, color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("MB/s")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("Machine limits (median, min–max)")
    fig.tight_layout()
    return fig


def _bytes_label(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"
