"""The streaming loader against the naive baseline, plain zarr and the disk, side by side.

Two datasets, written once under ``DATA_DIR/loader`` with ``StoreWriter`` (default layout: 1 MiB
chunks, 64 MiB shards, zstd-1) plus the same arrays as ``.npy`` files for the baseline:

- ``digits``: 28×28 uint8 digit-like images (``benchmarks.codecs.digits``) + int64 label;
  200,000 samples (20,000 with ``--quick``);
- ``img64``: 3×64×64 uint8 images (smooth colour fields plus noise, so they compress a little, as
  photographs do) + int64 label; 200,000 samples ≈ 2.5 GB (6,000 with ``--quick``).

For each dataset, warm and cold page cache (cold: the files are dropped from the page cache before
every epoch; the note says how), 0 and 2 workers, one shuffled epoch (batch 256) of:

- ``hpstore``: ``hpstore.Loader`` (threads; a fresh loader per epoch, so its RAM cache never helps;
  fresh loaders back to back until 0.5 s are timed, summed, since a 28×28 epoch lasts ~0.1 s);
- ``hpstore, 2 processes``: the same windows built in torch DataLoader worker processes that hand
  whole windows over in shared memory (the alternative the thread design was chosen over);
- ``naive``: ``np.load(mmap_mode="r")`` + ``__getitem__`` per sample + ``DataLoader`` +
  ``RandomSampler`` + default collate;
- ``zarr``: plain ``zarr.open_array`` on the same arrays, shuffled batches through
  ``get_orthogonal_selection`` (time-capped: it is slow), and a sequential whole-array read.

Also: the O_DIRECT sequential read of the store's files (``limits.read_files``, the disk's limit),
the epoch-2 chunk hit rate with a RAM cache of 25/50/75% of the data (known-order eviction vs LRU),
loader CPU time per sample (all threads and child processes), RSS from epoch 2 to 10, and the
shuffle quality of the plan at several window sizes (pure computation).

``python -m benchmarks.loader [--quick] [--data-dir DIR]``.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler
from torch.utils.data import Dataset as TorchDataset

import hpstore
from benchmarks.cache import drop_page_cache
from benchmarks.codecs import digits
from benchmarks.common import BenchConfig, Figure, Progress, main
from benchmarks.limits import read_files
from hpstore.format.writer import StoreWriter
from hpstore.loading import batch as batching
from hpstore.loading.cache import ChunkCache, LruPolicy
from hpstore.loading.plan import EpochPlan, PlanSpec, assign
from hpstore.storage.local import LocalStorage

BATCH = 256
MB = 1e6
FORMAT = 2  # bump when the generated data changes, so old benchmark data is rebuilt


@dataclass(frozen=True)
class Data:
    name: str
    root: Path
    n: int
    shape: tuple[int, ...]

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def images(self) -> Path:
        return self.root / "images.npy"

    @property
    def labels(self) -> Path:
        return self.root / "labels.npy"

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape)) + 8

    @property
    def stored_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.store.rglob("*") if f.is_file())

    def dataset(self) -> hpstore.Dataset:
        return hpstore.open(str(self.store)).split("train")


def smooth_images(n: int, seed: int) -> np.ndarray:
    """3×64×64 colour fields: an 8×8 random field upsampled, plus ±12 noise."""
    rng = np.random.default_rng(seed)
    low = rng.integers(30, 225, (n, 3, 8, 8), dtype=np.int16)
    img = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)
    img += rng.integers(-12, 13, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def build(cfg: BenchConfig, progress: Progress, name: str, n: int, shape: tuple[int, ...]) -> Data:
    """Write the dataset once (store + .npy copies); reuse it when a matching one is there."""
    data = Data(name, cfg.data_dir / "loader" / name, n, shape)
    meta = {"format": FORMAT, "n": n, "shape": list(shape)}
    done = data.root / "done.json"
    if done.exists() and json.loads(done.read_text()) == meta:
        return data
    progress(f"writing the {name} dataset ({n} samples of {'×'.join(map(str, shape))}), once")
    shutil.rmtree(data.root, ignore_errors=True)
    data.root.mkdir(parents=True)
    images = np.lib.format.open_memmap(data.images, mode="w+", dtype=np.uint8, shape=(n, *shape))
    labels = np.random.default_rng(1).integers(0, 10, n).astype(np.int64)
    np.save(data.labels, labels)
    with StoreWriter(LocalStorage(str(data.store))) as w:
        sw = w.split("train")
        for start in range(0, n, 8192):
            m = min(8192, n - start)
            block = digits(m, seed=start) if shape == (28, 28) else smooth_images(m, seed=start)
            images[start : start + m] = block
            sw.append({"image": block, "label": labels[start : start + m]})
        w.add_split(sw)
        w.commit()
    images.flush()
    del images
    done.write_text(json.dumps(meta))
    return data


# -- the contenders ---------------------------------------------------------------------------------


@dataclass
class Epoch:
    seconds: float
    samples: int
    cpu_seconds: float
    stats: dict[str, float]

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    @property
    def cpu_us_per_sample(self) -> float:
        return self.cpu_seconds / self.samples * 1e6


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its reaped children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed_epoch(batches: Callable[[], Iterator[Any]], size: Callable[[Any], int], cap: float = 1e9) -> Epoch:
    """Iterate ``batches()`` for an epoch, or until ``cap`` seconds, counting samples."""
    t0, c0 = time.perf_counter(), _cpu()
    n = 0
    for b in batches():
        n += size(b)
        if time.perf_counter() - t0 > cap:
            break
    return Epoch(time.perf_counter() - t0, n, _cpu() - c0, {})


def hpstore_epoch(data: Data, workers: int, **kw: Any) -> Epoch:
    loader = hpstore.Loader(data.dataset(), BATCH, num_workers=workers, **kw)
    e = timed_epoch(lambda: iter(loader), lambda b: len(b["label"]))
    e.stats = loader.stats
    return e


def first_epochs(data: Data, workers: int, before: Callable[[], object], min_seconds: float) -> Epoch:
    """First epochs (a new loader each, empty chunk cache) until ``min_seconds`` of them have been
    timed, summed: a 28×28 first epoch lasts ~0.1 s here, short enough for one hiccup of a shared
    machine to halve its rate. ``before`` runs untimed ahead of each (dropping the page cache)."""
    epochs: list[Epoch] = []
    while not epochs or (sum(e.seconds for e in epochs) < min_seconds and len(epochs) < 8):
        before()
        epochs.append(hpstore_epoch(data, workers))
    total = Epoch(
        seconds=sum(e.seconds for e in epochs),
        samples=sum(e.samples for e in epochs),
        cpu_seconds=sum(e.cpu_seconds for e in epochs),
        stats={k: sum(e.stats[k] for e in epochs) for k in ("wait_seconds",)},
    )
    total.stats["loaders"] = len(epochs)
    return total


def steady_epochs(data: Data, repeats: int) -> list[Epoch]:
    """Epochs 2.. of one loader with the default RAM cache (what a multi-epoch run sees)."""
    loader = hpstore.Loader(data.dataset(), BATCH, num_workers=2)
    list(loader)
    out = []
    for _ in range(repeats):
        before = loader.stats
        e = timed_epoch(lambda: iter(loader), lambda b: len(b["label"]))
        hits = loader.stats["chunk_hits"] - before["chunk_hits"]
        misses = loader.stats["chunk_misses"] - before["chunk_misses"]
        e.stats = {"chunk_hit_rate": hits / max(1, hits + misses)}
        out.append(e)
    return out


class _Naive(TorchDataset[tuple[torch.Tensor, int]]):
    """The usual hand-written dataset: a memory-mapped array indexed one sample at a time."""

    def __init__(self, data: Data) -> None:
        self.paths = (data.images, data.labels)
        self.n = data.n
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.x is None or self.y is None:  # opened lazily, in each worker process
            self.x = np.load(self.paths[0], mmap_mode="r")
            self.y = np.load(self.paths[1], mmap_mode="r")
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])


def naive_epoch(data: Data, workers: int, cap: float) -> Epoch:
    ds = _Naive(data)
    dl = DataLoader(ds, batch_size=BATCH, sampler=RandomSampler(ds), num_workers=workers)
    return timed_epoch(lambda: iter(dl), lambda b: len(b[1]), cap)


class _Batched(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """The fairer simple baseline: a memory-mapped array read one whole batch at a time with sorted
    fancy indexing (``BatchSampler`` hands ``__getitem__`` a list of indices)."""

    def __init__(self, data: Data) -> None:
        self.paths = (data.images, data.labels)
        self.n = data.n
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.x is None or self.y is None:
            self.x = np.load(self.paths[0], mmap_mode="r")
            self.y = np.load(self.paths[1], mmap_mode="r")
        order = np.sort(np.asarray(idx))
        return torch.from_numpy(self.x[order]), torch.from_numpy(self.y[order])


def batched_loader(data: Data, workers: int) -> DataLoader[Any]:
    ds = _Batched(data)
    sampler = BatchSampler(RandomSampler(range(data.n)), BATCH, drop_last=False)
    return DataLoader(
        ds, sampler=sampler, batch_size=None, num_workers=workers, persistent_workers=workers > 0
    )


def batched_epochs(data: Data, workers: int, repeats: int, cap: float) -> list[Epoch]:
    """Epochs 2.. of one ``batched_loader`` (its persistent workers started in an untimed epoch 1)."""
    dl = batched_loader(data, workers)
    timed_epoch(lambda: iter(dl), lambda b: len(b[1]), cap)
    return [timed_epoch(lambda: iter(dl), lambda b: len(b[1]), cap) for _ in range(repeats)]


def zarr_epoch(data: Data, cap: float) -> Epoch:
    """Shuffled batches read through plain zarr indexing (sorted indices, as zarr prefers)."""
    import zarr

    fields = data.dataset().spec.fields
    image = zarr.open_array(str(data.store / fields["image"].path), mode="r")
    label = zarr.open_array(str(data.store / fields["label"].path), mode="r")
    order = np.random.default_rng(0).permutation(data.n)

    def batches() -> Iterator[Any]:
        for a in range(0, data.n, BATCH):
            idx = np.sort(order[a : a + BATCH])
            yield image.get_orthogonal_selection((idx,)), label.get_orthogonal_selection((idx,))

    return timed_epoch(batches, lambda b: len(b[1]), cap)


def zarr_sequential(data: Data) -> Epoch:
    import zarr

    f = data.dataset().spec.fields["image"]
    image = zarr.open_array(str(data.store / f.path), mode="r")
    step = image.shards[0] if image.shards else image.chunks[0]
    return timed_epoch(lambda: (image[a : a + step] for a in range(0, data.n, step)), len)


class _WindowStream(IterableDataset[dict[str, Any]]):
    """Process-based alternative: each DataLoader worker builds its share of the windows with its own
    cache and hands each whole window over in shared memory; the parent slices the batches."""

    def __init__(self, data: Data, spec: PlanSpec, cache_bytes: int) -> None:
        self.data = data
        self.spec = spec
        self.cache_bytes = cache_bytes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        ds = self.data.dataset()
        fields = {n: ds.spec.fields[n] for n in ("image", "label")}
        plan = EpochPlan(self.spec, 0, 0)
        mine = [j for j in range(plan.num_windows) if assign(j, 0, workers) == worker]

        def fetch(keys: list[Any]) -> list[Any]:
            return [ds.reader.read(name, [c])[0] for name, c in keys]

        cache = ChunkCache(self.cache_bytes // workers, fetch)
        for j in mine:
            w = plan.window(j)
            keys = [(n, c) for c in w.chunks for n in fields]
            chunks = dict(zip(keys, cache.get_many(keys), strict=True))
            rows = batching.assemble(
                w,
                fields,
                lambda n, c, chunks=chunks: chunks[(n, c)],  # type: ignore[misc]
                take=batching.shared_array,
                padded_fields=frozenset(),
                with_index=False,
            )
            yield {"window": j, **rows.columns}


def process_epoch(data: Data, workers: int) -> Epoch:
    spec = PlanSpec(num_samples=data.n, chunk_rows=data.dataset().spec.chunk_rows, batch_size=BATCH)
    dl = DataLoader(
        _WindowStream(data, spec, 512 << 20), batch_size=None, num_workers=workers, prefetch_factor=2
    )

    def batches() -> Iterator[dict[str, Any]]:
        for window in dl:
            n = len(window["label"])
            for a in range(0, n, BATCH):
                yield {k: v[a : a + BATCH] for k, v in window.items() if k != "window"}

    return timed_epoch(batches, lambda b: len(b["label"]))


# -- figures ------------------------------------------------------------------------------------------


def _note_cold(notes: set[str], data: Data, paths: list[Path], cold: bool) -> None:
    notes.add(_cold(data, paths, cold))


def _cold(data: Data, paths: list[Path], cold: bool) -> str:
    if not cold:
        return ""
    drop = drop_page_cache(paths, system_wide=False)
    if not drop.cold:
        raise RuntimeError(f"could not make {data.name} cold: {drop.note}")
    return f"cold: {drop.note}"


def throughput_figures(cfg: BenchConfig, progress: Progress, data: Data) -> list[Figure]:
    """samples/s of every contender, warm and cold, 0 and 2 workers, repeats interleaved."""
    cap = 4.0 if cfg.quick else 20.0
    zarr_cap = 2.0 if cfg.quick else 5.0  # zarr's shuffled gather is slow: a few seconds tell its rate
    figs: list[Figure] = []
    for cold in (False, True):
        state = "cold" if cold else "warm"
        results: dict[str, list[Epoch]] = {}
        notes: set[str] = set()
        for r in range(cfg.repeats):
            progress(f"{data.name} {state}: repeat {r + 1}/{cfg.repeats}")
            for workers in (0, 2):
                drop = functools.partial(_note_cold, notes, data, [data.store], cold)
                first = first_epochs(data, workers, drop, min_seconds=0.5)
                results.setdefault(f"hpstore {workers}", []).append(first)
                notes.add(_cold(data, [data.images, data.labels], cold))
                results.setdefault(f"naive {workers}", []).append(naive_epoch(data, workers, cap))
            if not cold:
                for workers in (0, 2):
                    results.setdefault(f"batched {workers}", []).extend(batched_epochs(data, workers, 1, cap))
            notes.add(_cold(data, [data.store], cold))
            results.setdefault("process 2", []).append(process_epoch(data, 2))
            notes.add(_cold(data, [data.store], cold))
            results.setdefault("zarr", []).append(zarr_epoch(data, zarr_cap))
        if not cold:
            results["zarr sequential"] = [zarr_sequential(data) for _ in range(cfg.repeats)]
            results["steady 2"] = steady_epochs(data, cfg.repeats)
        note = "; ".join(sorted(n for n in notes if n))
        figs += _throughput(data, state, results, note)
    return figs


def _throughput(data: Data, state: str, results: dict[str, list[Epoch]], note: str) -> list[Figure]:
    target = {("digits", "warm"): "≥ 10× naive", ("img64", "cold"): "≥ 5× naive"}.get((data.name, state))
    figs = []
    for workers in (0, 2):
        ours, naive = results[f"hpstore {workers}"], results[f"naive {workers}"]
        figs.append(
            Figure(
                bench="loader",
                name=f"{data.name} {state}, {workers} workers: hpstore",
                unit="samples/s",
                values=[e.rate for e in ours],
                baseline=f"naive, {workers} workers",
                baseline_values=[e.rate for e in naive],
                target=target,
                extra={
                    "MB_s": float(np.median([e.rate * data.sample_bytes / MB for e in ours])),
                    "cpu_us_per_sample": float(np.median([e.cpu_us_per_sample for e in ours])),
                    "naive_cpu_us_per_sample": float(np.median([e.cpu_us_per_sample for e in naive])),
                    "naive_samples_measured": int(naive[0].samples),
                    "wait_seconds": float(np.median([e.stats["wait_seconds"] for e in ours])),
                    "note": note,
                },
            )
        )
        if f"batched {workers}" in results:
            figs.append(
                Figure(
                    bench="loader",
                    name=f"{data.name} {state}, {workers} workers: hpstore vs batched memmap",
                    unit="samples/s",
                    values=[e.rate for e in ours],
                    baseline=f"memmap + BatchSampler + sorted fancy indexing, {workers} persistent workers",
                    baseline_values=[e.rate for e in results[f"batched {workers}"]],
                    extra={
                        "note": "hpstore: fresh loaders' first epochs; baseline: epochs after the first "
                        "(workers already started), page cache warm"
                    },
                )
            )
    for workers in (0, 2):
        ours, naive = results[f"hpstore {workers}"], results[f"naive {workers}"]
        figs.append(
            Figure(
                bench="loader",
                name=f"{data.name} {state}, {workers} workers: CPU time per sample",
                unit="µs",
                values=[e.cpu_us_per_sample for e in ours],
                baseline=f"naive, {workers} workers",
                baseline_values=[e.cpu_us_per_sample for e in naive],
                higher_is_better=False,
                extra={"note": "all threads of the process plus its worker processes"},
            )
        )
    if "steady 2" in results:
        figs.append(
            Figure(
                bench="loader",
                name=f"{data.name} {state}, 2 workers: hpstore epoch ≥2 (default cache)",
                unit="samples/s",
                values=[e.rate for e in results["steady 2"]],
                baseline="naive, 2 workers",
                baseline_values=[e.rate for e in results["naive 2"]],
                target=target,
                extra={
                    "chunk_hit_rate": float(
                        np.median([e.stats["chunk_hit_rate"] for e in results["steady 2"]])
                    )
                },
            )
        )
    figs.append(
        Figure(
            bench="loader",
            name=f"{data.name} {state}, 2 processes: hpstore windows (serial reads, naive build)",
            unit="samples/s",
            values=[e.rate for e in results["process 2"]],
            baseline="hpstore, 2 threads",
            baseline_values=[e.rate for e in results["hpstore 2"]],
            extra={
                "note": "not a fair contender: serial chunk reads, fresh shared memory per window, "
                "worker start-up inside the timed epoch; no conclusion is drawn from it",
                "cpu_us_per_sample": float(np.median([e.cpu_us_per_sample for e in results["process 2"]])),
            },
        )
    )
    figs.append(
        Figure(
            bench="loader",
            name=f"{data.name} {state}: zarr shuffled batches via 1 MiB zstd chunks (each batch decodes its chunks)",
            unit="samples/s",
            values=[e.rate for e in results["zarr"]],
            baseline="naive, 0 workers",
            baseline_values=[e.rate for e in results["naive 0"]],
            extra={"samples_measured": int(results["zarr"][0].samples), "note": note},
        )
    )
    if "zarr sequential" in results:
        figs.append(
            Figure(
                bench="loader",
                name=f"{data.name} {state}: zarr sequential read (not shuffled)",
                unit="samples/s",
                values=[e.rate for e in results["zarr sequential"]],
            )
        )
    return figs


def disk_figure(cfg: BenchConfig, progress: Progress, data: Data) -> Figure:
    """Cold epoch time vs the O_DIRECT sequential read of the same store files."""
    progress(f"{data.name}: O_DIRECT read of the store vs a cold hpstore epoch")
    stored = data.stored_bytes
    ours, disk, notes = [], [], set()
    for _ in range(cfg.repeats):
        disk.append(read_files([data.store]).mb_s)
        notes.add(_cold(data, [data.store], True))
        e = hpstore_epoch(data, 2)
        ours.append(stored / MB / e.seconds)
    return Figure(
        bench="loader",
        name=f"{data.name} cold, 2 workers: hpstore epoch, store MB/s",
        unit="MB/s",
        values=ours,
        baseline="O_DIRECT sequential read of the store's files",
        baseline_values=disk,
        target="≥ 70% of the disk",
        extra={
            "limit": "disk_seq_read",
            "stored_bytes": stored,
            "decoded_over_stored": data.n * data.sample_bytes / stored,
            "note": "; ".join(sorted(n for n in notes if n)),
        },
    )


def hit_rate_figures(cfg: BenchConfig, progress: Progress, data: Data) -> list[Figure]:
    """Image-chunk hit rate from epoch 2 on, with a RAM cache holding a fraction of the images."""
    decoded = data.n * int(np.prod(data.shape))
    figs = []
    fractions = (0.5,) if cfg.quick else (0.25, 0.5, 0.75)
    for policy in ("known order", "LRU"):
        for c in fractions:
            progress(f"{data.name}: hit rate, cache {c:.0%} of the images, {policy}")
            budget = int(c * decoded)
            loader = hpstore.Loader(
                data.dataset(), BATCH, fields=["image"], num_workers=2, cache_bytes=budget
            )
            if policy == "LRU":
                loader.cache = ChunkCache(budget, loader.fetcher, policy=LruPolicy())
            list(loader)
            rates, fetched = [], []
            for _ in range(max(2, cfg.repeats)):
                before = loader.stats
                list(loader)
                after = loader.stats
                hits = after["chunk_hits"] - before["chunk_hits"]
                misses = after["chunk_misses"] - before["chunk_misses"]
                rates.append(100 * hits / (hits + misses))
                fetched.append((after["bytes_read"] - before["bytes_read"]) / max(1, before["bytes_read"]))
            figs.append(
                Figure(
                    bench="loader",
                    name=f"{data.name} epoch ≥2 chunk hit rate, cache {c:.0%} of images, {policy}",
                    unit="%",
                    values=rates,
                    target="≥ 45%" if c == 0.5 and policy == "known order" else None,
                    extra={
                        "plot": "cache",
                        "x": c,
                        "series": f"hpstore, {policy}",
                        "bytes_read_vs_first_epoch": float(np.median(fetched)),
                        "peak_cache_bytes": loader.stats["cache_peak_bytes"],
                        "budget_bytes": budget,
                    },
                )
            )
    return figs


def memory_figure(cfg: BenchConfig, progress: Progress, data: Data) -> Figure:
    """RSS after each of 10 epochs with a cache of a quarter of the data, in a fresh process (this
    one has mapped the baseline's files)."""
    progress(f"{data.name}: RSS over 10 epochs, in a fresh process")
    budget = data.n * data.sample_bytes // 4
    code = "import json, sys; from benchmarks.loader import rss_epochs; print(json.dumps(rss_epochs(*sys.argv[1:])))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data.store), str(budget), "10"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return Figure(
        bench="loader",
        name=f"{data.name}: RSS growth from epoch 2 to 10",
        unit="MB",
        values=[rss[-1] - rss[1]],
        higher_is_better=False,
        extra={"rss_MB": rss, "cache_budget_MB": budget / MB, "prefetch_budget_MB": 256 * 1.048576},
    )


