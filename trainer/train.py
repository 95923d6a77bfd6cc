"""The training run, top to bottom: store → task → model → loader → resume → steps → metrics, checkpoints.

One process per rank (torchrun) or a world of one. Every rank builds the same model from the same
seed, reads its own share of each epoch through ``hpstore.Loader``, and all ranks meet in the DDP
gradient all-reduce, in the metrics reduction at each log interval and epoch end, and in checkpoint
saves. Rank 0 alone prints, writes the metrics file and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from typing import IO, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hpstore
from hpstore.dataset import Dataset, Store
from hpstore.errors import HpstoreError, StorageError
from hpstore.loading.loader import Loader
from trainer import distributed, images, lm
from trainer.checkpointing import Position, RunCheckpoints, run_meta
from trainer.config import AUTO_EVAL, TrainConfig
from trainer.distributed import Dist
from trainer.evaluate import EvalResult, evaluate
from trainer.feeder import Batch, Feeder
from trainer.metrics import (
    MetricsFile,
    Progress,
    Snapshot,
    Tally,
    format_status,
    format_window,
    reduce_window,
)
from trainer.models import build_model
from trainer.sharding import state_bytes, wrap_fsdp
from trainer.task import Task, build_task, check_split


def train(cfg: TrainConfig, *, loaders: LoaderFactory | None = None) -> dict[str, Any]:
    """Run the job ``cfg`` describes on this rank; returns the summary record (on every rank)."""
    dist = distributed.init(cfg.device, group=cfg.parallel == "fsdp")
    try:
        return Trainer(cfg, dist, loaders=loaders or make_loader).fit()
    finally:
        distributed_close(dist)


def distributed_close(dist: Dist) -> None:
    with contextlib.suppress(Exception):
        dist.close()


def open_store(cfg: TrainConfig) -> Store:
    try:
        return hpstore.open(cfg.data, storage_options=cfg.storage_options or None)
    except HpstoreError:
        raise
    except Exception as exc:  # an fsspec or network library's own error: say where, in one line
        raise StorageError(f"{cfg.data}: cannot open the store ({type(exc).__name__}: {exc})") from exc


def pick_splits(store: Store, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    fields = [cfg.input] if cfg.model == "gpt" else [cfg.input, cfg.target]
    train = check_split(store, cfg.train_split, fields)
    name = cfg.eval_split
    if name == AUTO_EVAL:
        held_out = "val" if cfg.model == "gpt" else "test"  # tools.ingest --holdout writes 'val'
        name = held_out if held_out in store.splits else None
    return train, (check_split(store, name, fields) if name else None)


class LoaderFactory(Protocol):
    """Builds the loader of one split; the benchmark injects an in-memory one to measure the limit."""

    def __call__(
        self, ds: Dataset, cfg: TrainConfig, dist: Dist, *, train: bool, with_index: bool
    ) -> Any: ...


def make_loader(ds: Dataset, cfg: TrainConfig, dist: Dist, *, train: bool, with_index: bool) -> Loader:
    return Loader(
        ds,
        cfg.batch_size,
        cfg.loader_options(),
        shuffle=train,
        rank=dist.rank,
        world_size=dist.world_size,
        with_index=with_index,
        workers=cfg.worker_kind if train else "threads",  # eval runs briefly: no processes to start
        cache_dir=cfg.cache_dir if train else None,  # eval reads each sample once: nothing to keep
        transforms=images.transforms(ds, cfg.input, cfg.image_size, train=train),
    )


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the peak learning rate to 5% of it over the run."""

    def factor(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """DDP without a buffer broadcast before every forward: the buffers (normalisation constants)
    are equal on every rank by construction."""
    with warnings.catch_warnings():
        # torch >= 2.13 suggests forward_sync_buffers, which older releases lack; the meaning is the same here.
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True,
        )  # fmt: skip


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank random streams (anything random after model init differs by rank, reproducibly)."""
    import random

    import numpy as np

    torch.manual_seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    random.seed(seed * 1000 + rank)


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: Dist, *, loaders: LoaderFactory = make_loader) -> None:
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        store = open_store(cfg)
        train_ds, self.eval_ds = pick_splits(store, cfg)
        evals = [self.eval_ds] if self.eval_ds else []
        gpt = cfg.model == "gpt"  # language modelling: trainer.lm supplies task, model, loader, feeder, eval
        self.task: Task = (
            lm.lm_task(train_ds, evals, cfg)
            if gpt
            else build_task(train_ds, evals, cfg.input, cfg.target, cfg.image_size)
        )

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = (lm.build_gpt(self.task, cfg) if gpt else build_model(cfg.model, self.task)).to(
            self.device
        )
        if cfg.parallel == "fsdp":
            wrap_fsdp(self.model, dist)  # before the optimizer: it must see the sharded parameters
        seed_rank(cfg.seed, dist.rank)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        if gpt and loaders is make_loader:
            loaders = lm.make_lm_loader
        feeder_cls = lm.LMFeeder if gpt else Feeder
        self.loader = loaders(train_ds, cfg, dist, train=True, with_index=cfg.log_indices is not None)
        self.feeder = feeder_cls(self.loader, device=self.device, input=cfg.input, target=cfg.target)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps)
        self.eval_loader: Any = None
        self.eval_feeder: Feeder | None = None
        if self.eval_ds is not None:
            self.eval_loader = loaders(self.eval_ds, cfg, dist, train=False, with_index=True)
            self.eval_feeder = feeder_cls(
                self.eval_loader, device=self.device, input=cfg.input, target=cfg.target
            )

        self.ckpts = RunCheckpoints(cfg, dist, run_meta(cfg, self.task, dist))
        self.pos = self._resume_or_start()
        ddp = dist.active and cfg.parallel == "ddp"
        self.net: nn.Module = wrap_ddp(self.model, dist) if ddp else self.model

        self._announce(train_ds)
        self.tally = Tally()
        self.metrics = MetricsFile(cfg.metrics if dist.is_main else None)
        self.progress = Progress(enabled=dist.is_main, total=self.total_steps, initial=self.pos.step)
        self.indices = _open_indices(cfg.log_indices, dist.rank)
        self.epoch_records: list[dict[str, Any]] = []
        self.final_eval: EvalResult | None = None

    # -- setup -------------------------------------------------------------------------------------

    def _resume_or_start(self) -> Position:
        cfg = self.cfg
        if not cfg.ckpt:
            return Position()
        # Rank 0 looks, every rank decides alike (a rank that raised alone would leave the others waiting).
        existing = self.dist.broadcast_object(self.ckpts.list_existing() if self.dist.is_main else None)
        if not cfg.resume:
            if existing:
                raise HpstoreError(
                    f"{cfg.ckpt} already holds checkpoints (newest step {max(existing)}); pass --resume to "
                    "continue from it, or choose another --ckpt"
                )
            return Position()
        pos = self.ckpts.restore(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, existing=existing,
            steps_per_epoch=self.steps_per_epoch, loader=self.loader,
        )  # fmt: skip
        if pos is None:
            self._say(f"resume: no checkpoint in {cfg.ckpt} yet; starting from step 0")
            return Position()
        self._say(
            f"resume: continuing from {cfg.ckpt} step {pos.step} (epoch {pos.epoch + 1}, batch {pos.batch})"
        )
        if pos.batch >= self.steps_per_epoch:  # saved at the end of an epoch
            return Position(step=pos.step, epoch=pos.epoch + 1, batch=0, loader=None)
        return pos

    def _announce(self, train_ds: Dataset) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        ev = (
            f", eval {self.eval_ds.name!r} ({len(self.eval_ds):,})"
            if self.eval_ds is not None
            else ", no eval split"
        )
        self._say(
            f"train: {self.cfg.data} split {train_ds.name!r} ({len(train_ds):,} samples){ev}; {self.task.describe()}; "
            f"{self.cfg.model} ({params:,} parameters{', fsdp' if self.cfg.parallel == 'fsdp' else ''}) on {self.device}, "
            f"{self.dist.world_size} rank(s) × batch "
            f"{self.cfg.batch_size}, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
        )

    def _say(self, text: str) -> None:
        """A line from rank 0 before the progress bar exists."""
        if self.dist.is_main:
            print(text, flush=True)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.cfg.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        try:
            pos = self.pos
            for epoch in range(pos.epoch, self.cfg.epochs):
                if pos.step >= self.total_steps:
                    break
                pos = self._epoch(epoch, pos)
            self.loader.close()  # stops read-ahead past --max-steps
            self._save(pos)
            self.ckpts.finish()
            if self.final_eval is None and self.eval_feeder is not None:
                self.final_eval = self._evaluate()
            return self._summary(pos)
        finally:
            self.loader.close()
            if self.eval_loader is not None:
                self.eval_loader.close()
            self.progress.close()
            self.metrics.close()
            if self.indices is not None:
                self.indices.close()

    def _epoch(self, epoch: int, pos: Position) -> Position:
        self.loader.set_epoch(epoch)
        batch_no = 0
        if epoch == pos.epoch and pos.loader is not None:
            self.loader.load_state_dict(pos.loader)
            batch_no = pos.batch
        step = pos.step
        epoch_start = log_start = self._snapshot()
        for batch in self.feeder:
            self._step(batch)
            step, batch_no = step + 1, batch_no + 1
            self.progress.step()
            self._log_indices(step, epoch, batch)
            here = Position(step=step, epoch=epoch, batch=batch_no)
            if step % self.cfg.log_every == 0:
                log_start = self._report("train", log_start, here)
            if self.cfg.ckpt_every and step % self.cfg.ckpt_every == 0:
                self._save(here)
            if self.cfg.step_delay:
                time.sleep(self.cfg.step_delay)
            if step >= self.total_steps:
                break
        here = Position(step=step, epoch=epoch, batch=batch_no)
        self._end_epoch(epoch_start, here)
        return here

    def _step(self, batch: Batch) -> None:
        with self._autocast():
            logits = self.net(batch.x) if batch.segments is None else self.net(batch.x, batch.segments)
        loss = F.cross_entropy(logits.float(), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.tally.add_step(batch.size, loss, batch.wait_s)
        if self.tally.steps == 1 or self.tally.steps % self.cfg.log_every == 0:  # constant after step 1
            self.tally.state_bytes = max(self.tally.state_bytes, state_bytes(self.model, self.optimizer))

    def _save(self, pos: Position) -> None:
        if pos.step == 0:
            return
        self.tally.ckpt_stall_s += self.ckpts.save(
            pos, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, loader=self.loader
        )

    def _evaluate(self) -> EvalResult:
        assert self.eval_feeder is not None and self.eval_ds is not None
        self.eval_loader.set_epoch(0)  # from the start of the split, every time
        return (lm.evaluate_lm if self.cfg.model == "gpt" else evaluate)(
            self.model,
            self.eval_feeder,
            num_samples=len(self.eval_loader.dataset) if self.cfg.model == "gpt" else len(self.eval_ds),
            dist=self.dist,
            autocast=self._autocast(),
        )

    # -- reporting ---------------------------------------------------------------------------------

    def _snapshot(self) -> Snapshot:
        return self.tally.snapshot(self.loader.stats)

    def _report(self, kind: str, start: Snapshot, pos: Position, **extra: Any) -> Snapshot:
        """Reduce the window since ``start`` over ranks, print and record it; returns the new start."""
        end = self._snapshot()
        window = reduce_window(self.dist, start, end)
        record = {
            "kind": kind, "time": time.time(), "step": pos.step, "epoch": pos.epoch + 1,
            **{k: v for k, v in window.items() if k != "wall_s"},
            "lr": self.scheduler.get_last_lr()[0], **extra,
        }  # fmt: skip
        self.metrics.write(record)
        text = format_window(window)
        self.progress.status(format_status(window))
        if kind == "epoch" or self.progress.bar is None:
            where = f"step {pos.step}/{self.total_steps} epoch {pos.epoch + 1}/{self.cfg.epochs}"
            if kind == "epoch":
                where = f"end of epoch {pos.epoch + 1}/{self.cfg.epochs} (step {pos.step}/{self.total_steps})"
            self.progress.line(f"{where} | {text}{_eval_text(extra)}")
        if kind == "epoch":
            self.epoch_records.append({**record, "wall_s": window["wall_s"]})
        return end

    def _end_epoch(self, start: Snapshot, pos: Position) -> None:
        end = self._snapshot()
        epoch_time = end.time - start.time
        result = self._evaluate() if self.eval_feeder is not None else None
        if result is not None:
            self.final_eval = result
        self._report(
            "epoch", start, pos, epoch_time_s=epoch_time,
            eval_loss=result.loss if result else None, eval_acc=result.accuracy if result else None,
            eval_samples=result.samples if result else None,
        )  # fmt: skip

    def _summary(self, pos: Position) -> dict[str, Any]:
        recs = self.epoch_records
        wall = sum(r["wall_s"] for r in recs)
        samples = sum(r["samples"] for r in recs)
        lookups = [r for r in recs if r["cache_hit_rate"] is not None]
        summary = {
            "kind": "summary",
            "epochs": pos.step / self.steps_per_epoch if self.steps_per_epoch else 0.0,
            "steps": pos.step,
            "samples": samples,
            "train_time_s": wall,
            "samples_per_s": samples / wall if wall else None,
            "data_wait_frac": sum(r["data_wait_frac"] * r["wall_s"] for r in recs) / wall if wall else None,
            "data_wait_frac_mean": sum(r["data_wait_frac_mean"] * r["wall_s"] for r in recs) / wall
            if wall
            else None,
            "read_mb_per_s": sum(r["read_mb_per_s"] * r["wall_s"] for r in recs) / wall if wall else None,
            "cache_hit_rate": (sum(r["cache_hit_rate"] for r in lookups) / len(lookups)) if lookups else None,
            "eval_loss": self.final_eval.loss if self.final_eval else None,
            "eval_acc": self.final_eval.accuracy if self.final_eval else None,
            "state_bytes": max((r["state_bytes"] for r in recs), default=None),
        }
        self.metrics.write(summary)
        return summary

    def _log_indices(self, step: int, epoch: int, batch: Batch) -> None:
        if self.indices is not None and batch.index is not None:
            rec = {"step": step, "epoch": epoch, "index": batch.index.tolist()}
            self.indices.write(json.dumps(rec) + "\n")


def _eval_text(extra: dict[str, Any]) -> str:
    if extra.get("eval_acc") is None:
        return ""
    return f" | eval loss {extra['eval_loss']:.4f}, accuracy {100 * extra['eval_acc']:.2f}%"


def _open_indices(path: str | None, rank: int) -> IO[str] | None:
    if path is None:
        return None
    # Line-buffered: a run killed with SIGKILL still leaves every step it finished in the log.
    return open(path if rank == 0 else f"{path}.rank{rank}", "a", encoding="utf-8", buffering=1)


def summary_line(s: dict[str, Any]) -> str:
    """The run's last line: epochs, throughput, data wait, final accuracy."""
    sps = "n/a" if s["samples_per_s"] is None else f"{s['samples_per_s']:,.0f} samples/s"
    wait = "n/a" if s["data_wait_frac"] is None else f"{100 * s['data_wait_frac']:.1f}%"
    acc = "n/a" if s["eval_acc"] is None else f"{100 * s['eval_acc']:.2f}%"
    return f"done: {s['epochs']:.2f} epochs, {s['steps']} steps, {sps}, data wait {wait}, eval accuracy {acc}"
