"""The loader feeding a consumer that works: slowdown against batches from memory, data wait, first batch.

A real consumer is a training step. On a GPU its Python thread mostly launches kernels and holds the
GIL; this machine has no GPU, so the step is simulated honestly by a fixed amount of work per batch
(calibrated alone to last ``batch / rate`` seconds), never by a deadline, so contention shows:

- ``gil``: a pure-Python loop (holds the GIL, as kernel launches and optimizer bookkeeping do);
- ``nogil``: numpy ufuncs over a 256 KiB array (release the GIL, as compute kernels do).

For each, the same number of batches is consumed once from a fresh ``hpstore.Loader`` (default
options, first epoch, warm page cache) and once from batches already in memory. Slowdown = loader
wall time ÷ memory wall time; data wait = seconds blocked in ``next`` ÷ loader wall time.

Threads against worker processes (``workers="processes"``), pinned off the consumer's CPU (the
default ``worker_cpus="auto"``) and not pinned, side by side with repeats interleaved,
for both consumers at the two target rates (``modes_figures``); the processes are started before
the timed epoch (``loader.start()``), as a training run starts them once. Each figure notes the load
average: on a shared machine the other tenants' load is part of the condition.
``python -m benchmarks.consumer [--quick]`` runs only these.

Also: time to the first batch of a fresh loader (``loader.stats["first_batch_seconds"]``) and whole
first epochs of fresh loaders, creation to last batch, on a 60,000-sample 28×28 store against the
naive memmap DataLoader with 0 and 2 workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import hpstore
from benchmarks.common import BenchConfig, Figure, Progress, main

BATCH = 256
MODES: dict[str, dict[str, Any]] = {
    "threads": {"workers": "threads"},
    "processes": {"workers": "processes"},  # pinned off the consumer's CPU (worker_cpus="auto")
    "processes unpinned": {"workers": "processes", "worker_cpus": None},
}
"""Loader settings compared side by side (``modes_figures``)."""

Work = Callable[[int], None]


def spin(n: int) -> None:
    """Pure Python: holds the GIL for the whole loop."""
    x = 0
    for i in range(n):
        x += i


_ARR = np.ones(1 << 16, dtype=np.float32)


def ufuncs(n: int) -> None:
    """numpy work on 256 KiB: each ufunc releases the GIL while it runs."""
    for _ in range(n):
        np.sqrt(_ARR, out=_ARR)


def calibrate(work: Work, seconds: float) -> int:
    """Units of ``work`` that take ``seconds`` alone (median of several probes)."""
    probes = []
    for _ in range(5):
        t0 = time.perf_counter()
        work(2000)
        probes.append((time.perf_counter() - t0) / 2000)
    return max(1, int(seconds / float(np.median(probes))))


def consume(batches: Iterator[Any], work: Work, units: int, n: int) -> tuple[float, float, int]:
    """``(wall, wait, batches)``: run ``work(units)`` after each of up to ``n`` batches."""
    wait = 0.0
    done = 0
    t0 = time.perf_counter()
    while done < n:
        w0 = time.perf_counter()
        try:
            next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - w0
        work(units)
        done += 1
    return time.perf_counter() - t0, wait, done


def fed_vs_memory(
    ds: hpstore.Dataset, workers: int, work: Work, rate: float, seconds: float, mode: str = "threads"
) -> tuple[float, float, float]:
    """``(slowdown, data-wait fraction, step slowdown)`` of one consumer at ``rate`` samples/s; the
    step slowdown leaves the waits out (the consumer's own work made slower by sharing the CPU and
    the GIL with the loader)."""
    units = calibrate(work, BATCH / rate)
    loader = hpstore.Loader(ds, BATCH, num_workers=workers, **MODES[mode])
    loader.start()  # worker processes (if any) are ready before the clock starts
    n = max(8, min(len(loader), int(seconds * rate / BATCH)))
    fed, wait, done = consume(iter(loader), work, units, n)
    loader.close()
    held = hpstore.Loader(ds, BATCH, num_workers=0, first_window=None)
    memory = [b for _, b in zip(range(min(done, 64)), held, strict=False)]
    held.close()
    ref, _, _ = consume((memory[i % len(memory)] for i in range(done)), work, units, done)
    return fed / ref, wait / fed, (fed - wait) / ref


def consumer_figures(cfg: BenchConfig, progress: Progress, small: Any, big: Any) -> list[Figure]:
    seconds = 0.5 if cfg.quick else 2.0
    cases = [
        (small, "gil", spin, (10_000, 150_000, 1_000_000), (0, 2)),
        (small, "nogil", ufuncs, (10_000, 150_000, 1_000_000), (2,)),
        (big, "gil", spin, (10_000, 20_000), (0, 2)),
        (big, "nogil", ufuncs, (20_000,), (2,)),
    ]
    if cfg.quick:  # only the rows with targets
        cases = [(small, "gil", spin, (150_000,), (2,)), (big, "gil", spin, (20_000,), (2,))]
    figs = []
    for data, kind, work, rates, worker_counts in cases:
        ds = data.dataset()
        for rate in rates:
            for workers in worker_counts:
                progress(f"consumer {kind} {data.name} {rate:,}/s, {workers} workers")
                runs = [fed_vs_memory(ds, workers, work, rate, seconds) for _ in range(cfg.repeats)]
                target = None
                if (
                    kind == "gil"
                    and workers == 2
                    and (data.name, rate) in (("digits", 150_000), ("img64", 20_000))
                ):
                    target = "≤ 1.02× and data wait ≤ 2%"
                figs.append(
                    Figure(
                        bench="loader",
                        name=f"consumer {kind} {data.name} at {rate:,} samples/s, {workers} workers: slowdown",
                        unit="×",
                        values=[r[0] for r in runs],
                        higher_is_better=False,
                        target=target,
                        extra={
                            "data_wait_percent": [100 * r[1] for r in runs],
                            "note": "fresh loader's first epoch (warm page cache) vs the same batches from "
                            "memory, same work per batch; 2 shared CPU cores",
                        },
                    )
                )
    return figs


def first_batch_figures(cfg: BenchConfig, progress: Progress, data: Any) -> list[Figure]:
    """First batch and whole first epochs (creation to last batch) of fresh loaders vs naive."""
    from benchmarks.loader import naive_epoch

    figs = []
    for workers in (0, 2):
        progress(f"{data.name}: first batch and first epochs of fresh loaders, {workers} workers")
        firsts, rates, naive = [], [], []
        for _ in range(2 if cfg.quick else max(3, cfg.repeats)):
            t0 = time.perf_counter()
            loader = hpstore.Loader(data.dataset(), BATCH, num_workers=workers)
            n = sum(len(b["label"]) for b in loader)
            rates.append(n / (time.perf_counter() - t0))
            firsts.append(loader.stats["first_batch_seconds"] * 1e3)
            loader.close()
            naive.append(naive_epoch(data, workers, 1e9).rate)
        figs.append(
            Figure(
                bench="loader",
                name=f"{data.name} fresh loader, {workers} workers: time to first batch",
                unit="ms",
                values=firsts,
                higher_is_better=False,
                target="≤ 10 ms",
                extra={"note": "creation (store already open) to first batch, warm page cache"},
            )
        )
        figs.append(
            Figure(
                bench="loader",
                name=f"{data.name} fresh loader first epoch, {workers} workers (creation to last batch)",
                unit="samples/s",
                values=rates,
                baseline=f"naive memmap DataLoader, {workers} workers, whole epoch",
                baseline_values=naive,
                target="≥ 8× naive",
            )
        )
    return figs


def modes_figures(cfg: BenchConfig, progress: Progress, small: Any, big: Any) -> list[Figure]:
    """Threads vs worker processes, 2 workers, GIL-holding and GIL-releasing consumers, at 150 k
    samples/s of 28×28 and 20 k samples/s of 3×64×64; repeats interleaved between the modes."""
    seconds = 0.5 if cfg.quick else 2.0
    figs = []
    for data, rate in ((small, 150_000), (big, 20_000)):
        ds = data.dataset()
        for kind, work in (("gil", spin), ("nogil", ufuncs)):
            runs: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
            loads = []
            for r in range(cfg.repeats):
                for mode, out in runs.items():
                    progress(f"consumer {kind} {data.name} {rate:,}/s, 2 {mode}, repeat {r + 1}")
                    out.append(fed_vs_memory(ds, 2, work, rate, seconds, mode))
                    loads.append(os.getloadavg()[0])
            for mode, out in runs.items():
                figs.append(
                    Figure(
                        bench="loader",
                        name=f"consumer {kind} {data.name} at {rate:,} samples/s, 2 worker {mode}: slowdown",
                        unit="×",
                        values=[r[0] for r in out],
                        higher_is_better=False,
                        target="≤ 1.02× and data wait ≤ 2%" if kind == "gil" else None,
                        extra={
                            "data_wait_percent": [100 * r[1] for r in out],
                            "step_slowdown": [r[2] for r in out],
                            "load_average_1min": [round(x, 1) for x in loads],
                            "note": "fresh loader's first epoch (warm page cache; worker processes started "
                            "before the clock) vs the same batches from memory, same work per batch; "
                            "threads, processes pinned off the consumer's CPU (worker_cpus='auto', the "
                            "default) and unpinned processes interleaved; the load average says what "
                            "else ran",
                        },
                    )
                )
    return figs


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    """Stand-alone: only the threads-vs-processes comparison (datasets as in ``benchmarks.loader``;
    3×64×64 with 20,000 samples, a one-second epoch at 20 k samples/s)."""
    import torch

    from benchmarks.loader import build

    torch.set_num_threads(1)
    small = build(cfg, progress, "digits", 20_000 if cfg.quick else 200_000, (28, 28))
    big = build(cfg, progress, "img64_20k", 6_000 if cfg.quick else 20_000, (3, 64, 64))
    return modes_figures(cfg, progress, small, big)


if __name__ == "__main__":
    raise SystemExit(main(run))
