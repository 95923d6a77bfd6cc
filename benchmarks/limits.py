"""The machine's limits, measured in the same run as everything compared with them.

- disk: sequential and random reads of the data directory with ``O_DIRECT`` (page cache bypassed,
  page-aligned ``mmap`` buffers, many reads in flight from threads, like ``fio --direct=1
  --iodepth=N``), sequential writes with ``O_DIRECT`` and with buffered writes + ``fsync``, and a
  buffered sequential read from a cold page cache (what a plain ``open().read()`` loader sees);
- memory: single-thread copy bandwidth (``np.copyto`` of a buffer much larger than the CPU caches).

Where the filesystem refuses ``O_DIRECT`` (tmpfs, some FUSE and network filesystems) the reads fall
back to buffered I/O after a page-cache drop, and every such figure carries a ``note`` saying so.

Other modules reuse the primitives: ``read_files(store_dir)`` measures the disk bandwidth for exactly
a store's files, which is the honest denominator for a loader's MB/s. Each limit figure carries
``extra["limit_key"]`` (see ``KEYS``); a figure elsewhere names it in ``extra["limit"]`` and the report
divides by it.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.cache import RAM_FILESYSTEMS, drop_page_cache, filesystem_type, iter_files
from benchmarks.common import BenchConfig, Figure, Progress, main

MB = 1e6
BLOCK = 1 << 20
QUEUE_DEPTH = 16
SMALL_BLOCK = 16 << 10

KEYS = {
    "disk_seq_read": "disk seq read, O_DIRECT 1 MiB ×16",
    "disk_seq_read_buffered_cold": "disk seq read, buffered cold, 1 MiB ×16",
    "disk_rand_read_1m": "disk random read, O_DIRECT 1 MiB ×16",
    "disk_rand_read_16k": "disk random read, O_DIRECT 16 KiB ×16",
    "disk_seq_write": "disk seq write, O_DIRECT 1 MiB, +fsync",
    "disk_seq_write_buffered": "disk seq write, buffered, +fsync",
    "mem_copy": "memory copy, 1 thread",
}
"""Limit key -> figure name. ``×16``: 16 reads in flight (threads), like fio's ``--iodepth=16``."""


@dataclass(frozen=True, kw_only=True)
class Transfer:
    """One timed pass: bytes moved, seconds, and whether O_DIRECT was in force."""

    nbytes: int
    seconds: float
    direct: bool
    note: str = ""

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds if self.seconds > 0 else float("inf")


def open_direct(path: Path, flags: int, *, direct: bool = True) -> tuple[int, bool, str]:
    """Open with ``O_DIRECT`` when asked and allowed: (fd, direct in force, note when refused)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True, ""
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            why = f"O_DIRECT refused by {filesystem_type(path) or 'the filesystem'} ({exc.strerror})"
    else:
        why = "O_DIRECT not available on this platform" if direct else ""
    return os.open(path, flags, 0o644), False, why


def read_files(
    paths: Iterable[str | Path], *, block: int = BLOCK, threads: int = QUEUE_DEPTH, direct: bool = True
) -> Transfer:
    """Read every file under ``paths`` once, in order, ``threads`` blocks in flight.

    Without O_DIRECT (refused, or ``direct=False``) the files are dropped from the page cache first,
    so the figure is a cold buffered read; the note says which.
    """
    files = list(iter_files(paths))
    if not files:
        raise ValueError("read_files: no files to read")
    opened = [open_direct(f, os.O_RDONLY, direct=direct) for f in files]
    note = next((n for _, d, n in opened if not d and n), "")
    try:
        if not all(d for _, d, _ in opened):
            drop = drop_page_cache(files, system_wide=False)
            note = "; ".join(x for x in (note, "buffered reads after " + drop.note) if x)
        blocks = (
            (fd, off)
            for (fd, _, _), f in zip(opened, files, strict=True)
            for off in range(0, f.stat().st_size, block)
        )
        seconds, nbytes = _pump(blocks, block=block, threads=threads)
    finally:
        for fd, _, _ in opened:
            os.close(fd)
    return Transfer(nbytes=nbytes, seconds=seconds, direct=all(d for _, d, _ in opened), note=note)


def random_read(
    path: Path, *, block: int, threads: int = QUEUE_DEPTH, seconds: float = 1.0, seed: int = 0
) -> Transfer:
    """Random block-aligned reads of ``path`` for about ``seconds``, ``threads`` in flight."""
    fd, direct, note = open_direct(path, os.O_RDONLY)
    try:
        if not direct:
            note = "; ".join(x for x in (note, drop_page_cache([path], system_wide=False).note) if x)
        nblocks = max(1, os.fstat(fd).st_size // block)
        rng = random.Random(seed)
        deadline = time.perf_counter() + seconds

        def offsets() -> Iterator[tuple[int, int]]:
            while time.perf_counter() < deadline:
                yield fd, rng.randrange(nblocks) * block

        took, nbytes = _pump(offsets(), block=block, threads=threads)
    finally:
        os.close(fd)
    return Transfer(nbytes=nbytes, seconds=took, direct=direct, note=note)


def _pump(items: Iterator[tuple[int, int]], *, block: int, threads: int) -> tuple[float, int]:
    """``preadv`` every (fd, offset) into per-thread aligned buffers; (seconds, bytes read)."""
    lock = threading.Lock()

    def worker() -> int:
        buf = mmap.mmap(-1, block)  # anonymous mappings are page aligned, as O_DIRECT requires
        total = 0
        try:
            while True:
                with lock:
                    item = next(items, None)
                if item is None:
                    return total
                total += os.preadv(item[0], [buf], item[1])
        finally:
            buf.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(worker) for _ in range(threads)]
        nbytes = sum(f.result() for f in futures)
    return time.perf_counter() - t0, nbytes


def write_file(path: Path, nbytes: int, *, block: int = BLOCK, direct: bool = True) -> Transfer:
    """Write ``nbytes`` of random data sequentially, then fsync; the time includes the fsync."""
    path.unlink(missing_ok=True)  # overwriting allocated blocks is faster than a fresh file
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))  # incompressible, in case the device compresses
    fd, used_direct, note = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct=direct)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            done += os.pwritev(fd, [buf], done)
        os.fsync(fd)
        took = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return Transfer(nbytes=done, seconds=took, direct=used_direct, note=note)


def memory_copy(nbytes: int) -> Transfer:
    """One-thread copy of ``nbytes`` between two already-touched buffers."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty(nbytes, dtype=np.uint8)
    dst.fill(0)  # fault the pages in now: np.zeros would leave them to the timed copy
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return Transfer(nbytes=nbytes, seconds=time.perf_counter() - t0, direct=False)


