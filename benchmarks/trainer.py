"""Trainer benchmark: does training from a store run as fast as training from memory?

Two settings, each measured side by side in one run with the same trainer, model, batch size and
optimizer; only the loader differs:

1. **Compute-bound** (the CNN on 28×28 uint8 images, MNIST-sized): trained from the store through
   ``hpstore.Loader`` vs from the same samples already in memory as torch tensors (the limit: a
   vectorised index of resident tensors). Targets: the store-fed samples/s ≥ 95% of the in-memory
   run's, and a data-wait fraction ≤ 2%, both from epoch 2 on.
2. **I/O-bound** (a linear classifier on 3×64×64 uint8 images, larger than the loader's cache, read
   through a link of fixed bandwidth, as from a network disk or an object store): the link is the
   limit. The data-wait fraction the trainer reports is compared with the one implied by the two
   runs' epoch times, ``1 − t_memory / t_store`` (ratio ≈ 1 when it is reported correctly), and the
   read rate during training with the loader's alone through the same link (ratio ≈ 1).
   The link is a wrapper that sleeps for ``bytes / bandwidth`` per request, one request at a time,
   so it costs no CPU: on a small shared machine a CPU-bound loader would also slow the model down
   by taking its cores, which a wait fraction cannot show and the comparison would misread.

The headline figures use epochs 2.. (epoch 1 includes the pipeline start and a cold cache), where
a loader cache that holds the whole dataset makes "from the store" a RAM cache against in-memory
tensors. So the compute-bound setting also reports the two cases that decide whether a store pays
off when data does not fit, side by side with the same in-memory runs:

- **cold first epoch**: epoch 1 of the store-fed run (the loader's cache empty; the store's files
  evicted from the page cache with ``posix_fadvise`` before each store-fed run, the figure's note
  says whether that took) against epoch 1 of the in-memory run;
- **dataset larger than the cache**: a store-fed run whose loader cache holds a quarter of the
  dataset, epochs 2.., against the in-memory run.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpstore
from benchmarks.cache import drop_page_cache
from benchmarks.common import BenchConfig, Figure, Progress, main
from hpstore.dataset import Dataset, Store
from hpstore.format.writer import Layout, StoreWriter
from hpstore.loading.loader import Loader
from hpstore.storage.base import Range, Storage
from hpstore.storage.open import open_storage
from hpstore.storage.wrappers import ForwardingStorage
from trainer import distributed
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.train import LoaderFactory, Trainer, make_loader

BENCH = "trainer"


@dataclass(frozen=True, kw_only=True)
class Setting:
    name: str
    model: str
    shape: tuple[int, ...]
    samples: int
    epochs: int
    batch_size: int
    cache_bytes: int
    link_mb_per_s: float | None = None  # bandwidth of the link the store is read through

    @property
    def label(self) -> str:
        return f"{self.model} {'x'.join(map(str, self.shape))}"


def settings(quick: bool) -> tuple[Setting, Setting]:
    compute = Setting(
        name="compute", model="cnn", shape=(28, 28), samples=4_000 if quick else 60_000,
        epochs=2 if quick else 3, batch_size=128, cache_bytes=256 << 20,
    )  # fmt: skip
    io_bound = Setting(
        name="io", model="linear", shape=(3, 64, 64), samples=2_000 if quick else 20_000,
        epochs=3, batch_size=128, cache_bytes=(8 << 20) if quick else (32 << 20),
        link_mb_per_s=25.0,
    )  # fmt: skip
    return compute, io_bound


# -- data ------------------------------------------------------------------------------------------


def build_store(path: Path, s: Setting) -> str:
    """Images with a class-dependent bright patch over noise; reused when already there."""
    if (path / "manifest.json").exists():
        return str(path)
    rng = np.random.default_rng(0)
    with StoreWriter(open_storage(str(path)), layout=Layout(), overwrite=True) as w:
        sw = w.split("train")
        for start in range(0, s.samples, 4096):
            n = min(4096, s.samples - start)
            y = rng.integers(0, 10, n)
            x = rng.integers(0, 96, (n, *s.shape), dtype=np.uint8)
            rows = (y * s.shape[-2] // 10)[:, None] + np.arange(s.shape[-2] // 10)
            x[np.arange(n)[:, None], ..., rows, :] = 255
            sw.append({"image": x, "label": y.astype(np.int64)})
        w.add_split(sw)
        w.commit()
    return str(path)


class MemoryLoader:
    """The in-memory limit: the whole split as tensors resident on the training device (RAM, or GPU
    memory), batches by a seeded permutation."""

    def __init__(self, ds: Dataset, cfg: TrainConfig, dist: Dist, *, train: bool, with_index: bool) -> None:
        cols = ds.read(np.arange(len(ds)), [cfg.input, cfg.target])
        self.input, self.target = cfg.input, cfg.target
        self.x = torch.from_numpy(cols[cfg.input]).to(dist.device)
        self.y = torch.from_numpy(cols[cfg.target]).to(dist.device)
        self.batch_size, self.seed, self.shuffle = cfg.batch_size, cfg.seed, train
        self.epoch = 0
        self.stats: dict[str, float] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Any:
        n = len(self.y)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = (torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)).to(self.x.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {self.input: self.x[idx], self.target: self.y[idx], "index": idx}


class Link(ForwardingStorage):
    """Reads through a link of ``mb_per_s``: each request occupies it for ``bytes / bandwidth``
    seconds, one request at a time, spent sleeping (so the link costs no CPU)."""

    def __init__(self, inner: Storage, mb_per_s: float) -> None:
        super().__init__(inner)
        self.seconds_per_byte = 1 / (mb_per_s * 1e6)
        self._lock = threading.Lock()
        self._free_at = 0.0

    def _occupy(self, nbytes: int) -> None:
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + nbytes * self.seconds_per_byte
            done = self._free_at
        time.sleep(max(0.0, done - time.perf_counter()))

    def read(self, key: str) -> bytes:
        data = self.inner.read(key)
        self._occupy(len(data))
        return data

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self.read_ranges([(key, start, end)])[0]

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        out = self.inner.read_ranges(ranges)
        self._occupy(sum(len(b) for b in out))
        return out


def loaders_for(s: Setting) -> LoaderFactory:
    """``hpstore.Loader`` on the split, read through the setting's link when it has one."""

    def build(ds: Dataset, cfg: TrainConfig, dist: Dist, *, train: bool, with_index: bool) -> Any:
        if s.link_mb_per_s is not None:
            ds = Store(Link(ds.store.storage, s.link_mb_per_s), ds.store.manifest).split(ds.name)
        return make_loader(ds, cfg, dist, train=train, with_index=with_index)

    return build


