"""Checkpoints: the training-visible stall of ``Checkpointer.save``, persist and load throughput.

Side by side in one run, for states of about 100 MB and 1 GB (``--quick``: 64 MB) shaped like a
model's and an Adam optimizer's ``state_dict()``, on the CPU and, where there is one, on a GPU:

- **stall**: the seconds ``save`` holds the caller (staging buffer warm, no save in flight), vs a
  synchronous ``torch.save`` of the same state to the same directory, timed through ``fsync`` (the
  same durability a committed checkpoint has) and, as a second baseline, without it. Target: ≤ 10%
  of ``torch.save``.
- **stall vs copy limit**: the same stall vs the machine's copy limit for those bytes: every
  tensor copied into a preallocated buffer by ``os.cpu_count()`` threads, each taking equal slices
  (best of a few, measured between the saves). Target: ≤ 1.3×. A third state of two large tensors
  (2 × 200 MB float32; ``--quick``: 2 × 20 MB) shows the case where one tensor holds most bytes.
- **persist**: state bytes / background seconds (writes, sync, commit), in the steady state of a
  training run (after ``keep + 1`` saves every save rewrites a retired checkpoint's files; the
  first save's figure is in ``extra``), vs the
  directory's sequential write bandwidth measured here with the same number of bytes (the better of
  ``O_DIRECT`` and buffered + ``fsync``). Target: ≥ 50%.
- **load**: state bytes / seconds of ``load`` (every chunk verified), vs ``torch.load`` of the same
  state, both from a cold page cache when it can be dropped (the note says how). Target: ≥ 1×.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.cache import drop_page_cache
from benchmarks.common import BenchConfig, Figure, Progress, main
from benchmarks.limits import write_file
from hpstore.checkpoint.checkpointer import Checkpointer

MB = 1e6
BENCH = "checkpoint"


@dataclass(frozen=True, kw_only=True)
class Case:
    label: str
    nbytes: int
    device: str = "cpu"
    large: int = 0  # > 0: a state of this many equal float32 tensors instead of a model's


QUICK = (Case(label="64 MB", nbytes=64 << 20), Case(label="2 × 20 MB", nbytes=40 * 10**6, large=2))
FULL = (
    Case(label="100 MB", nbytes=100 * 10**6),
    Case(label="1 GB", nbytes=10**9),
    Case(label="2 × 200 MB", nbytes=400 * 10**6, large=2),
)


def large_state(nbytes: int, count: int, device: str = "cpu") -> dict[str, Any]:
    """``count`` float32 tensors of ``nbytes / count`` each (an embedding table and its Adam moment)."""
    g = torch.Generator(device).manual_seed(0)
    return {f"big.{i}": torch.randn(nbytes // count // 4, generator=g, device=device) for i in range(count)}


def tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in tensors(v)]
    return []


def copy_limit(state: Any, buffer: torch.Tensor, *, threads: int, rounds: int = 3) -> float:
    """Seconds to copy every tensor of ``state`` into ``buffer`` (preallocated, warm) with
    ``threads`` threads, each copy an ``np.copyto`` (which releases the GIL and runs on one core:
    no intra-op thread team to wait for), best of ``rounds`` and of two ways to share the bytes:
    each thread an equal slice of every tensor, or each thread one contiguous run of the whole
    byte stream (fewer, larger copies, which glibc makes with non-temporal stores above its
    threshold: ~1.7x faster for 200 MB pieces on the development VM). The machine's all-core copy
    time for these bytes, with no per-save work at all."""
    host = buffer.numpy()
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    offset = 0
    for t in tensors(state):
        src = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        pairs.append((host[offset : offset + src.nbytes], src))
        offset += src.nbytes
    sliced: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(threads)]
    for dst, src in pairs:
        step = -(-src.nbytes // threads)
        for k, a in enumerate(range(0, src.nbytes, step)):
            sliced[k].append((dst[a : a + step], src[a : a + step]))
    runs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(threads)]
    share, done = -(-offset // threads), 0
    for dst, src in pairs:
        a = 0
        while a < src.nbytes:
            k = min(done // share, threads - 1)
            b = min(src.nbytes, a + (k + 1) * share - done) if k < threads - 1 else src.nbytes
            runs[k].append((dst[a:b], src[a:b]))
            done += b - a
            a = b

    def work(jobs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for dst, src in jobs:
            np.copyto(dst, src)

    best = float("inf")
    for way in (sliced, runs):
        for _ in range(rounds + 1):  # the first round faults the buffer's pages in
            pool = [threading.Thread(target=work, args=(jobs,)) for jobs in way]
            t0 = time.perf_counter()
            for th in pool:
                th.start()
            for th in pool:
                th.join()
            best = min(best, time.perf_counter() - t0)
    return best


def model_state(nbytes: int, layers: int = 24, width: int = 1024, device: str = "cpu") -> dict[str, Any]:
    """A transformer-ish ``{"model", "optimizer"}`` state of about ``nbytes``: per layer a weight and
    a bias, and Adam's ``step``, ``exp_avg``, ``exp_avg_sq`` for each (three copies in all)."""
    rows = max(1, nbytes // (3 * layers * width * 4))
    g = torch.Generator(device).manual_seed(0)
    model: dict[str, torch.Tensor] = {}
    for i in range(layers):
        model[f"layers.{i}.weight"] = torch.randn(rows, width, generator=g, device=device)
        model[f"layers.{i}.bias"] = torch.randn(width, generator=g, device=device)
    state = {
        j: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p) + 1}
        for j, p in enumerate(model.values())
    }
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": list(range(len(model)))}]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "step": 100}


def state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


