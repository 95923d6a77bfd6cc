"""Plans at the scale of public corpora: a store of 10⁹ one-byte samples (``--quick``: 10⁸).

What a fresh loader costs before a byte of data moves, and what random access costs, when the
split is huge: time from ``Loader(...)`` to its first batch, the Python heap the loader's plan and
cache bookkeeping hold at that moment (``tracemalloc``: numpy's buffers are traced too), and the
time and heap of ``ds[1000:1010]``. Measured at two sizes, 10× apart, so O(samples) costs show as a
10× growth and O(chunks) ones as the growth of the chunk count (also 10×: fixed chunk size), against
the per-chunk figure. The store is written once from zero-filled chunks (zstd makes them tiny on
disk) with the default layout; its files are in the page cache (warm).

Targets (issue: plans that scale to billions of samples): first batch ≤ 10 ms and plan memory
≤ 64 MB at 10⁹ samples; random access costs what it reads.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import hpstore
from benchmarks.common import BenchConfig, Figure, Progress, main
from hpstore.format.writer import StoreWriter
from hpstore.storage.local import LocalStorage

FORMAT = 1
BLOCK = 1 << 24  # samples appended per call while writing


def build(cfg: BenchConfig, progress: Progress, n: int) -> Path:
    root = cfg.data_dir / "plans" / f"n{n}"
    meta = {"format": FORMAT, "n": n}
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()) == meta:
        return root / "store"
    progress(f"writing a store of {n:,} one-byte samples, once")
    if root.exists() and not {p.name for p in root.iterdir()} <= {"store", "done.json"}:
        raise RuntimeError(
            f"{root} holds files this benchmark did not write; move them or pick another --data-dir"
        )
    shutil.rmtree(root, ignore_errors=True)  # only a store (and its marker) this benchmark wrote
    root.mkdir(parents=True)
    zeros = np.zeros(BLOCK, dtype=np.uint8)
    with StoreWriter(LocalStorage(str(root / "store"))) as w:
        sw = w.split("train")
        for start in range(0, n, BLOCK):
            sw.append({"x": zeros[: min(BLOCK, n - start)]})
        w.add_split(sw)
        w.commit()
    done.write_text(json.dumps(meta))
    return root / "store"


def cost(work: Callable[[], Any], *, traced: bool = False) -> tuple[float, Any]:
    """``(seconds of work(), its result)``; with ``traced``, the peak traced heap bytes instead of
    the seconds (tracing slows Python down, so time and heap come from separate runs)."""
    gc.collect()
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    if not traced:
        return seconds, result
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return float(peak), result


def first_batch(ds: hpstore.Dataset, *, traced: bool = False) -> float:
    """From a fresh loader's creation to its first batch (see ``cost``)."""

    def work() -> hpstore.Loader:
        loader = hpstore.Loader(ds, 256)
        next(iter(loader))
        return loader

    value, loader = cost(work, traced=traced)
    loader.close()
    return value


def random_access(ds: hpstore.Dataset, *, traced: bool = False) -> float:
    """``ds[1000:1010]`` (see ``cost``)."""
    value, rows = cost(lambda: ds[1000:1010], traced=traced)
    assert len(rows["x"]) == 10
    return value


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    sizes = (10**7, 10**8) if cfg.quick else (10**8, 10**9)
    figs: list[Figure] = []
    for n in sizes:
        ds = hpstore.open(str(build(cfg, progress, n))).split("train")
        chunks = -(-len(ds) // ds.spec.chunk_rows)
        progress(f"{n:,} samples ({chunks:,} chunks): fresh loaders and ds[1000:1010]")
        first_batch(ds)  # the dataset's shard indices load once per Dataset: not a plan cost
        reps = range(max(3, cfg.repeats))
        fb = [(first_batch(ds), first_batch(ds, traced=True)) for _ in reps]
        ra = [(random_access(ds), random_access(ds, traced=True)) for _ in reps]
        note = f"{n:,} one-byte samples in {chunks:,} chunks, warm; store opened once"
        figs += [
            Figure(
                bench="plans",
                name=f"{n:.0e} samples: fresh loader to first batch",
                unit="ms",
                values=[1e3 * s for s, _ in fb],
                higher_is_better=False,
                target="≤ 10 ms at 1e9" if n == 10**9 else None,
                extra={"note": note},
            ),
            Figure(
                bench="plans",
                name=f"{n:.0e} samples: loader heap at first batch",
                unit="MB",
                values=[m / 1e6 for _, m in fb],
                higher_is_better=False,
                target="≤ 64 MB at 1e9" if n == 10**9 else None,
                extra={"note": note + "; tracemalloc peak (includes the first window's rows and chunk)"},
            ),
            Figure(
                bench="plans",
                name=f"{n:.0e} samples: ds[1000:1010]",
                unit="ms",
                values=[1e3 * s for s, _ in ra],
                higher_is_better=False,
                extra={"note": note, "heap_peak_mb": [m / 1e6 for _, m in ra]},
            ),
        ]
    return figs


if __name__ == "__main__":
    raise SystemExit(main(run))
