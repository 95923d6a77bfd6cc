"""Codecs and the chunk decode path: what the codec and chunk-size defaults are chosen from.

1. **Codec throughput.** Encode and decode MB/s (of uncompressed data) of hpstore's real per-chunk
   path (``zarr_format.encode_chunk`` / ``decode_chunk``: codec + CRC32C) for zstd-1, zstd-3,
   blosc-lz4 and none, on two kinds of data, with 1 and 2 threads running chunks side by side
   (codecs run single-threaded inside; parallelism is several chunks at once). Baseline: a plain
   memory copy of the same chunks on the same threads (into a reused buffer), so the ratio is the
   fraction of memory speed a codec reaches. ``extra["compression"]`` is the compression ratio.

   - ``digits``: synthetic handwritten-digit-like 28×28 uint8 images (smooth strokes on a zero
     background, ~80% zeros), compressible like MNIST;
   - ``random``: uniform random 3×64×64 uint8, incompressible (the worst case for a codec).

2. **Shuffled batch gather.** Samples/s of gathering shuffled batches of 256 digits from a local
   store, hpstore's direct path (``ChunkReader.read`` of the touched chunks, checksums verified, then
   one vectorised gather; ``hpstore_2t``: the same fetch, decoding two chunks at a time as a
   loader's decode pool does) against plain zarr on the same array (``arr.get_orthogonal_selection``
   and ``arr[indices]``; zarr decodes concurrently on its own), per chunk size and codec.
   Ratio = hpstore / zarr, measured side by side.

``python -m benchmarks.codecs [--quick]``.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import hpstore
from benchmarks.common import BenchConfig, Figure, Progress, main, repeat
from hpstore.format import zarr_shard as zf
from hpstore.format.writer import Layout, StoreWriter
from hpstore.gather import gather
from hpstore.storage.local import LocalStorage

KiB, MiB = 1 << 10, 1 << 20
CODECS: dict[str, dict[str, Any]] = {
    "zstd-1": {"name": "zstd", "level": 1},
    "zstd-3": {"name": "zstd", "level": 3},
    "lz4": {"name": "lz4", "level": 5},
    "none": {"name": "none"},
}
BATCH = 256


def digits(n: int, seed: int = 0) -> np.ndarray:
    """Digit-like images: a few thick, soft strokes per 28×28 image on a zero background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for start in range(0, n, 4096):
        m = min(4096, n - start)
        ink = np.zeros((m, 28, 28), dtype=np.float32)
        for _ in range(3):  # three strokes: segments between random points in the central 20×20
            p = rng.uniform(6, 22, (m, 2, 2)).astype(np.float32)
            (y0, x0), (y1, x1) = p[:, 0].T, p[:, 1].T
            for t in np.linspace(0, 1, 8, dtype=np.float32):
                cy = (y0 + t * (y1 - y0))[:, None, None]
                cx = (x0 + t * (x1 - x0))[:, None, None]
                ink = np.maximum(ink, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3.0))
        img = np.clip(ink * 300 - 30, 0, 255)
        out[start : start + m] = img.astype(np.uint8)
    return out


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)


def chunks_of(data: np.ndarray, chunk_bytes: int) -> tuple[list[np.ndarray], int]:
    rows = max(1, chunk_bytes // (data.itemsize * int(np.prod(data.shape[1:]))))
    return [data[i : i + rows] for i in range(0, len(data) - rows + 1, rows)], rows


def _throughput(fn: Callable[[Any], Any], items: Sequence[Any], nbytes: int, threads: int) -> float:
    """MB/s of ``nbytes`` for ``fn`` over ``items`` on ``threads`` threads (1: the calling thread)."""
    if threads == 1:
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        return nbytes / 1e6 / (time.perf_counter() - t0)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, items[:threads]))  # start the threads outside the timing
        t0 = time.perf_counter()
        list(pool.map(fn, items))
        return nbytes / 1e6 / (time.perf_counter() - t0)


def _copier(like: np.ndarray) -> Callable[[np.ndarray], None]:
    """A copy into a reused per-thread buffer: memory bandwidth, not page faults of fresh buffers."""
    local = threading.local()

    def copy(chunk: np.ndarray) -> None:
        if not hasattr(local, "dst"):
            local.dst = np.empty_like(like)
        np.copyto(local.dst[: len(chunk)], chunk)

    return copy


def _repeat_throughput(
    fn: Callable[[Any], Any], items: Sequence[Any], nbytes: int, threads: int, repeats: int
) -> list[float]:
    return repeat(lambda: _throughput(fn, items, nbytes, threads), repeats)


