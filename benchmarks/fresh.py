"""Fresh loaders over warm stores: the first epoch a training run sees, against the baselines.

The numbers of issue 14's "first batch and first epoch" and "large samples at memory speed", in one
command, with every contender's repeats interleaved (so drift in the machine's load hits all alike):

- **First epochs** of fresh ``hpstore.Loader`` s (empty chunk cache, files in the page cache;
  ``benchmarks.loader.first_epochs``: fresh loaders back to back until 0.5 s are timed, summed)
  against the naive memmap ``DataLoader`` (per-sample ``__getitem__``, ``RandomSampler``) and the
  fair baseline (one sorted fancy index per batch into an already-mapped memmap, ``BatchSampler``,
  persistent workers), with 0 and 2 workers, on the 200,000-sample 28×28 (zstd) and 3×64×64 (raw)
  stores of ``benchmarks.loader``. For 3×64×64 also GB/s and CPU µs per sample, next to a
  1-thread ``np.copyto`` of 256 MiB measured in the same run.
- **Creation to last batch** of a fresh loader over the 60,000-sample 28×28 store, and its time to
  the first batch (``benchmarks.consumer.first_batch_figures``).

``python -m benchmarks --only fresh`` (``--quick``: one repeat, 20,000 and 6,000 samples).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import BenchConfig, Figure, Progress, main
from benchmarks.consumer import first_batch_figures
from benchmarks.loader import Data, Epoch, batched_epochs, build, first_epochs, naive_epoch

CAP_S = 20.0
"""Longest a baseline epoch is timed (the naive 3×64×64 epoch with 2 workers runs ~8 s)."""


def copy_gb_s(nbytes: int = 256 << 20, rounds: int = 3) -> float:
    """One thread's ``np.copyto`` between two touched buffers, best of ``rounds``."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    dst.fill(1)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def first_epoch_figures(cfg: BenchConfig, progress: Progress, data: Data) -> list[Figure]:
    runs: dict[str, list[Epoch]] = {}
    copies: list[float] = []
    cap = 4.0 if cfg.quick else CAP_S
    image_bytes = int(np.prod(data.shape))  # GB/s of the image field alone
    for r in range(cfg.repeats):
        for workers in (0, 2):
            progress(f"{data.name}, {workers} workers, repeat {r + 1}/{cfg.repeats}")
            runs.setdefault(f"hpstore {workers}", []).append(first_epochs(data, workers, lambda: None, 0.5))
            runs.setdefault(f"naive {workers}", []).append(naive_epoch(data, workers, cap))
            runs.setdefault(f"fair {workers}", []).extend(batched_epochs(data, workers, 1, cap))
        copies.append(copy_gb_s())
    figs = []
    for workers in (0, 2):
        ours = runs[f"hpstore {workers}"]
        extra: dict[str, Any] = {
            "cpu_us_per_sample": [e.cpu_us_per_sample for e in ours],
            "gb_s": [e.rate * image_bytes / 1e9 for e in ours],
            "copy_1_thread_gb_s": copies,
            "note": "fresh loaders, first epochs, files in the page cache",
        }
        for base, label in (
            ("naive", "naive memmap DataLoader"),
            ("fair", "memmap + sorted fancy index per batch"),
        ):
            figs.append(
                Figure(
                    bench="fresh",
                    name=f"{data.name} first epoch, {workers} workers, vs {base}",
                    unit="samples/s",
                    values=[e.rate for e in ours],
                    baseline=f"{label}, {workers} workers",
                    baseline_values=[e.rate for e in runs[f"{base} {workers}"]],
                    extra={**extra, "baseline_cpu_us_per_sample": [
                        e.cpu_us_per_sample for e in runs[f"{base} {workers}"]
                    ]},
                )
            )  # fmt: skip
        rate = float(np.median([e.rate for e in ours]))
        progress(
            f"{data.name} {workers} workers: {rate:,.0f} samples/s ({rate * image_bytes / 1e9:.2f} GB/s, "
            f"{np.median(extra['cpu_us_per_sample']):.1f} CPU µs/sample), naive "
            f"{np.median([e.rate for e in runs[f'naive {workers}']]):,.0f}, fair "
            f"{np.median([e.rate for e in runs[f'fair {workers}']]):,.0f}; copy {np.median(copies):.1f} GB/s"
        )
    return figs


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    torch.set_num_threads(1)
    small = build(cfg, progress, "digits", 20_000 if cfg.quick else 200_000, (28, 28))
    big = build(cfg, progress, "img64", 6_000 if cfg.quick else 200_000, (3, 64, 64))
    figs = first_batch_figures(cfg, progress, build(cfg, progress, "digits60k", 60_000, (28, 28)))
    for f in figs:
        progress(f"{f.name}: median {np.median(f.values):,.1f} {f.unit}")
    for data in (small, big):
        figs += first_epoch_figures(cfg, progress, data)
    return figs


if __name__ == "__main__":
    raise SystemExit(main(run))
