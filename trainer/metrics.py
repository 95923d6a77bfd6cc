"""Metrics: what each rank counts, how the counts are reduced over ranks, and where they are written.

Every rank keeps a ``Tally`` of cumulative counters (samples, seconds blocked on the loader, steps,
loss, and the loader's own I/O counters). A report over any window (a log interval, an epoch, the
whole run) is the difference of two ``Snapshot``\\s, reduced over ranks with one sum and one max.

**Data-wait fraction** = seconds a rank spent blocked in ``next(loader)`` ÷ wall seconds of the
window, measured on every rank; ``data_wait_frac`` is the worst rank's, ``data_wait_frac_mean`` the
mean. On CUDA the host may run ahead of the GPU, so a wait the GPU hid is still counted: the figure is
an upper bound there, exact on CPU.

JSONL records (``--metrics FILE``, rank 0, one object per line; MB = 10^6 bytes):

``kind="train"`` every ``--log-every`` steps, and ``kind="epoch"`` at the end of each epoch:
    time (unix s), step (optimizer steps so far), epoch (1-based), loss (mean training loss over
    the window, all ranks), lr, samples (global, in the window), samples_per_s (global),
    step_time_s (mean wall time per step), data_wait_frac, data_wait_frac_mean, read_mb_per_s (bytes the
    loaders fetched from storage, as stored, i.e. compressed; all ranks together), cache_hit_rate (chunk hits ÷ lookups, null when there were none),
    ckpt_stall_s (time the loop spent inside checkpoint saves, rank 0), state_bytes (peak bytes
    of parameters + gradients + optimizer state held by one rank, the largest rank's; with
    ``--parallel fsdp`` each rank holds its shards, with ddp every rank holds everything).
``kind="epoch"`` adds: epoch_time_s, eval_loss, eval_acc, eval_samples (null without an eval split).
``kind="summary"`` once at the end: epochs, steps, samples, train_time_s, samples_per_s,
    data_wait_frac, data_wait_frac_mean, read_mb_per_s, cache_hit_rate, eval_loss, eval_acc,
    state_bytes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from trainer.distributed import Dist

TRAIN_KEYS = (
    "kind", "time", "step", "epoch", "loss", "lr", "samples", "samples_per_s", "step_time_s",
    "data_wait_frac", "data_wait_frac_mean", "read_mb_per_s", "cache_hit_rate", "ckpt_stall_s",
    "state_bytes",
)  # fmt: skip
EPOCH_KEYS = (*TRAIN_KEYS, "epoch_time_s", "eval_loss", "eval_acc", "eval_samples")
SUMMARY_KEYS = (
    "kind", "epochs", "steps", "samples", "train_time_s", "samples_per_s", "data_wait_frac",
    "data_wait_frac_mean", "read_mb_per_s", "cache_hit_rate", "eval_loss", "eval_acc", "state_bytes",
)  # fmt: skip

_SUMS = ("samples", "wait_s", "steps", "loss_sum", "loss_n", "bytes_read", "hits", "misses")


def loader_counters(stats: Any) -> dict[str, float]:
    """Bytes read and chunk-cache hits/misses from a loader's ``stats`` (a dict, or an object with
    ``as_dict()``)."""
    d: dict[str, Any] = stats if isinstance(stats, dict) else stats.as_dict()
    return {
        "bytes_read": float(d.get("bytes_read") or 0.0),
        "hits": float(d.get("chunk_hits") or 0.0),
        "misses": float(d.get("chunk_misses") or 0.0),
    }


@dataclass(frozen=True)
class Snapshot:
    time: float
    values: dict[str, float]


@dataclass
class Tally:
    """One rank's cumulative counters. The loss stays a device tensor so steps never sync for it."""

    samples: float = 0.0
    wait_s: float = 0.0
    steps: float = 0.0
    ckpt_stall_s: float = 0.0
    state_bytes: float = 0.0  # peak parameter + gradient + optimizer-state bytes on this rank
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    loss_n: float = 0.0

    def add_step(self, n: int, loss: torch.Tensor, wait_s: float) -> None:
        if self.loss.device != loss.device:
            self.loss = self.loss.to(loss.device)
        self.loss += loss.detach().to(torch.float64) * n
        self.samples += n
        self.loss_n += n
        self.steps += 1
        self.wait_s += wait_s

    def snapshot(self, loader_stats: Any) -> Snapshot:
        values = {
            "samples": self.samples,
            "wait_s": self.wait_s,
            "steps": self.steps,
            "loss_sum": float(self.loss.item()),
            "loss_n": self.loss_n,
            "ckpt_stall_s": self.ckpt_stall_s,
            "state_bytes": self.state_bytes,
            **loader_counters(loader_stats),
        }
        return Snapshot(time.perf_counter(), values)


