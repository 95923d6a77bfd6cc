"""Remote stores: streaming from and checkpointing to S3, with injected network latency.

Everything runs against a real S3-compatible server on loopback (moto, its own process) through the
fault proxy (its own process) adding 0, 5 or 20 ms to every request, with the real client (s3fs).
The server is the ceiling here, not the network, so every loader figure is compared with the raw
GET throughput of the same bytes measured in the same run:

1. **Loader vs raw GET**, per latency: ``hpstore.Loader`` samples/s and MB/s (bytes fetched from the
   store, per second of a shuffled epoch) vs a raw replay of exactly the range requests the loader
   made in that epoch (recorded; one ``read_ranges`` call, all in flight, nothing decoded). Target:
   ≥ 80% of raw at every latency.
   Loader setting: ``num_workers=4``, ``prefetch_bytes=256 MiB`` (up to four shuffle windows of 16
   chunks in flight, each window's chunk reads issued together, so a window costs one round trip,
   not one per chunk); with fewer windows in flight the 20 ms figure drops. Also the whole-object
   GET rate of the store's shards, for scale: moto copies the whole object to serve a byte range,
   so a range read costs it as much as reading the object, which is why this store uses small
   (4 MiB) shards.
2. **Time to first batch**, per latency: ``hpstore.open`` (manifest, listing) to the first batch,
   with the S3 client already made (the first client of a process costs ~0.3 s more). The
   prefetcher starts all windows it may have in flight at once, so on few cores a deep prefetch
   delays the first batch.
3. **Disk cache**: bytes fetched from the store in epoch 2 with a disk cache of half the store
   (``cache_dir``, ``cache_disk_bytes``; RAM cache off) vs without. Target ≤ 55%.
4. **Checkpoints to S3**: ``Checkpointer`` persist and load MB/s vs a raw parallel PUT / GET of the
   same bytes in objects of the checkpoint's chunk size, with as many threads.

``python -m benchmarks.remote [--quick]``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpstore
from benchmarks.codecs import digits
from benchmarks.common import BenchConfig, Figure, Progress, main
from benchmarks.support.s3server import S3Server
from hpstore.checkpoint.checkpointer import Checkpointer
from hpstore.dataset import Store
from hpstore.format.writer import Layout, StoreWriter
from hpstore.storage.base import Range, Storage
from hpstore.storage.open import open_storage
from hpstore.storage.wrappers import ForwardingStorage
from hpstore.threads import run_parallel

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
LATENCIES_MS = (0, 5, 20)
BATCH = 256
WORKERS, PREFETCH = 4, 256 * MiB
LAYOUT = Layout(chunk_bytes=1 * MiB, shard_bytes=4 * MiB)


@contextmanager
def proxy(upstream: str, latency_s: float) -> Iterator[str]:
    """The fault proxy in its own process (so its work does not share the client's GIL)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.support.faultproxy",
            "--upstream",
            upstream,
            "--latency",
            str(latency_s),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        },
    )
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=30)


def write_store(server: S3Server, url: str, n: int) -> int:
    images = digits(n, seed=1)
    labels = np.random.default_rng(1).integers(0, 10, n)
    with StoreWriter(open_storage(url, server.storage_options()), layout=LAYOUT) as w:
        sw = w.split("train")
        for a in range(0, n, 50_000):
            sw.append({"image": images[a : a + 50_000], "label": labels[a : a + 50_000]})
        w.add_split(sw)
        return w.commit().total_bytes