def codec_figures(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    mb = 8 if cfg.quick else 48
    datasets = {
        "digits": digits(mb * MiB // 784),
        "random": random_images(mb * MiB // (3 * 64 * 64)),
    }
    chunk_sizes = (1 * MiB,) if cfg.quick else (256 * KiB, 1 * MiB)
    figures = []
    for data_name, data in datasets.items():
        for chunk_bytes in chunk_sizes:
            chunks, rows = chunks_of(data, chunk_bytes)
            nbytes = sum(c.nbytes for c in chunks)
            for threads in (1, 2):
                progress(f"codecs: {data_name}, {chunk_bytes // KiB} KiB chunks, {threads} thread(s)")
                copy = _repeat_throughput(_copier(chunks[0]), chunks, nbytes, threads, cfg.repeats)
                for codec_name, codec in CODECS.items():
                    figures += _codec_pair(
                        cfg, chunks, rows, nbytes, threads, codec_name, codec, copy,
                        where=f"{data_name} {chunk_bytes // KiB}KiB {threads}t",
                    )  # fmt: skip
    return figures


def _codec_pair(
    cfg: BenchConfig,
    chunks: list[np.ndarray],
    rows: int,
    nbytes: int,
    threads: int,
    codec_name: str,
    codec: dict[str, Any],
    copy: list[float],
    *,
    where: str,
) -> list[Figure]:
    """Encode and decode figures of one codec on one set of chunks."""
    encoded = [zf.encode_chunk(c, rows, codec) for c in chunks]
    dtype, shape = chunks[0].dtype.name, chunks[0].shape

    def decode(buf: bytes) -> np.ndarray:
        return zf.decode_chunk(buf, codec=codec, dtype=dtype, chunk_shape=shape, key="bench", chunk=0)

    extra = {
        "compression": nbytes / sum(len(e) for e in encoded),
        "chunk_rows": rows,
        "threads": threads,
        "limit": "mem_copy",
    }

    def encode(c: np.ndarray) -> bytes:
        return zf.encode_chunk(c, rows, codec)

    enc = _repeat_throughput(encode, chunks, nbytes, threads, cfg.repeats)
    dec = _repeat_throughput(decode, encoded, nbytes, threads, cfg.repeats)
    return [
        Figure(
            bench="codecs",
            name=f"{op} {codec_name} {where}",
            unit="MB/s",
            values=values,
            baseline="memcpy",
            baseline_values=copy,
            extra=extra,
        )
        for op, values in (("encode", enc), ("decode", dec))
    ]


# -- shuffled batch gather: hpstore's chunk path vs plain zarr ------------------------------------------


def gather_figures(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    n = 10_000 if cfg.quick else 60_000
    images = digits(n, seed=1)
    root = cfg.data_dir / "codecs-gather"
    batches = 3 if cfg.quick else 8
    cases = [(64 * KiB, "zstd-1"), (1 * MiB, "zstd-1")]
    if not cfg.quick:
        cases += [
            (256 * KiB, "zstd-1"),
            (64 * KiB, "lz4"),
            (64 * KiB, "none"),
            (1 * MiB, "lz4"),
            (1 * MiB, "none"),
        ]
    figures = []
    try:
        for chunk_bytes, codec_name in cases:
            progress(f"gather: {chunk_bytes // KiB} KiB chunks, {codec_name}")
            layout = Layout(
                chunk_bytes=chunk_bytes, shard_bytes=max(64 * MiB, chunk_bytes), codec=CODECS[codec_name]
            )
            _write(root, images, layout)
            figures += _gather_case(cfg, root, images, batches, f"{chunk_bytes // KiB}KiB {codec_name}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def _write(root: Any, images: np.ndarray, layout: Layout) -> None:
    with StoreWriter(LocalStorage(str(root)), layout=layout, overwrite=True) as w:
        sw = w.split("train")
        sw.append({"image": images})
        w.add_split(sw)
        w.commit()


def _gather_case(cfg: BenchConfig, root: Any, images: np.ndarray, batches: int, where: str) -> list[Figure]:
    import zarr

    ds = hpstore.open(str(root)).split("train")
    arr = zarr.open_array(str(root / ds.spec.fields["image"].path), mode="r")
    rng = np.random.default_rng(0)
    plan = [np.sort(rng.choice(len(images), BATCH, replace=False)) for _ in range(batches)]
    plan = [rng.permutation(b) for b in plan]  # shuffled order inside the batch
    field = ds.spec.fields["image"]
    rows = ds.spec.chunk_rows

    def ours(idx: np.ndarray) -> np.ndarray:
        chunk_ids = np.unique(idx // rows).tolist()
        decoded = dict(zip(chunk_ids, ds.reader.read("image", chunk_ids), strict=True))
        return gather(field, idx, rows, decoded)

    pool = ThreadPoolExecutor(2)

    def ours_2t(idx: np.ndarray) -> np.ndarray:
        """The same, decoding two chunks at a time (what a loader's decode pool does)."""
        chunk_ids = np.unique(idx // rows).tolist()
        raws = ds.reader.fetch(ds.reader.ranges("image", chunk_ids))
        chunks = pool.map(lambda cr: ds.reader.decode("image", *cr), zip(chunk_ids, raws, strict=True))
        return gather(field, idx, rows, dict(zip(chunk_ids, chunks, strict=True)))

    methods: dict[str, Callable[[np.ndarray], Any]] = {
        "hpstore": ours,
        "hpstore_2t": ours_2t,
        "zarr_orthogonal": lambda idx: arr.get_orthogonal_selection((idx,)),
        "zarr_getitem": lambda idx: arr[idx],
    }
    for fn in methods.values():  # warm up: shard indices, zarr metadata, page cache
        assert np.array_equal(np.asarray(fn(plan[0])), images[plan[0]])

    def rate(fn: Callable[[np.ndarray], Any]) -> Callable[[], float]:
        def once() -> float:
            t0 = time.perf_counter()
            for idx in plan:
                fn(idx)
            return BATCH * len(plan) / (time.perf_counter() - t0)

        return once

    with pool:
        got = {name: repeat(rate(fn), cfg.repeats) for name, fn in methods.items()}
    chunks_touched = float(np.mean([len(np.unique(b // rows)) for b in plan]))
    extra = {"chunk_rows": rows, "chunks_per_batch": chunks_touched, "batch": BATCH}
    return [
        Figure(
            bench="codecs",
            name=f"gather {where} {mine} vs {zname}",
            unit="samples/s",
            values=got[mine],
            baseline=zname,
            baseline_values=got[zname],
            extra=extra,
        )
        for mine in ("hpstore", "hpstore_2t")
        for zname in ("zarr_orthogonal", "zarr_getitem")
    ]


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    return codec_figures(cfg, progress) + gather_figures(cfg, progress)


if __name__ == "__main__":
    raise SystemExit(main(run))
