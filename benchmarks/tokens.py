"""Token streams: ingest, window loading and GPT training against their baselines, side by side.

Corpus: real text on every Debian system -- the licence texts in ``/usr/share/common-licenses``
and the ``copyright`` files under ``/usr/share/doc`` -- one document per file, repeated to the
benchmark size (repetition changes no throughput figure; the quality figure is in the README).

1. **Ingest** (``tools.ingest_tokens``, 2 tokenizer threads): tokens/s of the whole ingest (read,
   tokenize, encode, write, commit) against tokenizing the same documents in one thread with the
   same tokenizer (the per-core limit; the target is ≥ 0.8 × that × cores). Byte-level and a BPE
   ``tokenizer.json`` trained here with ``tokenizers`` (vocabulary 4096).
2. **Loading**, seq_len 1024 and 4096, batch 16 windows: tokens/s of ``hpstore.Loader`` over
   ``ds.windows`` (2 threads) -- ``first epoch`` (a fresh loader, store files in the page cache)
   and ``warm`` (a later epoch, chunks in the loader's RAM cache) -- against nanoGPT's
   ``get_batch`` (a new ``np.memmap`` per batch, ``torch.randint`` offsets, per-sample
   ``astype(int64)`` and ``torch.stack``) on the same tokens, and against one-thread memory-copy
   bandwidth in tokens/s. Only hpstore's epochs are exactly once.
3. **Training** ``--model gpt`` (2 layers, width 128, seq_len 128, batch 16, CPU): tokens/s from
   the store against the same model fed from in-memory tensors (the limit), and the data-wait share.

``python -m benchmarks.tokens [--quick]`` or ``python -m benchmarks --only tokens``.
"""

from __future__ import annotations

import glob
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpstore
from benchmarks.common import BenchConfig, Figure, Progress, main
from benchmarks.limits import memory_copy
from hpstore.tokens.tokenizer import load_tokenizer
from tools.ingest_tokens import TokenIngestConfig, ingest_tokens
from tools.sources.text import open_text
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.train import train

BENCH = "tokens"


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


def corpus(path: Path, target_bytes: int) -> Path:
    docs = texts()
    size = sum(len(d) for d in docs)
    reps = max(1, target_bytes // max(1, size))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(reps):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return path


def train_bpe(src: list[str], path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(src, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"]))
    tok.save(str(path))
    return path


def single_thread_tokens_per_s(src: Path, tokenizer: str) -> float:
    tok = load_tokenizer(tokenizer)
    source = open_text(str(src))
    if hasattr(tok, "tok"):
        import os

        os.environ["RAYON_NUM_THREADS"] = "1"
    n = 0
    t0 = time.perf_counter()
    for docs in source.documents():
        n += len(tok.encode(docs)[0])
    return n / (time.perf_counter() - t0)


def ingest_tokens_per_s(src: Path, dst: Path, tokenizer: str) -> float:
    cfg = TokenIngestConfig(
        src=str(src), dst=str(dst), tokenizer=tokenizer, holdout=0.01, overwrite=True, progress=False
    )
    r = ingest_tokens(cfg)
    return r.total_tokens / r.seconds


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


def hpstore_epoch_tokens_per_s(loader: hpstore.Loader, epoch: int, seq: int) -> float:
    loader.set_epoch(epoch)
    n = 0
    t0 = time.perf_counter()
    for b in loader:
        n += b["tokens"].shape[0] * seq  # input tokens, as nanoGPT counts them
    return n / (time.perf_counter() - t0)


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


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    root = cfg.data_dir / "tokens"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    figs: list[Figure] = []
    src = corpus(root / "corpus.jsonl", (4 if cfg.quick else 32) << 20)
    bpe = train_bpe(texts(), root / "bpe.json")
    reps = 1 if cfg.quick else cfg.repeats
    for name, tok in (("byte", "byte"), ("bpe-4096", str(bpe))):
        single = [single_thread_tokens_per_s(src, tok) for _ in range(reps)]
        full = [ingest_tokens_per_s(src, root / f"store-{name}", tok) for _ in range(reps)]
        figs.append(Figure(bench=BENCH, name=f"ingest {name}, 2 threads", unit="tok/s", values=full,
                           baseline="1-thread tokenizer", baseline_values=single, target="≥ 1.6× (0.8 × 2 cores)"))  # fmt: skip
        progress(
            f"ingest {name}: {np.median(full) / 1e6:.2f} M tok/s vs 1-thread tokenizer {np.median(single) / 1e6:.2f}"
        )
    store = root / "store-bpe-4096"
    ds = hpstore.open(str(store)).split("train")
    tokens = ds.read(np.arange(len(ds)))["tokens"]
    bin_path = root / "train.bin"
    tokens.tofile(bin_path)
    copy_tok_s = [memory_copy(256 << 20).mb_s * 1e6 / 2 for _ in range(reps)]
    for seq in (1024, 4096):
        view: Any = ds.windows("tokens", seq)
        batch = 16
        first, warm, base = [], [], []
        for _ in range(reps):
            loader = hpstore.Loader(view, batch, seed=0, num_workers=2, cache_bytes=2 << 30)
            first.append(hpstore_epoch_tokens_per_s(loader, 0, seq))
            warm.append(hpstore_epoch_tokens_per_s(loader, 1, seq))
            loader.close()
            base.append(nanogpt_tokens_per_s(bin_path, seq, batch, max(20, len(loader))))
        figs.append(Figure(bench=BENCH, name=f"load seq {seq} warm vs nanoGPT", unit="tok/s", values=warm,
                           baseline="nanoGPT memmap get_batch", baseline_values=base, target="≥ 2×"))  # fmt: skip
        figs.append(Figure(bench=BENCH, name=f"load seq {seq} warm vs memcpy", unit="tok/s", values=warm,
                           baseline="1-thread memcpy", baseline_values=copy_tok_s, target="≥ 0.4×"))  # fmt: skip
        figs.append(Figure(bench=BENCH, name=f"load seq {seq} first epoch vs nanoGPT", unit="tok/s", values=first,
                           baseline="nanoGPT memmap get_batch", baseline_values=base))  # fmt: skip
        progress(
            f"load seq {seq}: warm {np.median(warm) / 1e6:.1f} M tok/s, first {np.median(first) / 1e6:.1f}, nanoGPT {np.median(base) / 1e6:.1f}"
        )
    steps = 8 if cfg.quick else 30
    tcfg = TrainConfig(
        data=str(root / "store-byte"), model="gpt", input="tokens", seq_len=128, batch_size=16,
        gpt_layers=2, gpt_width=128, gpt_heads=4, max_steps=steps, log_every=10_000, workers=1, eval_split=None,
    )  # fmt: skip
    fed, mem, wait = [], [], []
    for _ in range(reps):
        s = train(tcfg)
        fed.append(float(s["samples_per_s"]))
        wait.append(float(s["data_wait_frac"]))
        mem.append(float(train(tcfg, loaders=MemoryWindows)["samples_per_s"]))
    figs.append(Figure(bench=BENCH, name="gpt train from store", unit="tok/s", values=fed,
                       baseline="in-memory tensors", baseline_values=mem, target="≥ 0.95×",
                       extra={"data_wait_frac": wait}))  # fmt: skip
    progress(
        f"gpt: {np.median(fed):.0f} tok/s from store, {np.median(mem):.0f} in memory, data wait {np.median(wait):.1%}"
    )
    return figs


if __name__ == "__main__":
    raise SystemExit(main(run))