def torch_save(state: Any, path: Path, *, fsync: bool) -> float:
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def torch_load(path: Path, device: str) -> float:
    t0 = time.perf_counter()
    torch.load(path, weights_only=True, map_location=device)
    sync(device)
    return time.perf_counter() - t0


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def run_case(cfg: BenchConfig, case: Case, progress: Progress) -> list[Figure]:
    root = cfg.data_dir / BENCH / case.label.replace(" ", "")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    state = (
        large_state(case.nbytes, case.large, device=case.device)
        if case.large
        else model_state(case.nbytes, device=case.device)
    )
    nbytes = state_bytes(state)
    threads = os.cpu_count() or 1
    copy_buffer = torch.empty(nbytes, dtype=torch.uint8) if case.device == "cpu" else None
    pt = root / "state.pt"
    ck = Checkpointer(str(root / "ckpt"), keep=2)
    try:
        progress(f"{case.label}: first saves (staging buffer, then retention's first spare)")
        warmup = ck.keep + 1  # from here on every save finds a retired checkpoint to rewrite
        for step in range(warmup):
            ck.save(step, state)
            ck.wait()
        first = ck.stats[0]
        stall, persist, base_fsync, base_buffered, seq_write, limit = [], [], [], [], [], []
        notes: set[str] = set()
        for r in range(cfg.repeats):
            progress(f"{case.label}: repeat {r + 1}/{cfg.repeats}: save, torch.save, sequential write")
            os.sync()  # each timed write starts with no dirty pages left by the one before
            ck.save(warmup + r, state)
            ck.wait()
            s = ck.stats[-1]
            assert s.persist_s is not None
            stall.append(s.stall_s)
            persist.append(nbytes / MB / s.persist_s)
            if copy_buffer is not None:
                limit.append(copy_limit(state, copy_buffer, threads=threads))
            os.sync()
            base_fsync.append(torch_save(state, pt, fsync=True))
            base_buffered.append(torch_save(state, pt, fsync=False))
            os.sync()
            probe = root / "seq-write.bin"
            direct, buffered = write_file(probe, nbytes), write_file(probe, nbytes, direct=False)
            probe.unlink()
            seq_write.append(max(direct.mb_s, buffered.mb_s))
            notes |= {t.note for t in (direct, buffered) if t.note}
        loads, torch_loads, drops = [], [], set()
        for r in range(cfg.repeats):
            progress(f"{case.label}: repeat {r + 1}/{cfg.repeats}: cold load vs torch.load")
            drop = drop_page_cache([root])
            drops.add(drop.note)
            t0 = time.perf_counter()
            ck.load(warmup + cfg.repeats - 1, map_location=case.device)
            sync(case.device)
            loads.append(nbytes / MB / (time.perf_counter() - t0))
            drop_page_cache([root])
            torch_loads.append(nbytes / MB / torch_load(pt, case.device))
    finally:
        ck.close()
        shutil.rmtree(root, ignore_errors=True)
        del copy_buffer
    extra = {
        "first_persist_mb_s": nbytes / MB / (first.persist_s or float("nan")),
        "bytes": nbytes,
        "arrays": first.arrays,
        "objects": first.objects,
        "chunk_bytes": ck.layout.chunk_bytes,
    }
    size = f"{case.label} state" + (f" on {case.device}" if case.device != "cpu" else "")
    vs_limit = (
        [
            Figure(
                bench=BENCH,
                name=f"save stall vs copy limit, {size}",
                unit="s",
                values=stall,
                higher_is_better=False,
                baseline=f"all-core copy of the same bytes ({threads} threads)",
                baseline_values=limit,
                target="≤ 1.3× copy limit",
                extra={
                    **extra,
                    "copy_limit_gb_s": nbytes / 1e9 / min(limit),
                    "stall_gb_s": nbytes / 1e9 / statistics.median(stall),
                },
            )
        ]
        if limit
        else []
    )
    return [
        *vs_limit,
        Figure(
            bench=BENCH, name=f"save stall, {size}", unit="s", values=stall, higher_is_better=False,
            baseline="torch.save + fsync", baseline_values=base_fsync, target="≤ 0.1× torch.save",
            extra={**extra, "first_save_stall_s": first.stall_s, "stall_vs_torch_save_no_fsync": statistics.median(stall) / statistics.median(base_buffered)},
        ),
        Figure(
            bench=BENCH, name=f"save stall vs torch.save (no fsync), {size}", unit="s", values=stall,
            higher_is_better=False, baseline="torch.save, page cache only", baseline_values=base_buffered,
            extra=extra,
        ),
        Figure(
            bench=BENCH, name=f"persist, {size}", unit="MB/s", values=persist,
            baseline="sequential write + fsync, same bytes", baseline_values=seq_write,
            target="≥ 0.5× sequential write", extra={**extra, "limit": "disk_seq_write", "note": "; ".join(sorted(notes))},
        ),
        Figure(
            bench=BENCH, name=f"load (verified), {size}", unit="MB/s", values=loads,
            baseline="torch.load", baseline_values=torch_loads, target="≥ 1× torch.load",
            extra={**extra, "note": "; ".join(sorted(drops)), "limit": "disk_seq_read"},
        ),
    ]  # fmt: skip


def run(cfg: BenchConfig, progress: Progress) -> list[Figure]:
    figures: list[Figure] = []
    cases: tuple[Case, ...] = QUICK if cfg.quick else FULL
    if torch.cuda.is_available():  # snapshot through pinned memory with non-blocking copies
        cases += (Case(label=cases[-1].label, nbytes=cases[-1].nbytes, device="cuda"),)
    for case in cases:
        figures += run_case(cfg, case, progress)
    return figures


if __name__ == "__main__":
    raise SystemExit(main(run))
