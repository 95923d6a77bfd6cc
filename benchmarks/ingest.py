"""Ingest: throughput (MB/s of source) and peak memory of ``python -m tools.ingest``.

1. **Throughput** of the default layout (zstd-1) from two sources: a directory of ``.npy`` files
   (28x28 uint8 digit images + int64 labels) and the same kind of data as a gzipped MNIST-style IDX
   directory (``tools.sample``). Measured in-process through ``tools.ingest.ingest`` (source opened,
   read, encoded, written and committed). Baseline: reading the source alone (the same batches,
   the same read-ahead, nothing written), so the ratio is how much of the source's speed ingest
   keeps. ``extra["limit"]`` names the encode-only figure (the codec's throughput on the same data
   with the same number of threads), the CPU limit of the path. Target: >= 150 MB/s.
   Each source is measured twice: **warm** (the source file sits in the page cache, as it does
   right after it was written or read: a memory-speed read) and **cold** (the source's pages are
   evicted with ``posix_fadvise(DONTNEED)`` before every run, ingest and read-alone baseline
   alike, so the source comes from the disk; the figure's ``note`` says whether the drop took).
2. **Peak RSS** of a real ``python -m tools.ingest`` process (``ru_maxrss`` of the child), for a
   dataset and the same dataset 4x larger, both several times the writer's window of chunks and
   shards in flight. Ratio = larger / smaller; target <= 1.10 (flat). The process's RSS after
   imports alone is in ``extra["imports_mb"]``.
3. **Layout comparison** on the npy source: codecs zstd-1 (= the default, a gauge of the noise) /
   lz4 / none, chunk sizes 256 KiB / 4 MiB, shards of 16 MiB; ingest MB/s with the compression
   ratio in ``extra``; the baseline of each is the default layout, run alternately in the same loop.

``python -m benchmarks.ingest [--quick]``.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cache import drop_page_cache
from benchmarks.common import BenchConfig, Figure, Progress, main, repeat
from hpstore.format import zarr_shard as zf
from hpstore.format.writer import Layout
from tools.ingest import IngestConfig, ingest
from tools.sample import SIDE, SampleConfig, digits, generate, templates
from tools.sources import open_splits
from tools.sources.base import batch_nbytes
from tools.sources.prefetch import prefetched

KiB, MiB = 1 << 10, 1 << 20
REPO = Path(__file__).resolve().parent.parent
DEFAULT = Layout()
TARGET_MBPS = "≥ 150 MB/s"


# -- sources (cached under data_dir/ingest, reused when complete) -----------------------------------


def _cached(root: Path, key: dict[str, Any], make: Any) -> Path:
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == key:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    make(root)
    marker.write_text(json.dumps(key))
    return root


def npy_source(cfg: BenchConfig, mb: int) -> Path:
    """``image.npy`` (n, 28, 28) uint8 and ``label.npy`` (n,) int64, about ``mb`` MB, written in blocks."""
    n = mb * 1_000_000 // (SIDE * SIDE + 8)

    def make(root: Path) -> None:
        tmpl = templates(0)
        images = np.lib.format.open_memmap(root / "image.npy", "w+", np.uint8, (n, SIDE, SIDE))
        labels = np.lib.format.open_memmap(root / "label.npy", "w+", np.int64, (n,))
        rng = np.random.default_rng(0)
        for start in range(0, n, 16384):
            img, lab = digits(rng, min(16384, n - start), tmpl)
            images[start : start + len(img)] = img
            labels[start : start + len(img)] = lab
        images.flush()
        labels.flush()
        del images, labels

    return _cached(cfg.data_dir / "ingest" / f"npy-{mb}MB", {"kind": "npy", "n": n}, make)


def idx_source(cfg: BenchConfig, mb: int) -> Path:
    def make(root: Path) -> None:
        generate(SampleConfig(out_dir=root, size_mb=mb, seed=0))

    return _cached(cfg.data_dir / "ingest" / f"idx-{mb}MB", {"kind": "idx", "mb": mb}, make)


# -- measurements ------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ingest_once(src: Path, dst: Path, **options: Any) -> tuple[float, int, int, float]:
    """``(MB/s of source, bytes in, bytes out, CPU seconds)`` of one in-process ingest into a fresh
    ``dst``. CPU seconds (all threads) are steadier than wall time on a shared machine."""
    shutil.rmtree(dst, ignore_errors=True)
    cpu = _cpu_seconds()
    result = ingest(IngestConfig(src=str(src), dst=str(dst), progress=False, **options))
    cpu = _cpu_seconds() - cpu
    shutil.rmtree(dst, ignore_errors=True)
    return result.bytes_in / 1e6 / result.seconds, result.bytes_in, result.bytes_out, cpu


def read_once(src: Path) -> float:
    """MB/s of reading the source alone, through the same batches and read-ahead as ingest."""
    t0 = time.perf_counter()
    nbytes = 0
    for split in open_splits(str(src)):
        for batch in prefetched(split.source.batches()):
            nbytes += batch_nbytes(batch)
    return nbytes / 1e6 / (time.perf_counter() - t0)


def encode_once(images: np.ndarray, threads: int) -> float:
    """MB/s of the default codec alone on ``images`` cut into default-size chunks, ``threads`` at once."""
    rows = DEFAULT.chunk_bytes // (SIDE * SIDE)
    chunks = [images[i : i + rows] for i in range(0, len(images), rows)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda c: zf.encode_chunk(c, rows, DEFAULT.codec), chunks))
    return images.nbytes / 1e6 / (time.perf_counter() - t0)


_RSS_WRAPPER = """
import runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
code = 0
try:
    if sys.argv[0] != "-":
        runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
