"""Sweep: choose the layout and read defaults by measuring them on this machine.

One synthetic MNIST-like dataset (28×28 uint8, mostly zeros, + int64 label) is written with
``hpstore.format.writer.StoreWriter`` under each layout and read back, shuffled, from a cold page cache.
The parameters are decided one after another, each with the best value found so far for the others:

1. ``chunk_bytes``  (read samples/s)          4. ``workers``: encode threads (write MB/s of source)
2. ``shard_bytes``  (read samples/s)          5. read threads (read samples/s)
3. ``codec``        (read samples/s)          6. prefetch depth, in chunks ahead (read samples/s)

Reads go through ``hpstore.Loader`` when it exists and takes the knob (``prefetch_bytes``, a thread
count); otherwise through a chunk pipeline built from ``ChunkReader`` (read + decode ``depth`` chunks
ahead on ``threads`` threads, vectorised shuffle within each chunk), which is the access pattern the
loader is designed around. ``extra["reader"]`` says which one produced a figure.

Every figure is a ratio to the value currently in the code, measured in the same run; the winner of
each parameter carries ``extra["default"]`` and the report prints chosen vs current side by side.
A current value within ``KEEP_WITHIN`` of the best is kept: that difference is noise on a shared box.
"""

from __future__ import annotations

import inspect
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import hpstore
from benchmarks.cache import drop_page_cache
from benchmarks.common import BenchConfig, Figure, Progress, main
from hpstore.format.writer import Layout, StoreWriter
from hpstore.storage.local import LocalStorage

KiB, MiB = 1 << 10, 1 << 20
KEEP_WITHIN = 0.05
SHAPE = (28, 28)
BLOCK_ROWS = 20_000
THREAD_PARAMS = ("threads", "num_threads", "io_threads", "read_threads")
FULL_READ_REPEATS = 5


@dataclass(frozen=True, kw_only=True)
class Grid:
    samples: int
    chunk_bytes: tuple[int, ...]
    shard_bytes: tuple[int, ...]
    codecs: tuple[dict[str, Any], ...]
    workers: tuple[int, ...]
    threads: tuple[int, ...]
    depths: tuple[int, ...]
    start_threads: int = 4
    start_depth: int = 8


ZSTD1, ZSTD3, LZ4, NONE = (
    {"name": "zstd", "level": 1},
    {"name": "zstd", "level": 3},
    {"name": "lz4", "level": 5},
    {"name": "none"},
)
QUICK = Grid(
    samples=160_000,
    chunk_bytes=(256 * KiB, 1 * MiB, 4 * MiB),
    shard_bytes=(16 * MiB, 64 * MiB),
    codecs=(NONE, ZSTD1, LZ4),
    workers=(1, 2),
    threads=(1, 2, 4),
    depths=(1, 4, 16),
)
FULL = Grid(
    samples=640_000,
    chunk_bytes=(64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB),
    shard_bytes=(16 * MiB, 64 * MiB, 256 * MiB),
    codecs=(NONE, ZSTD1, ZSTD3, LZ4),
    workers=(1, 2, 4),
    threads=(1, 2, 4, 8),
    depths=(1, 2, 4, 8, 16, 32),
)