# -- runs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    samples_per_s: float
    data_wait_frac: float
    read_mb_per_s: float
    epoch_s: float
    epoch_waits: tuple[float, ...]  # data-wait fraction of every epoch, the first included
    first_samples_per_s: float  # epoch 1 alone


def train_config(store: str, s: Setting) -> TrainConfig:
    return TrainConfig(
        data=store, model=s.model, epochs=s.epochs, batch_size=s.batch_size, eval_split=None,  # type: ignore[arg-type]
        cache_bytes=s.cache_bytes, log_every=10_000, seed=0,
    )  # fmt: skip


def train_once(store: str, s: Setting, *, in_memory: bool) -> RunResult:
    cfg = train_config(store, s)
    dist = distributed.init(cfg.device)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, dist, loaders=MemoryLoader if in_memory else loaders_for(s))
        trainer.fit()
    waits = tuple(float(r["data_wait_frac"]) for r in trainer.epoch_records)
    first = trainer.epoch_records[0]
    recs = trainer.epoch_records[1:] or trainer.epoch_records  # epoch 2 on (the warm-up has one)
    wall = sum(r["wall_s"] for r in recs)
    return RunResult(
        samples_per_s=sum(r["samples"] for r in recs) / wall,
        data_wait_frac=sum(r["data_wait_frac"] * r["wall_s"] for r in recs) / wall,
        read_mb_per_s=sum(r["read_mb_per_s"] * r["wall_s"] for r in recs) / wall,
        epoch_s=wall / len(recs),
        epoch_waits=waits,
        first_samples_per_s=first["samples"] / first["wall_s"],
    )


def wait_per_epoch(label: str, fed: list[RunResult]) -> list[Figure]:
    """One figure per epoch (the ``data_wait`` plot): the store-fed runs' data-wait fraction."""
    epochs = min(len(r.epoch_waits) for r in fed)
    return [
        Figure(bench=BENCH, name=f"{label} data-wait fraction, epoch {e + 1}", unit="%",
               values=[100 * r.epoch_waits[e] for r in fed], higher_is_better=False,
               extra={"plot": "data_wait", "x": e + 1, "series": label})
        for e in range(epochs)
    ]  # fmt: skip


def loader_alone_mb_per_s(store: str, s: Setting) -> float:
    """The same loader's read rate over epoch 2 with no model in the loop."""
    cfg = train_config(store, s)
    loader = loaders_for(s)(
        hpstore.open(store).split("train"), cfg, distributed.init("cpu"), train=True, with_index=False
    )
    assert isinstance(loader, Loader)
    for epoch in range(2):
        loader.set_epoch(epoch)
        before = loader.stats
        t0 = time.perf_counter()
        for _ in loader:
            pass
        elapsed = time.perf_counter() - t0
    return (loader.stats["bytes_read"] - before["bytes_read"]) / 1e6 / elapsed