# -- the benchmark ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sizes:
    probe_bytes: int
    random_seconds: float
    copy_bytes: int


QUICK = Sizes(probe_bytes=128 << 20, random_seconds=0.5, copy_bytes=128 << 20)
FULL = Sizes(probe_bytes=1 << 30, random_seconds=3.0, copy_bytes=512 << 20)


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    sizes = QUICK if cfg.quick else FULL
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    probe = cfg.data_dir / "limits-probe.bin"
    figs: list[Figure] = []
    try:
        progress(f"sequential write of {sizes.probe_bytes >> 20} MiB to {cfg.data_dir}")
        figs.append(_figure("disk_seq_write", cfg, lambda: write_file(probe, sizes.probe_bytes)))
        figs.append(
            _figure(
                "disk_seq_write_buffered",
                cfg,
                lambda: write_file(probe, sizes.probe_bytes, direct=False),
            )
        )
        progress("sequential reads")
        figs.append(_figure("disk_seq_read", cfg, lambda: read_files([probe])))
        figs.append(_figure("disk_seq_read_buffered_cold", cfg, lambda: _cold_buffered_read(probe)))
        progress(f"random reads, {sizes.random_seconds:g} s each")
        for key, block in (("disk_rand_read_1m", BLOCK), ("disk_rand_read_16k", SMALL_BLOCK)):
            figs.append(
                _figure(key, cfg, partial(random_read, probe, block=block, seconds=sizes.random_seconds))
            )
    finally:
        probe.unlink(missing_ok=True)
    progress("memory copy")
    figs.append(_figure("mem_copy", cfg, lambda: memory_copy(sizes.copy_bytes)))
    return figs


def _cold_buffered_read(path: Path) -> Transfer:
    """Buffered read after the strongest page-cache drop allowed; the note says which one ran."""
    drop = drop_page_cache([path])
    t = read_files([path], direct=False)
    return Transfer(nbytes=t.nbytes, seconds=t.seconds, direct=False, note=drop.note)


def _figure(key: str, cfg: BenchConfig, measure: Callable[[], Transfer]) -> Figure:
    runs = [measure() for _ in range(cfg.repeats)]
    notes = sorted({r.note for r in runs if r.note})
    fs = filesystem_type(cfg.data_dir)
    if fs in RAM_FILESYSTEMS and key.startswith("disk"):
        notes.append(f"the data directory is on {fs}: this is a memory figure, not a disk figure")
    name = KEYS[key]
    direct = all(r.direct for r in runs)
    if "O_DIRECT" in name and not direct:
        name = name.replace("O_DIRECT", "buffered (O_DIRECT refused)")
    return Figure(
        bench="limits",
        name=name,
        unit="MB/s",
        values=[r.mb_s for r in runs],
        extra={
            "limit_key": key,
            "direct": direct,
            "bytes": [r.nbytes for r in runs],
            "seconds": [r.seconds for r in runs],
            "note": "; ".join(notes),
        },
    )


if __name__ == "__main__":
    raise SystemExit(main(run))