def synthetic(samples: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """MNIST-like blocks: 80% zero pixels, so codecs have something to do (about 2.5× with zstd)."""
    rng = np.random.default_rng(seed)
    blocks: list[dict[str, np.ndarray]] = []
    for start in range(0, samples, BLOCK_ROWS):
        n = min(BLOCK_ROWS, samples - start)
        img = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
        img[rng.random((n, *SHAPE), dtype=np.float32) < 0.8] = 0
        blocks.append({"image": img, "label": rng.integers(0, 10, n, dtype=np.int64)})
    return blocks


class Sweep:
    """Builds the stores and times them; one instance per run."""

    def __init__(self, cfg: BenchConfig, progress: Progress, grid: Grid) -> None:
        self.cfg, self.progress, self.grid = cfg, progress, grid
        self.root = cfg.data_dir / "sweep"
        self.blocks = synthetic(grid.samples)
        self.source_bytes = sum(a.nbytes for b in self.blocks for a in b.values())
        self.loader = _loader_class()
        self.current = current_defaults(self.loader)
        # Reads are cheap next to builds, and the decisions are close calls on a shared machine.
        self.repeats = cfg.repeats if cfg.quick else max(cfg.repeats, FULL_READ_REPEATS)
        self.reader = "chunk pipeline"
        self.warm_note = ""  # set when a read could not start from a cold page cache

    # -- measurements ------------------------------------------------------------------------------

    def build(self, root: Path, layout: Layout) -> tuple[float, int]:
        """Write the dataset with ``layout`` under ``root``: (seconds, stored bytes)."""
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        with StoreWriter(LocalStorage(str(root)), layout=layout, overwrite=True) as w:
            sw = w.split("train")
            for block in self.blocks:
                sw.append(block)
            w.add_split(sw)
            manifest = w.commit()
        took = time.perf_counter() - t0
        return took, sum(o.size for o in manifest.objects.values())

    def read(self, root: Path, threads: int, depth: int, seed: int) -> tuple[float, str]:
        """One shuffled epoch from a cold page cache: (samples/s, reader used)."""
        # Only the store's own pages: a long sweep must not keep flushing the whole machine's cache,
        # and fadvise evicts clean file pages exactly (the drop reports it when it did not).
        drop = drop_page_cache([root], system_wide=False)
        if not drop.cold:
            self.warm_note = f"not a cold read: {drop.note}"
        ds = hpstore.open(str(root)).split("train")
        t0 = time.perf_counter()
        reader = self._loader_epoch(ds, threads, depth, seed) if self.loader else None
        if reader is None:
            _pipeline_epoch(ds, threads=threads, depth=depth, seed=seed)
            reader = "chunk pipeline"
        self.reader = reader
        return len(ds) / (time.perf_counter() - t0), reader

    def read_extra(self) -> dict[str, Any]:
        return {"reader": self.reader, **({"note": self.warm_note} if self.warm_note else {})}

    def with_current(self, param: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """The grid plus the value in the code now, so every figure has a ratio to the current default."""
        current = self.current.get(param)
        if current is None or _label(current) in {_label(v) for v in values}:
            return values
        if isinstance(current, dict):
            return (*values, current)
        return tuple(sorted((*values, current)))

    def interleaved(
        self, labels: list[str], measure: Callable[[str, int], float], repeats: int | None = None
    ) -> dict[str, list[float]]:
        """``repeats`` rounds over all candidates, each round in a rotated order, so a change in the
        machine's background load during the sweep hits every candidate alike."""
        out: dict[str, list[float]] = {k: [] for k in labels}
        for i in range(repeats or self.repeats):
            for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
                out[label].append(measure(label, i))
        return out

    def _loader_epoch(self, ds: hpstore.Dataset, threads: int, depth: int, seed: int) -> str | None:
        params = inspect.signature(self.loader).parameters if self.loader else {}
        if "prefetch_bytes" not in params:
            return None
        kwargs: dict[str, Any] = {"shuffle": True, "seed": seed}
        kwargs["prefetch_bytes"] = depth * max(ds.reader.chunk_nbytes("image", 0), 1)
        thread_param = next((p for p in THREAD_PARAMS if p in params), None)
        if thread_param:
            kwargs[thread_param] = threads
        assert self.loader is not None
        for _ in self.loader(ds, 256, **kwargs):
            pass
        return "hpstore.Loader"

    # -- the six decisions -------------------------------------------------------------------------

    def run(self) -> list[Figure]:
        g = self.grid
        layout = Layout()
        figs: list[Figure] = []
        grid = self.with_current
        try:
            chunks = grid("chunk_bytes", g.chunk_bytes)
            layout = replace(layout, chunk_bytes=self._decide_layout("chunk_bytes", chunks, layout, figs))
            shards = tuple(s for s in grid("shard_bytes", g.shard_bytes) if s >= layout.chunk_bytes)
            layout = replace(layout, shard_bytes=self._decide_layout("shard_bytes", shards, layout, figs))
            layout = replace(
                layout, codec=self._decide_layout("codec", grid("codec", g.codecs), layout, figs)
            )
            layout = replace(layout, workers=self._decide_workers(layout, grid("workers", g.workers), figs))
            self.build(self.root / "final", layout)
            start_depth = g.start_depth
            threads = self._decide_read(
                "threads", grid("threads", g.threads), lambda t: (t, start_depth), figs
            )
            depths = grid("prefetch_depth", g.depths)
            self._decide_read("prefetch_depth", depths, lambda d: (threads, d), figs)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        self.progress(f"chosen layout: {layout}; read threads {threads}")
        return figs

    def _decide_layout(self, param: str, values: tuple[Any, ...], base: Layout, figs: list[Figure]) -> Any:
        """One store per candidate value (kept until all are measured), read in interleaved rounds."""
        stores: dict[str, tuple[Any, Path, int]] = {}
        for i, v in enumerate(values):
            self.progress(f"{param} = {_label(v)}: writing")
            root = self.root / f"{param}-{i}"
            stores[_label(v)] = (v, root, self.build(root, replace(base, **{param: v}))[1])
        self.progress(f"{param}: {self.repeats} cold reads of each of {len(values)} stores")
        t, d = self.grid.start_threads, self.grid.start_depth
        runs = self.interleaved(list(stores), lambda k, i: self.read(stores[k][1], t, d, seed=i)[0])
        results = {
            k: (v, runs[k], {**self.read_extra(), "stored_bytes": n, "ratio_stored": n / self.source_bytes})
            for k, (v, _, n) in stores.items()
        }
        for _, root, _ in stores.values():
            shutil.rmtree(root, ignore_errors=True)
        plot = {"chunk_bytes": "chunk_size"}.get(param)
        return self._choose(param, results, figs, "samples/s", "cold shuffled read", plot)

    def _decide_workers(self, layout: Layout, values: tuple[int, ...], figs: list[Figure]) -> int:
        self.progress(f"workers: {self.cfg.repeats} writes with each of {values}")
        root = self.root / "workers"
        runs = self.interleaved(
            [str(w) for w in values],
            lambda k, _: self.source_bytes / 1e6 / self.build(root, replace(layout, workers=int(k)))[0],
            repeats=self.cfg.repeats,
        )
        results: dict[str, tuple[Any, list[float], dict[str, Any]]] = {
            k: (int(k), v, {}) for k, v in runs.items()
        }
        return int(self._choose("workers", results, figs, "MB/s", "write (MB/s of source)", None))

    def _decide_read(
        self, param: str, values: tuple[int, ...], knobs: Callable[[int], tuple[int, int]], figs: list[Figure]
    ) -> int:
        self.progress(f"{param}: {self.repeats} cold reads with each of {values}")
        root = self.root / "final"
        runs = self.interleaved(
            [str(v) for v in values], lambda k, i: self.read(root, *knobs(int(k)), seed=i)[0]
        )
        results = {k: (int(k), v, self.read_extra()) for k, v in runs.items()}
        plot = "prefetch" if param == "prefetch_depth" else None
        return int(self._choose(param, results, figs, "samples/s", "cold shuffled read", plot))

    def _choose(
        self,
        param: str,
        results: dict[str, tuple[Any, list[float], dict[str, Any]]],
        figs: list[Figure],
        unit: str,
        what: str,
        plot: str | None,
    ) -> Any:
        """Figures for every value (as ratios to the current default), and the chosen value."""
        current = self.current.get(param)
        cur_label = _label(current) if current is not None else None
        base = results.get(cur_label) if cur_label else None
        chosen_label, verdict = decide({k: r[1] for k, r in results.items()}, cur_label)
        for label, (value, values, extra) in results.items():
            extra = {**extra, "param": param, "value": value if not isinstance(value, dict) else label}
            if plot:
                extra.update(plot=plot, x=value, series=f"sweep: {what} ({extra.get('reader', 'writer')})")
                if plot == "prefetch":
                    extra["x_label"] = "prefetch depth (chunks ahead)"
            if label == chosen_label:
                extra["default"] = {
                    "param": param,
                    "chosen": label,
                    "current": cur_label or "none yet",
                    "where": WHERE.get(param),
                    "verdict": verdict,
                }
            figs.append(
                Figure(
                    bench="sweep",
                    name=f"{what}, {param} {label}",
                    unit=unit,
                    values=values,
                    baseline=f"current {param} {cur_label}" if base else None,
                    baseline_values=base[1] if base else None,
                    extra=extra,
                )
            )
        return results[chosen_label][0]


WHERE = {
    "chunk_bytes": "hpstore.format.writer.Layout.chunk_bytes",
    "shard_bytes": "hpstore.format.writer.Layout.shard_bytes",
    "codec": "hpstore.format.writer.Layout.codec",
    "workers": "hpstore.format.writer.Layout.workers",
    "threads": "hpstore.Loader (read threads)",
    "prefetch_depth": "hpstore.Loader prefetch_bytes ÷ chunk bytes",
}


def decide(results: dict[str, list[float]], current: str | None) -> tuple[str, str]:
    """(chosen label, verdict) from each label's measurements: the best median wins, except that
    the current default is kept when its median is within ``KEEP_WITHIN`` of the best, or when the
    two spreads overlap (the slowest run of the best is not faster than the fastest of the current):
    on a noisy machine a change must be more than noise."""
    medians = {k: float(np.median(v)) for k, v in results.items()}
    best = max(medians, key=lambda k: medians[k])
    if current is None:
        return best, "no default in the code yet"
    if current not in medians:
        return best, f"current {current} not in the sweep grid"
    if medians[current] >= (1 - KEEP_WITHIN) * medians[best]:
        return current, "keep"
    if min(results[best]) <= max(results[current]):
        return current, f"keep ({best} {medians[best] / medians[current]:.2f}× by median, within the spread)"
    return best, f"change {current} -> {best} ({medians[best] / medians[current]:.2f}×)"


def _label(v: Any) -> str:
    if isinstance(v, dict):
        return v["name"] + (f"-{v['level']}" if "level" in v else "")
    if isinstance(v, int) and v >= KiB and v % KiB == 0:
        return f"{v // MiB} MiB" if v % MiB == 0 else f"{v // KiB} KiB"
    return str(v)


def _loader_class() -> Any:
    """``hpstore.Loader`` (or ``hpstore.loading.loader.Loader`` before it is exported), or None."""
    loader = getattr(hpstore, "Loader", None)
    if loader is None:
        try:
            from hpstore import loader as module  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            return None
        loader = getattr(module, "Loader", None)
    return loader


def current_defaults(loader: Any) -> dict[str, Any]:
    """The defaults in the code now: ``Layout()`` and, once it exists, the Loader's signature."""
    lay = Layout()
    out: dict[str, Any] = {
        "chunk_bytes": lay.chunk_bytes,
        "shard_bytes": lay.shard_bytes,
        "codec": dict(lay.codec),
        "workers": lay.workers,
    }
    if loader is not None:
        params = inspect.signature(loader).parameters
        for name in THREAD_PARAMS:
            if name in params and isinstance(params[name].default, int):
                out["threads"] = params[name].default
        pb = params.get("prefetch_bytes")
        if pb is not None and isinstance(pb.default, int):
            # depth in chunks of the current default chunk size, the unit the sweep measures in
            out["prefetch_depth"] = max(1, pb.default // lay.chunk_bytes)
    return out


def _pipeline_epoch(ds: hpstore.Dataset, *, threads: int, depth: int, seed: int) -> None:
    """Read + decode every chunk in shuffled order, ``depth`` ahead on ``threads``, and shuffle
    rows within each chunk with one vectorised gather per field (what building batches costs)."""
    rng = np.random.default_rng(seed)
    order: Iterator[int] = iter(rng.permutation(ds.spec.num_chunks).tolist())
    fields = list(ds.fields)

    def load(c: int) -> list[Any]:
        return [ds.reader.read(f, [c])[0] for f in fields]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque[Future[list[Any]]] = deque()
        for c in order:
            window.append(pool.submit(load, c))
            if len(window) >= depth:
                _consume(window.popleft().result(), rng)
        while window:
            _consume(window.popleft().result(), rng)


def _consume(chunks: list[Any], rng: np.random.Generator) -> None:
    perm = rng.permutation(len(chunks[0]))
    for arr in chunks:
        np.take(arr, perm, axis=0)


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    grid = QUICK if cfg.quick else FULL
    progress(f"{grid.samples} samples of {SHAPE} uint8 (+ label), stores under {cfg.data_dir / 'sweep'}")
    return Sweep(cfg, progress, grid).run()


if __name__ == "__main__":
    raise SystemExit(main(run))