def reduce_window(dist: Dist, start: Snapshot, end: Snapshot) -> dict[str, Any]:
    """The window between two snapshots, reduced over ranks (every rank must call this together)."""
    wall = max(end.time - start.time, 1e-9)
    frac = (end.values["wait_s"] - start.values["wait_s"]) / wall
    local = [end.values[k] - start.values[k] for k in _SUMS] + [frac]
    total = dict(
        zip(
            (*_SUMS, "frac"),
            dist.all_reduce(torch.tensor(local, dtype=torch.float64), "sum").tolist(),
            strict=True,
        )
    )
    worst = dist.all_reduce(
        torch.tensor([frac, wall, end.values.get("state_bytes", 0.0)], dtype=torch.float64), "max"
    ).tolist()
    lookups = total["hits"] + total["misses"]
    # The slowest rank's wall time is the job's: a window ends when every rank has reached it.
    job_wall = worst[1]
    return {
        "loss": total["loss_sum"] / total["loss_n"] if total["loss_n"] else None,
        "samples": int(total["samples"]),
        "samples_per_s": total["samples"] / job_wall,
        "step_time_s": job_wall / (total["steps"] / dist.world_size) if total["steps"] else None,
        "data_wait_frac": worst[0],
        "data_wait_frac_mean": total["frac"] / dist.world_size,
        "read_mb_per_s": total["bytes_read"] / 1e6 / job_wall,
        "cache_hit_rate": total["hits"] / lookups if lookups else None,
        "ckpt_stall_s": end.values["ckpt_stall_s"] - start.values["ckpt_stall_s"],
        "state_bytes": int(worst[2]),
        "wall_s": job_wall,
    }


class MetricsFile:
    """Appends JSON records to ``path`` (rank 0 only; a no-op without a path)."""

    def __init__(self, path: str | None) -> None:
        self._f: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_window(r: dict[str, Any]) -> str:
    loss = "n/a" if r.get("loss") is None else f"{r['loss']:.4f}"
    step_ms = "n/a" if r.get("step_time_s") is None else f"{1000 * r['step_time_s']:.1f} ms"
    return (
        f"loss {loss} | {r['samples_per_s']:,.0f} samples/s, step {step_ms}, data wait "
        f"{_pct(r['data_wait_frac'])} (mean {_pct(r['data_wait_frac_mean'])}) | read "
        f"{r['read_mb_per_s']:.1f} MB/s, cache hits {_pct(r['cache_hit_rate'])}"
    )


def format_status(r: dict[str, Any]) -> str:
    """The short form shown beside the progress bar."""
    loss = "n/a" if r.get("loss") is None else f"{r['loss']:.4f}"
    return f"loss {loss}, {r['samples_per_s']:,.0f} samples/s, data wait {_pct(r['data_wait_frac'])}"


class Progress:
    """Rank 0's console: a tqdm bar in a terminal, plain lines otherwise; silent on other ranks."""

    def __init__(self, *, enabled: bool, total: int, initial: int) -> None:
        self.enabled = enabled
        self.bar: Any = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