with open("/proc/self/status") as f:
    hwm = next(line for line in f if line.startswith("VmHWM:"))
with open(out, "w") as f:
    f.write(hwm.split()[1])
sys.exit(code)
"""


def peak_rss_mb(module: str, args: list[str], scratch: Path) -> float:
    """Peak resident set (MB) of ``python -m MODULE ARGS`` (``module="-"``: the imports alone).

    Read from the child's own ``VmHWM`` at exit: ``ru_maxrss`` of a child also counts the parent's
    pages it held between fork and exec, so it would report the benchmark's size, not the child's."""
    out = scratch / "vmhwm.txt"
    preload = "import tools.ingest; " if module == "-" else ""
    cmd = [sys.executable, "-c", preload + _RSS_WRAPPER, str(out), module, *args]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{module} {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()[-300:]}"
        )
    return int(out.read_text()) / 1024  # kB


def ingest_rss_mb(src: Path, dst: Path, args: list[str]) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    try:
        return peak_rss_mb("tools.ingest", [str(src), str(dst), "--no-progress", *args], dst.parent)
    finally:
        shutil.rmtree(dst, ignore_errors=True)


# -- figures -------------------------------------------------------------------------------------------


def throughput_figures(cfg: BenchConfig, progress: Progress, sources: dict[str, Path]) -> list[Figure]:
    dst = cfg.data_dir / "ingest" / "store"
    images = np.load(sources["npy"] / "image.npy", mmap_mode="r")[: 64 * MiB // (SIDE * SIDE)]
    images = np.ascontiguousarray(images)
    limit_key = f"ingest_encode_zstd{DEFAULT.codec.get('level', '')}_{DEFAULT.workers}t"
    progress(f"ingest: encode alone, {DEFAULT.workers} threads")
    figures = [
        Figure(
            bench="ingest",
            name=f"encode alone, default codec, {DEFAULT.workers} threads",
            unit="MB/s",
            values=repeat(lambda: encode_once(images, DEFAULT.workers), cfg.repeats),
            extra={"limit_key": limit_key, "codec": DEFAULT.codec},
        )
    ]
    ingest_once(sources["npy"], dst)  # warm-up: first-use imports (zarr) are not ingest speed
    for kind, src in sources.items():
        for cache in ("warm", "cold"):
            progress(f"ingest: {kind} source, default layout, {cache} source")
            notes: list[str] = []

            def prepare(src: Path = src, cache: str = cache, notes: list[str] = notes) -> None:
                if cache == "cold":  # only the source's pages: the machine may be shared
                    notes.append(drop_page_cache([src], system_wide=False).note)

            read = []
            for _ in range(cfg.repeats):
                prepare()
                read.append(read_once(src))
            runs = []
            for _ in range(cfg.repeats):
                prepare()
                runs.append(ingest_once(src, dst))
            _, bytes_in, bytes_out, _ = runs[0]
            cpu = min(r[3] for r in runs)
            figures.append(
                Figure(
                    bench="ingest",
                    name=f"{kind} source, default layout ({bytes_in / 1e6:.0f} MB), {cache} source",
                    unit="MB/s",
                    values=[r[0] for r in runs],
                    baseline=f"source read alone, {cache}",
                    baseline_values=read,
                    target=TARGET_MBPS,
                    extra={
                        "note": notes[-1] if notes else "source file in the page cache (a memory-speed read)",
                        "limit": limit_key,
                        "bytes_in": bytes_in,
                        "compression": bytes_in / bytes_out,
                        "cpu_seconds": cpu,
                        "mb_per_cpu_second": bytes_in / 1e6 / cpu,
                        "source_cache": cache,
                    },
                )
            )
    return figures


def rss_figures(
    cfg: BenchConfig, progress: Progress, sources: tuple[Path, Path], mb: int, kind: str, args: list[str]
) -> list[Figure]:
    """Peak RSS at 1x and 4x. ``args``: layout options of both runs (the quick run uses small shards,
    so that its small datasets still span many shards: flatness needs a full window in flight)."""
    dst = cfg.data_dir / "ingest" / "store-rss"
    dst.parent.mkdir(parents=True, exist_ok=True)
    progress(f"ingest: peak RSS, {kind} source, 1x and 4x")
    imports = peak_rss_mb("-", [], dst.parent)
    small, large = sources
    base = repeat(lambda: ingest_rss_mb(small, dst, args), cfg.repeats)
    big = repeat(lambda: ingest_rss_mb(large, dst, args), cfg.repeats)
    return [
        Figure(
            bench="ingest",
            name=f"peak RSS, {kind} source {4 * mb} MB (4x){' ' + ' '.join(args) if args else ''}",
            unit="MB",
            values=big,
            baseline=f"peak RSS, {mb} MB",
            baseline_values=base,
            higher_is_better=False,
            target="ratio ≤ 1.10",
            extra={"imports_mb": imports, "args": args},
        )
    ]


def layout_figures(cfg: BenchConfig, progress: Progress, src: Path) -> list[Figure]:
    dst = cfg.data_dir / "ingest" / "store-layout"
    cases: dict[str, dict[str, Any]] = {
        "codec zstd-1": {"codec": "zstd", "level": 1},
        "codec lz4": {"codec": "lz4"},
        "codec none": {"codec": "none"},
        "chunk 256 KiB": {"chunk_bytes": 256 * KiB},
        "chunk 4 MiB": {"chunk_bytes": 4 * MiB},
        "shard 16 MiB": {"shard_bytes": 16 * MiB},
    }
    if cfg.quick:  # the zstd-1 case repeats the default (a noise gauge); shards need bigger data
        cases = {k: v for k, v in cases.items() if k not in ("codec zstd-1", "shard 16 MiB")}
    figures = []
    for name, options in cases.items():
        progress(f"ingest: layout {name}")
        default, case = [], []
        for i in range(cfg.repeats):  # interleaved, in alternating order, so drift hits both alike
            first, second = (options, {}) if i % 2 else ({}, options)
            a, b = ingest_once(src, dst, **first), ingest_once(src, dst, **second)
            (mbps, bytes_in, bytes_out, _), base = (a, b) if first else (b, a)
            case.append(mbps)
            default.append(base[0])
        figures.append(
            Figure(
                bench="ingest",
                name=f"npy source, {name}",
                unit="MB/s",
                values=case,
                baseline="default layout",
                baseline_values=default,
                extra={"compression": bytes_in / bytes_out, "options": options},
            )
        )
    return figures


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    npy_mb, idx_mb = (48, 24) if cfg.quick else (256, 256)
    progress("ingest: preparing sources")
    npy, npy4 = npy_source(cfg, npy_mb), npy_source(cfg, 4 * npy_mb)
    idx = idx_source(cfg, idx_mb)
    figures = throughput_figures(cfg, progress, {"npy": npy, "IDX gz": idx})
    quick_args = ["--shard-bytes", "8MiB"] if cfg.quick else []
    figures += rss_figures(cfg, progress, (npy, npy4), npy_mb, "npy", quick_args)
    if not cfg.quick:
        figures += rss_figures(cfg, progress, (idx, idx_source(cfg, 4 * idx_mb)), idx_mb, "IDX gz", [])
    figures += layout_figures(cfg, progress, npy)
    figures += dask_figures(cfg, progress, npy)
    return figures


def dask_figures(cfg: BenchConfig, progress: Progress, npy: Path) -> list[Figure]:
    """Single process vs ``--engine dask`` and the commit's cost (``benchmarks.ingest_dask``)."""
    from benchmarks import ingest_dask

    return ingest_dask.run(cfg, progress, npy)


if __name__ == "__main__":
    raise SystemExit(main(run))