def _side_by_side(
    store: str, s: Setting, repeats: int, progress: Progress, *, small_cache: Setting | None = None
) -> tuple[list[RunResult], list[RunResult], list[RunResult], list[str]]:
    """Store-fed and in-memory runs alternately (and, with ``small_cache``, a store-fed run with
    that setting's smaller cache in each repeat too). Every store-fed run starts with the store's
    files evicted from the page cache (as far as permitted: the notes say)."""
    fed, mem, small, notes = [], [], [], []
    progress(f"{s.label}: warm-up run (not measured)")
    train_once(store, replace(s, epochs=1), in_memory=True)
    for i in range(repeats):
        progress(f"{s.label}: repeat {i + 1}/{repeats}, from the store")
        notes.append(drop_page_cache([store], system_wide=False).note)
        fed.append(train_once(store, s, in_memory=False))
        if small_cache is not None:
            progress(
                f"{s.label}: repeat {i + 1}/{repeats}, from the store, cache {small_cache.cache_bytes >> 20} MiB"
            )
            drop_page_cache([store], system_wide=False)
            small.append(train_once(store, small_cache, in_memory=False))
        progress(f"{s.label}: repeat {i + 1}/{repeats}, from memory")
        mem.append(train_once(store, s, in_memory=True))
    return fed, mem, small, notes


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    compute, io_bound = settings(cfg.quick)
    root = cfg.data_dir / "trainer"
    figures: list[Figure] = []

    store = build_store(root / f"images-28x28-{compute.samples}", compute)
    dataset_bytes = compute.samples * int(np.prod(compute.shape))
    small = replace(compute, name="compute-small-cache", cache_bytes=dataset_bytes // 4)
    fed, mem, fed_small, notes = _side_by_side(store, compute, cfg.repeats, progress, small_cache=small)
    extra: dict[str, Any] = {"samples": compute.samples, "epochs": compute.epochs, "batch_size": compute.batch_size,
             "device": "cuda" if torch.cuda.is_available() else "cpu", "dataset_mb": dataset_bytes / 1e6,
             "cache_bytes": compute.cache_bytes}  # fmt: skip
    small_extra = {
        **extra,
        "cache_bytes": small.cache_bytes,
        "cache_fraction": small.cache_bytes / dataset_bytes,
    }
    figures += [
        Figure(bench=BENCH, name=f"{compute.label} samples/s, store-fed", unit="samples/s",
               values=[r.samples_per_s for r in fed], baseline="in-memory tensors",
               baseline_values=[r.samples_per_s for r in mem], target="≥ 0.95×", extra=extra),
        Figure(bench=BENCH, name=f"{compute.label} data-wait fraction, store-fed", unit="%",
               values=[100 * r.data_wait_frac for r in fed], higher_is_better=False, target="≤ 2%", extra=extra),
        *wait_per_epoch(compute.label, fed),
        Figure(bench=BENCH, name=f"{compute.label} samples/s, store-fed, first epoch (cold)", unit="samples/s",
               values=[r.first_samples_per_s for r in fed], baseline="in-memory tensors, first epoch",
               baseline_values=[r.first_samples_per_s for r in mem], extra={**extra, "note": notes[-1]}),
        Figure(bench=BENCH, name=f"{compute.label} data-wait fraction, store-fed, first epoch (cold)", unit="%",
               values=[100 * r.epoch_waits[0] for r in fed], higher_is_better=False, extra=extra),
        Figure(bench=BENCH, name=f"{compute.label} samples/s, store-fed, cache = 1/4 of the data", unit="samples/s",
               values=[r.samples_per_s for r in fed_small], baseline="in-memory tensors",
               baseline_values=[r.samples_per_s for r in mem], extra=small_extra),
        Figure(bench=BENCH, name=f"{compute.label} data-wait fraction, store-fed, cache = 1/4 of the data",
               unit="%", values=[100 * r.data_wait_frac for r in fed_small], higher_is_better=False,
               extra=small_extra),
    ]  # fmt: skip

    store = build_store(root / f"images-3x64x64-{io_bound.samples}", io_bound)
    fed, mem, _, _ = _side_by_side(store, io_bound, cfg.repeats, progress)
    progress(f"{io_bound.label}: the loader alone")
    alone = [loader_alone_mb_per_s(store, io_bound) for _ in range(cfg.repeats)]
    implied = [max(0.0, 1 - m.epoch_s / f.epoch_s) for f, m in zip(fed, mem, strict=True)]
    extra = {"samples": io_bound.samples, "epochs": io_bound.epochs, "cache_bytes": io_bound.cache_bytes,
             "dataset_mb": io_bound.samples * int(np.prod(io_bound.shape)) / 1e6,
             "in_memory_samples_per_s": [r.samples_per_s for r in mem]}  # fmt: skip
    figures += [
        Figure(bench=BENCH, name=f"{io_bound.label} data-wait fraction, reported", unit="%",
               values=[100 * r.data_wait_frac for r in fed], baseline="implied 1 − t_mem/t_store",
               baseline_values=[100 * x for x in implied], higher_is_better=False, target="≈ 1×", extra=extra),
        Figure(bench=BENCH, name=f"{io_bound.label} read MB/s while training", unit="MB/s",
               values=[r.read_mb_per_s for r in fed], baseline="loader alone",
               baseline_values=alone, target="≈ 1×", extra=extra),
        Figure(bench=BENCH, name=f"{io_bound.label} samples/s, store-fed", unit="samples/s",
               values=[r.samples_per_s for r in fed], baseline="in-memory tensors",
               baseline_values=[r.samples_per_s for r in mem], extra=extra),
        *wait_per_epoch(io_bound.label, fed),
    ]  # fmt: skip
    return figures


if __name__ == "__main__":
    raise SystemExit(main(run))
