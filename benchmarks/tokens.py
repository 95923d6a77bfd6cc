"""Token streams: ingest, window loading, remote loading and GPT training against their baselines.

Every ratio is measured side by side in one run (each repeat runs the figure and its baseline back
to back), on real text every Debian system has -- the licence texts in ``/usr/share/common-licenses``
and the ``copyright`` files under ``/usr/share/doc`` -- one document per file, repeated to the
benchmark size (repetition changes no throughput figure; the quality figure is in the README).

1. **Ingest** (``tools.ingest_tokens`` with one worker per core): tokens/s of the whole ingest
   (read, parse, tokenize, encode, write, commit; after one small untimed ingest, so the process's
   one-time imports are not counted) against reading and tokenizing the same corpus in
   one thread with the same tokenizer (the per-core limit; target ≥ 0.8 × that × cores). Byte-level,
   and a BPE ``tokenizer.json`` (vocabulary 4096) trained here on a slice of the same text.
2. **Peak RSS of the ingest** at two corpus sizes (a child process each, ``ru_maxrss``): flat means
   the bigger corpus needs no more memory.
3. **Loading**, seq_len 1024 and 4096, batch 16 windows, 2 loader threads, RAM cache big enough:
   tokens/s of ``hpstore.Loader`` over ``ds.windows`` -- *cold* (store files evicted from the page
   cache with ``posix_fadvise(DONTNEED)`` after ``fsync``, a fresh ``hpstore.open`` and loader,
   epoch 0), *first epoch* (a fresh loader, files in the page cache) and *warm* (later epochs,
   chunks in the loader's cache) -- against nanoGPT's ``get_batch`` (a new ``np.memmap`` per batch,
   ``torch.randint`` offsets, per-sample ``astype(int64)`` and ``torch.stack``; cold = its file
   evicted the same way) on the same tokens, and against one-thread ``np.copyto`` bandwidth counted
   in tokens/s. Only hpstore's epochs are exactly once.
4. **Remote**: the same window epoch from a loopback moto S3 server (fresh loader, default cache):
   MB/s fetched against a raw replay of exactly the range GETs the loader issued (all in flight at
   once, nothing decoded or gathered).
5. **Training** ``--model gpt`` (2 layers, width 128, seq_len 128, batch 16, CPU, 2 loader threads):
   tokens/s from the store against the same model fed from in-memory tensors (every window read
   before the clock starts: the limit). Reported over the first ``first_steps`` steps (start-up
   included: opening, planning, the first window) and over the steps after (steady state), plus the
   data-wait share.

``python -m benchmarks.tokens [--quick]`` or ``python -m benchmarks --only tokens``. ``--quick`` is
sized for the suite's per-module budget (``benchmarks.suite.QUICK_BUDGET_S``) on a busy 2-core
machine; the full run takes a few minutes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpstore
from benchmarks.common import BenchConfig, Figure, Progress, main
from benchmarks.remote import Recorder, replay
from hpstore.dataset import Store
from hpstore.loading.options import DEFAULT_CACHE_BYTES
from hpstore.tokens.tokenizer import load_tokenizer
from tools.ingest_tokens import TokenIngestConfig, ingest_tokens
from tools.sources.text import open_text
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.train import train

BENCH = "tokens"
BATCH = 16
GPT_WIDTH = 64
TORCH_THREADS = 1
LOADER_THREADS = 2
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class Sizes:
    corpus_bytes: int
    """JSONL text of the byte-level ingest and of the loading figures."""
    bpe_train_bytes: int
    bpe_corpus_bytes: int
    rss_bytes: tuple[int, int]
    remote_bytes: int
    copy_bytes: int
    train_steps: int
    first_steps: int


QUICK = Sizes(
    corpus_bytes=4 << 20, bpe_train_bytes=512 << 10, bpe_corpus_bytes=1 << 20, rss_bytes=(2 << 20, 8 << 20),
    remote_bytes=2 << 20, copy_bytes=16 << 20, train_steps=30, first_steps=10,
)  # fmt: skip
FULL = Sizes(
    corpus_bytes=32 << 20, bpe_train_bytes=2 << 20, bpe_corpus_bytes=8 << 20, rss_bytes=(32 << 20, 256 << 20),
    remote_bytes=16 << 20, copy_bytes=64 << 20, train_steps=300, first_steps=20,
)  # fmt: skip


def texts() -> list[str]:
    paths = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(
        glob.glob("/usr/share/doc/*/copyright")
    )
    out = []
    for p in paths:
        try:
            t = Path(p).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if t:
            out.append(t)
    return out


def corpus(path: Path, target_bytes: int, docs: list[str] | None = None) -> Path:
    """``docs`` (default: ``texts()``) as JSONL, repeated or cut to about ``target_bytes``."""
    lines = [json.dumps({"text": d}) + "\n" for d in (docs if docs is not None else texts())]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            for line in lines:
                f.write(line)
                written += len(line)
                if written >= target_bytes:
                    break
    return path


def sample_texts(docs: list[str], nbytes: int) -> list[str]:
    """Documents spread over the whole list (not only the first licences), about ``nbytes`` of them."""
    step = max(1, round(sum(map(len, docs)) / max(1, nbytes)))
    return docs[::step]


def train_bpe(src: list[str], path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(src, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"]))
    tok.save(str(path))
    return path


def single_thread_tokens_per_s(src: Path, tokenizer: str) -> float:
    """Read and tokenize ``src`` on this thread alone (``tokenizers`` limited to one thread)."""
    tok = load_tokenizer(tokenizer)  # TOKENIZERS_PARALLELISM=false (``run``): no hidden thread pool
    source = open_text(str(src))
    n = 0
    t0 = time.perf_counter()
    for docs in source.documents():
        n += len(tok.encode(docs)[0])
    return n / (time.perf_counter() - t0)


def ingest_tokens_per_s(src: Path, dst: Path, tokenizer: str, workers: int) -> float:
    """One ingest into an empty ``dst``: removing the previous repeat's store (``--overwrite``
    deletes the generation it replaces, 20-60 ms here) is no part of tokenizing and writing."""
    shutil.rmtree(dst, ignore_errors=True)
    cfg = TokenIngestConfig(
        src=str(src), dst=str(dst), tokenizer=tokenizer, overwrite=True, progress=False,
        workers=workers,
    )  # fmt: skip
    r = ingest_tokens(cfg)
    return r.total_tokens / r.seconds


_PEAK_RSS_CHILD = """
import sys
from tools.ingest import main
code = main(sys.argv[1:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) if hwm else -1)
sys.exit(code)
"""


def ingest_peak_rss_mib(src: Path, dst: Path) -> float:
    """Peak RSS of ``tools.ingest SRC DST --tokenizer byte`` in a child process: its own
    ``VmHWM`` at the end (``ru_maxrss`` would report the parent's RSS, which a forked child
    inherits as its high-water mark on Linux)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    args = [str(src), str(dst), "--tokenizer", "byte", "--overwrite", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_CHILD, *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"ingest of {src} failed: {proc.stderr.strip()}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024  # KiB


def evict(path: Path) -> None:
    """Drop ``path``'s pages (every file under it) from the page cache: ``fsync`` then
    ``posix_fadvise(DONTNEED)``. Pages another process has mapped may stay."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def memcpy_tokens_per_s(total_bytes: int, buffer_bytes: int, itemsize: int = 2) -> tuple[float, float]:
    """One-thread ``np.copyto`` of ``total_bytes`` (the bytes a loader epoch delivers, so both run
    as long, under the same contention) between two touched buffers of ``buffer_bytes``: tokens of
    ``itemsize`` bytes per wall second and per CPU second."""
    n = max(1, min(total_bytes, buffer_bytes))
    src = np.ones(n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    dst.fill(1)
    rounds = max(1, round(total_bytes / n))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        np.copyto(dst, src)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return rounds * n / itemsize / wall, rounds * n / itemsize / max(cpu, 1e-9)


def nanogpt_tokens_per_s(bin_path: Path, seq: int, batch: int, steps: int) -> float:
    """karpathy/nanoGPT train.py ``get_batch``, on CPU."""
    t0 = time.perf_counter()
    for _ in range(steps):
        data = np.memmap(bin_path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - seq, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + seq].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + seq].astype(np.int64)) for i in ix.tolist()])
        del x, y
    return steps * batch * seq / (time.perf_counter() - t0)


def epoch_tokens_per_s(loader: hpstore.Loader, epoch: int, seq: int) -> float:
    return epoch_rates(loader, epoch, seq)[0]


def epoch_rates(loader: hpstore.Loader, epoch: int, seq: int) -> tuple[float, float]:
    """Input tokens (as nanoGPT counts them) per wall second and per CPU second of this process
    (every thread: the loader's workers and the consumer) over one epoch."""
    loader.set_epoch(epoch)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in loader:
        n += b["tokens"].shape[0] * seq
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, n / max(cpu, 1e-9)


def window_loader(ds: Any, seq: int, **options: Any) -> hpstore.Loader:
    options.setdefault("cache_bytes", 2 << 30)
    return hpstore.Loader(ds.windows("tokens", seq), BATCH, seed=0, num_workers=LOADER_THREADS, **options)


class MemoryWindows:
    """The in-memory limit for training: every window as one tensor, batches by a seeded permutation."""

    def __init__(self, ds: Any, cfg: TrainConfig, dist: Dist, *, train: bool, with_index: bool) -> None:
        view = ds.windows(cfg.input, cfg.seq_len)
        self.x = torch.from_numpy(view.read(np.arange(len(view)))["tokens"].astype(np.int32))
        self.batch_size, self.seed, self.shuffle, self.epoch, self.input = (
            cfg.batch_size,
            cfg.seed,
            train,
            0,
            cfg.input,
        )
        self.stats: dict[str, float] = {}
        self.dataset = view

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.x)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for s in range(0, n, self.batch_size):
            idx = order[s : s + self.batch_size]
            yield {self.input: self.x[idx], "index": idx}


def train_phases(tcfg: TrainConfig, loaders: Any = None) -> tuple[float, float, float]:
    """(tokens/s over the first ``log_every`` steps, tokens/s after them, data-wait share overall)."""
    path = Path(str(tcfg.metrics))
    path.unlink(missing_ok=True)
    summary = train(tcfg, loaders=loaders) if loaders is not None else train(tcfg)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    head, rest = steps[0], steps[1:]

    def rate(recs: list[dict[str, Any]]) -> float:
        samples = sum(r["samples"] for r in recs)
        wall = sum(r["samples"] / r["samples_per_s"] for r in recs)
        return samples / wall

    return rate([head]), rate(rest), float(summary["data_wait_frac"])


# -- the figures -------------------------------------------------------------------------------------


def ingest_figures(root: Path, sizes: Sizes, reps: int, progress: Progress) -> list[Figure]:
    docs = texts()
    byte_src = corpus(root / "corpus.jsonl", sizes.corpus_bytes)
    bpe_src = corpus(root / "corpus-bpe.jsonl", sizes.bpe_corpus_bytes)
    bpe = train_bpe(sample_texts(docs, sizes.bpe_train_bytes), root / "bpe.json")
    cores = os.cpu_count() or 1
    # One small untimed ingest first: the first in a process imports zarr (writing zarr.json), a
    # one-time 0.3-0.5 s that is no part of throughput but was most of a quick corpus's ingest.
    warm = corpus(root / "warm.jsonl", 64 << 10, docs)
    ingest_tokens_per_s(warm, root / "store-warm", "byte", cores)
    shutil.rmtree(root / "store-warm", ignore_errors=True)
    figs = []
    for name, tok, src in (("byte", "byte", byte_src), ("bpe-4096", str(bpe), bpe_src)):
        single, full = [], []
        for _ in range(reps):
            single.append(single_thread_tokens_per_s(src, tok))
            full.append(ingest_tokens_per_s(src, root / f"store-{name}", tok, cores))
        figs.append(Figure(bench=BENCH, name=f"ingest {name}, {cores} workers", unit="tok/s", values=full,
                           baseline="1-thread read + tokenize", baseline_values=single,
                           target=f"≥ {0.8 * cores:.1f}× (0.8 × {cores} cores)",
                           extra={"corpus_bytes": src.stat().st_size, "cores": cores,
                                  "note": "after an untimed warm-up ingest (one-time imports)"}))  # fmt: skip
        progress(
            f"ingest {name}: {np.median(full) / 1e6:.2f} M tok/s vs 1-thread {np.median(single) / 1e6:.2f}"
            f" ({np.median(full) / np.median(single):.2f}×, {cores} cores)"
        )
    small, large = sizes.rss_bytes
    rss_small: list[float] = []
    rss_large: list[float] = []
    for _ in range(reps):
        for size, out in ((small, rss_small), (large, rss_large)):
            src = corpus(root / f"rss-{size}.jsonl", size, docs)
            out.append(ingest_peak_rss_mib(src, root / f"rss-store-{size}"))
            shutil.rmtree(root / f"rss-store-{size}", ignore_errors=True)
            src.unlink()
    figs.append(Figure(bench=BENCH, name=f"ingest peak RSS, {large >> 20} MiB corpus", unit="MiB",
                       values=rss_large, baseline=f"{small >> 20} MiB corpus", baseline_values=rss_small,
                       higher_is_better=False, target="≤ 1.1× (flat)",
                       extra={"note": "byte tokenizer, VmHWM of a child process"}))  # fmt: skip
    progress(
        f"ingest peak RSS: {np.median(rss_large):.0f} MiB at {large >> 20} MiB, {np.median(rss_small):.0f} MiB at {small >> 20} MiB"
    )
    return figs


def loading_figures(root: Path, sizes: Sizes, reps: int, progress: Progress) -> list[Figure]:
    store = root / "store-byte"
    ds = hpstore.open(str(store)).split("train")
    bin_path = root / "train.bin"
    ds.read(np.arange(len(ds)))["tokens"].tofile(bin_path)
    figs = []
    for seq in (1024, 4096):
        series: list[list[float]] = [[] for _ in range(9)]
        cold, first, warm, base, base_cold, copy, warm_cpu, copy_cpu, ttfb = series
        for _ in range(reps):
            evict(store)
            loader = window_loader(hpstore.open(str(store)).split("train"), seq)
            cold.append(epoch_tokens_per_s(loader, 0, seq))
            loader.close()
            loader = window_loader(hpstore.open(str(store)).split("train"), seq)
            first.append(epoch_tokens_per_s(loader, 0, seq))
            ttfb.append(loader.stats["first_batch_seconds"])
            rates = [epoch_rates(loader, e, seq) for e in (1, 2)]
            warm.append(float(np.mean([r[0] for r in rates])))
            warm_cpu.append(float(np.mean([r[1] for r in rates])))
            wall, cpu = memcpy_tokens_per_s(2 * len(ds), sizes.copy_bytes)
            copy.append(wall)
            copy_cpu.append(cpu)
            steps = max(20, len(loader))
            loader.close()
            evict(bin_path)
            base_cold.append(nanogpt_tokens_per_s(bin_path, seq, BATCH, steps))
            base.append(nanogpt_tokens_per_s(bin_path, seq, BATCH, steps))
        note: dict[str, Any] = {"tokens": len(ds), "batch": BATCH, "loader_threads": LOADER_THREADS}
        figs += [
            Figure(bench=BENCH, name=f"load seq {seq} warm vs nanoGPT", unit="tok/s", values=warm,
                   baseline="nanoGPT memmap get_batch (page cache warm)", baseline_values=base, target="≥ 2×",
                   extra=note),
            Figure(bench=BENCH, name=f"load seq {seq} warm vs memcpy", unit="tok/s", values=warm,
                   baseline="1-thread np.copyto of as many bytes", baseline_values=copy, target="≥ 0.4×",
                   extra={**note, "per_cpu_second": warm_cpu, "memcpy_per_cpu_second": copy_cpu}),
            Figure(bench=BENCH, name=f"load seq {seq} warm vs memcpy, per CPU second", unit="tok/CPU-s",
                   values=warm_cpu, baseline="1-thread np.copyto, per CPU second", baseline_values=copy_cpu,
                   extra={**note, "note": "process CPU time of every thread; steadier than wall time on a busy machine"}),
            Figure(bench=BENCH, name=f"load seq {seq} first epoch vs nanoGPT", unit="tok/s", values=first,
                   baseline="nanoGPT memmap get_batch (page cache warm)", baseline_values=base,
                   extra={**note, "first_batch_seconds": ttfb}),
            Figure(bench=BENCH, name=f"load seq {seq} cold vs nanoGPT cold", unit="tok/s", values=cold,
                   baseline="nanoGPT memmap get_batch, file evicted", baseline_values=base_cold,
                   extra={**note, "cold": "posix_fadvise(DONTNEED) after fsync, fresh hpstore.open"}),
        ]  # fmt: skip
        progress(
            f"load seq {seq}: warm {np.median(warm) / 1e6:.0f} M tok/s ({np.median(warm) / np.median(copy):.2f}× memcpy, "
            f"{np.median(warm_cpu) / np.median(copy_cpu):.2f}× per CPU second, "
            f"{np.median(warm) / np.median(base):.1f}× nanoGPT {np.median(base) / 1e6:.0f}); first {np.median(first) / 1e6:.0f}; "
            f"cold {np.median(cold) / 1e6:.0f} vs nanoGPT cold {np.median(base_cold) / 1e6:.0f}"
        )
    return figs


def remote_figures(root: Path, sizes: Sizes, reps: int, progress: Progress) -> list[Figure]:
    from benchmarks.support.s3server import S3Server

    src = corpus(root / "corpus-remote.jsonl", sizes.remote_bytes)
    seq = 1024
    mbs, raw, toks = [], [], []
    with S3Server() as server:
        options = server.storage_options()
        url = f"s3://{server.create_bucket()}/tokens"
        ingest_tokens(
            TokenIngestConfig(src=str(src), dst=url, tokenizer="byte", progress=False,
                              storage_options=tuple(options.items()))
        )  # fmt: skip
        opened = hpstore.open(url, storage_options=options)
        recorder = Recorder(opened.storage)
        ds = Store(recorder, opened.manifest).split("train")
        for _ in range(reps):
            stats = opened.storage.stats
            before = stats.bytes_read
            recorder.ranges.clear()
            loader = window_loader(ds, seq, cache_bytes=DEFAULT_CACHE_BYTES)
            t0 = time.perf_counter()
            n = sum(b["tokens"].shape[0] * seq for b in loader)
            t = time.perf_counter() - t0
            loader.close()
            mbs.append((stats.bytes_read - before) / t / 1e6)
            toks.append(n / t)
            t, nbytes = replay(opened.storage, list(recorder.ranges))
            raw.append(nbytes / t / 1e6)
    note = {"tokens": len(ds), "seq_len": seq, "requests": len(recorder.ranges), "server": "moto on loopback"}
    progress(
        f"remote: {np.median(mbs):.1f} MB/s ({np.median(toks) / 1e6:.1f} M tok/s) vs raw GET replay {np.median(raw):.1f} MB/s"
    )
    return [
        Figure(bench=BENCH, name=f"load seq {seq} from S3, MB/s", unit="MB/s", values=mbs,
               baseline="raw GET of the same ranges", baseline_values=raw, target="≥ 0.8× raw",
               extra={**note, "tokens_per_s": toks}),
    ]  # fmt: skip


def _train_pair(tcfg: TrainConfig) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    return train_phases(tcfg), train_phases(tcfg, MemoryWindows)


def training_figures(root: Path, sizes: Sizes, reps: int, progress: Progress) -> list[Figure]:
    tcfg = TrainConfig(
        data=str(root / "store-byte"), model="gpt", input="tokens", seq_len=128, batch_size=BATCH,
        gpt_layers=2, gpt_width=GPT_WIDTH, gpt_heads=4, max_steps=sizes.train_steps, log_every=sizes.first_steps,
        workers=LOADER_THREADS, eval_split=None, metrics=str(root / "train-metrics.jsonl"),
    )  # fmt: skip
    fed_head, fed_rest, mem_head, mem_rest, wait = [], [], [], [], []
    threads = torch.get_num_threads()
    # One intra-op thread: the loader's threads share the 2 cores, and OpenMP's spinning workers
    # on an oversubscribed machine made a step 3× slower (measured: 2.1 s against 0.66 s).
    torch.set_num_threads(TORCH_THREADS)
    try:
        pairs = [_train_pair(tcfg) for _ in range(reps)]
    finally:
        torch.set_num_threads(threads)
    for (h, r, w), (mh, mr, _) in pairs:
        fed_head.append(h)
        fed_rest.append(r)
        wait.append(w)
        mem_head.append(mh)
        mem_rest.append(mr)
    n, total = sizes.first_steps, sizes.train_steps
    model = {
        "model": f"gpt 2x{GPT_WIDTH}, seq 128, batch {BATCH}, CPU, {TORCH_THREADS} torch thread",
        "loader_threads": LOADER_THREADS,
    }
    progress(
        f"gpt: first {n} steps {np.median(fed_head):.0f} tok/s from store vs {np.median(mem_head):.0f} in memory; "
        f"steps {n + 1}-{total} {np.median(fed_rest):.0f} vs {np.median(mem_rest):.0f}; data wait {np.median(wait):.1%}"
    )
    return [
        Figure(bench=BENCH, name=f"gpt train from store, first {n} steps", unit="tok/s", values=fed_head,
               baseline="in-memory tensors", baseline_values=mem_head, extra={**model, "note": "start-up included"}),
        Figure(bench=BENCH, name=f"gpt train from store, steps {n + 1}-{total}", unit="tok/s", values=fed_rest,
               baseline="in-memory tensors", baseline_values=mem_rest, target="≥ 0.95×",
               extra={**model, "data_wait_frac": wait}),
    ]  # fmt: skip


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    root = cfg.data_dir / "tokens"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if cfg.quick else FULL
    reps = 1 if cfg.quick else cfg.repeats
    # tokenizers' own Rust thread pool off: the ingest's workers are what uses the cores, and the
    # 1-thread baseline really is one thread.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    progress(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    figs = ingest_figures(root, sizes, reps, progress)
    figs += loading_figures(root, sizes, reps, progress)
    figs += remote_figures(root, sizes, reps, progress)
    figs += training_figures(root, sizes, reps, progress)
    shutil.rmtree(root, ignore_errors=True)
    return figs


if __name__ == "__main__":
    raise SystemExit(main(run))