def rss_epochs(store: str, cache_bytes: str, epochs: str) -> list[float]:
    """RSS in MB after each epoch of a 2-worker loader (run in a fresh process)."""
    loader = hpstore.Loader(
        hpstore.open(store).split("train"), BATCH, num_workers=2, cache_bytes=int(cache_bytes)
    )
    out = []
    for _ in range(int(epochs)):
        for _batch in loader:
            pass
        out.append(_rss() / MB)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shuffle_figures(n: int = 200_000, chunk_rows: int = 1337) -> list[Figure]:
    """Plan quality per window size (see ``hpstore.loading.plan``): neighbour distance relative to a full
    permutation, distinct chunks per batch, distinct labels per batch on a label-sorted store."""
    figs = []
    full = np.random.default_rng(0).permutation(n)
    ref = float(np.abs(np.diff(full)).mean())
    labels = np.arange(n) * 10 // n  # sorted by label: the worst case
    for w in (1, 2, 4, 8, 16, 32):
        spec = PlanSpec(num_samples=n, chunk_rows=chunk_rows, batch_size=BATCH, window_chunks=w)
        idx = EpochPlan(spec, 0, 0).indices()
        batches = idx[: len(idx) // BATCH * BATCH].reshape(-1, BATCH)
        chunks = np.mean([len(np.unique(b // chunk_rows)) for b in batches])
        spread = np.mean([len(np.unique(labels[b])) for b in batches])
        figs.append(
            Figure(
                bench="loader",
                name=f"shuffle window {w} chunks: neighbour distance / full permutation",
                unit="fraction",
                values=[float(np.abs(np.diff(idx)).mean()) / ref],
                extra={"chunks_per_batch": float(chunks), "labels_per_batch": float(spread)},
            )
        )
    return figs


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    torch.set_num_threads(1)
    small = build(cfg, progress, "digits", 20_000 if cfg.quick else 200_000, (28, 28))
    big = build(cfg, progress, "img64", 6_000 if cfg.quick else 200_000, (3, 64, 64))
    from benchmarks.consumer import consumer_figures, first_batch_figures, modes_figures

    figs = shuffle_figures(20_000 if cfg.quick else 200_000)
    figs += first_batch_figures(cfg, progress, build(cfg, progress, "digits60k", 60_000, (28, 28)))
    figs += consumer_figures(cfg, progress, small, big)
    figs += modes_figures(cfg, progress, small, big)
    figs += throughput_figures(cfg, progress, small)
    figs += throughput_figures(cfg, progress, big)
    figs.append(disk_figure(cfg, progress, big))
    figs += hit_rate_figures(cfg, progress, big if cfg.quick else small)
    figs.append(memory_figure(cfg, progress, small))
    return figs


if __name__ == "__main__":
    raise SystemExit(main(run))