class Recorder(ForwardingStorage):
    """Records every range request (the requests the loader really issued, after coalescing),
    so the raw baseline can replay exactly those."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.ranges: list[Range] = []

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        self.ranges.extend(ranges)
        return self.inner.read_ranges(ranges)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self.read_ranges([(key, start, end)])[0]


def loader_epoch(ds: hpstore.Dataset, recorder: Recorder) -> tuple[float, int, int]:
    """(seconds, samples, bytes fetched from the store) of one shuffled epoch from a fresh loader."""
    stats = ds.store.storage.stats
    before = stats.bytes_read
    recorder.ranges.clear()
    loader = hpstore.Loader(ds, BATCH, cache_bytes=0, num_workers=WORKERS, prefetch_bytes=PREFETCH)
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return time.perf_counter() - t0, n, stats.bytes_read - before


def replay(storage: Storage, ranges: list[Range]) -> tuple[float, int]:
    """(seconds, bytes) of the same range GETs, all in flight at once, nothing decoded."""
    t0 = time.perf_counter()
    got = storage.read_ranges(ranges)
    return time.perf_counter() - t0, sum(len(b) for b in got)


def raw_objects(storage: Storage, keys: dict[str, int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    got = storage.read_ranges([(k, 0, size) for k, size in keys.items()])
    return time.perf_counter() - t0, sum(len(b) for b in got)


def first_batch(url: str, options: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    ds = hpstore.open(url, storage_options=options).split("train")
    next(iter(hpstore.Loader(ds, BATCH, cache_bytes=0, num_workers=WORKERS, prefetch_bytes=PREFETCH)))
    return time.perf_counter() - t0


def latency_figures(
    server: S3Server, url: str, lat_ms: int, cfg: BenchConfig, progress: Progress
) -> list[Figure]:
    with proxy(server.endpoint, lat_ms / 1000) as endpoint:
        options = server.storage_options(endpoint)
        opened = hpstore.open(url, storage_options=options)
        recorder = Recorder(opened.storage)
        store = Store(recorder, opened.manifest)
        ds = store.split("train")
        shards = {k: v.size for k, v in store.manifest.objects.items() if "/c/" in k}
        raw_objects(opened.storage, shards)  # warm: connections open
        loader_mbs, loader_sps, raw_mbs, obj_mbs, ttfb = [], [], [], [], []
        for r in range(cfg.repeats):
            progress(f"{lat_ms} ms: repeat {r + 1}/{cfg.repeats}")
            t, n, nbytes = loader_epoch(ds, recorder)
            loader_mbs.append(nbytes / t / 1e6)
            loader_sps.append(n / t)
            t, nbytes = replay(opened.storage, list(recorder.ranges))
            raw_mbs.append(nbytes / t / 1e6)
            t, nbytes = raw_objects(opened.storage, shards)
            obj_mbs.append(nbytes / t / 1e6)
            ttfb.append(first_batch(url, options))
    setting = f"num_workers={WORKERS}, prefetch_bytes={PREFETCH >> 20} MiB"
    common = {"latency_ms": lat_ms, "loader": setting, "store_bytes": store.manifest.total_bytes}
    return [
        Figure(bench="remote", name=f"loader MB/s, {lat_ms} ms latency", unit="MB/s", values=loader_mbs,
               baseline="raw GET of the same requests", baseline_values=raw_mbs, target="≥ 0.8× raw",
               extra=common),
        Figure(bench="remote", name=f"loader samples/s, {lat_ms} ms latency", unit="samples/s",
               values=loader_sps, extra=common),
        Figure(bench="remote", name=f"whole-shard GET MB/s, {lat_ms} ms latency", unit="MB/s", values=obj_mbs,
               extra={**common, "note": "moto serves a byte range by copying the whole object"}),
        Figure(bench="remote", name=f"time to first batch, {lat_ms} ms latency", unit="s", values=ttfb,
               higher_is_better=False, extra={**common, "note": "hpstore.open (manifest + listing) to batch 1"}),
    ]  # fmt: skip


def disk_cache_figure(server: S3Server, url: str, total: int, cfg: BenchConfig, progress: Progress) -> Figure:
    """Bytes fetched in epoch 2 with a half-size disk cache vs without one."""
    cache_dir = cfg.data_dir / "remote" / "disk-cache"
    with_cache: list[float] = []
    without: list[float] = []
    for r in range(cfg.repeats):
        progress(f"disk cache: repeat {r + 1}/{cfg.repeats}")
        for target, cache in ((with_cache, str(cache_dir)), (without, None)):
            shutil.rmtree(cache_dir, ignore_errors=True)
            ds = hpstore.open(url, storage_options=server.storage_options()).split("train")
            loader = hpstore.Loader(
                ds, BATCH, cache_bytes=0, seed=r, num_workers=WORKERS, prefetch_bytes=PREFETCH,
                cache_dir=cache, cache_disk_bytes=total // 2,
            )  # fmt: skip
            fetched = []
            for epoch in range(2):
                before = ds.store.storage.stats.bytes_read
                loader.set_epoch(epoch)
                for _ in loader:
                    pass
                fetched.append(ds.store.storage.stats.bytes_read - before)
            target.append(fetched[1] / 1e6)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return Figure(bench="remote", name="epoch-2 bytes fetched, disk cache of half the store", unit="MB",
                  values=with_cache, baseline="no disk cache", baseline_values=without, higher_is_better=False,
                  target="≤ 0.55× no cache", extra={"store_bytes": total, "ram_cache_bytes": 0})  # fmt: skip


def checkpoint_figures(server: S3Server, bucket: str, cfg: BenchConfig, progress: Progress) -> list[Figure]:
    size = (32 if cfg.quick else 256) * MiB
    gen = torch.Generator().manual_seed(0)
    state = {"model": {f"layer{i}": torch.randn(size // 4 // 8, generator=gen) for i in range(8)}, "step": 1}
    options = server.storage_options()
    save, load, put, get = [], [], [], []
    for r in range(cfg.repeats):
        progress(f"checkpoint {size >> 20} MiB: repeat {r + 1}/{cfg.repeats}")
        url = f"s3://{bucket}/ckpt-{r}"
        ck = Checkpointer(url, storage_options=options)
        ck.save(1, state)
        ck.wait()
        s = ck.stats[-1]
        assert s.persist_s
        save.append(s.bytes / s.persist_s / 1e6)
        t0 = time.perf_counter()
        Checkpointer(url, storage_options=options).load()
        load.append(s.bytes / (time.perf_counter() - t0) / 1e6)
        raw = open_storage(f"s3://{bucket}/raw-{r}", options)
        chunk, workers = ck.layout.chunk_bytes, ck.layout.workers
        blob = np.random.default_rng(r).bytes(chunk)
        keys = [f"obj{i}" for i in range(max(1, s.bytes // chunk))]
        t0 = time.perf_counter()
        run_parallel(functools.partial(raw.write, data=blob), keys, workers)
        put.append(len(keys) * chunk / (time.perf_counter() - t0) / 1e6)
        t0 = time.perf_counter()
        run_parallel(raw.read, keys, workers)
        get.append(len(keys) * chunk / (time.perf_counter() - t0) / 1e6)
        root = open_storage(f"s3://{bucket}", options)
        for prefix in (f"ckpt-{r}", f"raw-{r}"):  # keep the server's memory flat across repeats
            root.delete_prefix(prefix)
    note = {"state_bytes": size, "note": "raw: objects of the checkpoint chunk size, as many threads"}
    return [
        Figure(bench="remote", name=f"checkpoint save to S3 ({size >> 20} MiB)", unit="MB/s", values=save,
               baseline="raw parallel PUT", baseline_values=put, extra=note),
        Figure(bench="remote", name=f"checkpoint load from S3 ({size >> 20} MiB)", unit="MB/s", values=load,
               baseline="raw parallel GET", baseline_values=get, extra=note),
    ]  # fmt: skip


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    n = 96_000 if cfg.quick else 240_000
    figures: list[Figure] = []
    with S3Server() as server:
        bucket = server.create_bucket()
        url = f"s3://{bucket}/digits"
        progress(f"writing {n} 28×28 samples to {url}")
        total = write_store(server, url, n)
        for lat in LATENCIES_MS:
            figures += latency_figures(server, url, lat, cfg, progress)
        figures.append(disk_cache_figure(server, url, total, cfg, progress))
        figures += checkpoint_figures(server, bucket, cfg, progress)
    return figures


if __name__ == "__main__":
    raise SystemExit(main(run))
