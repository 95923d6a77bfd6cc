"""What a training checkpoint holds, and how a run resumes from it exactly.

A checkpoint (through ``hpstore.Checkpointer``: Zarr arrays + JSON, no pickle, write-behind) is::

    meta       what must match to resume: model, input shape and dtype, classes, and the things
               that define the sample order (world size, batch size, seed, train split)
    progress   step (optimizer steps done), epoch (0-based) and batch (batches of that epoch done)
    model, optimizer, scheduler    their state_dict()s (model without the DDP wrapper)
    ranks      one entry per rank: its RNG states (torch, CUDA, numpy, python) and its loader's
               state_dict(), gathered to rank 0, which alone writes

Exact resume: restoring every item above at a step boundary puts each rank in the state it had at
that step, so the resumed run sees the same remaining samples and computes the same parameters, bit
for bit on CPU, as a run that was never stopped.

With ``--parallel fsdp`` the checkpoint is sharded: model and optimizer are the DTensor state dicts
of ``get_state_dict`` (every rank writes its own rows of each tensor, ``hpstore.checkpoint.sharded``),
``ranks`` is a ``PerRank`` value every rank writes itself, and nothing crosses ranks as pickle. Such
a checkpoint resumes on any number of processes (``restore``): model and Adam moments are resharded
on load. On the same number it is exact as above. On another number W' (saved with W) the loader
resumes elastically: the samples of the interrupted epoch that the W ranks had not yet consumed are
re-planned over the W' ranks, each delivered exactly once, the same number of steps ``r`` on every
rank (``Loader.load_state_dict``). The run then stands at batch ``steps_per_epoch - r`` of that
epoch of the W' run: the global step and the LR schedule are mapped there (the cosine schedule
continues at about the same fraction of training), and RNG states are re-seeded from (seed, step,
rank), since per-rank random streams cannot be split or merged.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hpstore.checkpoint.checkpointer import Checkpointer
from hpstore.checkpoint.tree import PerRank
from hpstore.errors import CheckpointError
from trainer.config import TrainConfig
from trainer.distributed import Dist
from trainer.task import Task

FORMAT = "hpstore-trainer/1"
ORDER_KEYS = ("world_size", "batch_size", "seed", "train_split")
"""Meta entries that define which samples come next: resuming needs them unchanged."""
SHAPE_KEYS = ("model", "input_shape", "input_dtype", "num_classes")


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where a run stands: ``step`` steps done; the next batch is batch ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loader: Any = None  # this rank's loader state at that point, None at the start of an epoch


def run_meta(cfg: TrainConfig, task: Task, dist: Dist) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": cfg.model,
        "input_shape": list(task.input_shape),
        "input_dtype": task.input_dtype,
        "num_classes": task.num_classes,
        "world_size": dist.world_size,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "train_split": cfg.train_split,
        "parallel": cfg.parallel,
    }


def rng_state(device: torch.device) -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": np.asarray(np_keys), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": np.asarray(py_state, dtype=np.uint64), "gauss_next": py_gauss},
    }  # fmt: skip
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in np.asarray(p["state"])), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8).cpu(), device)


class RunCheckpoints:
    """Saves a run's state every so often (rank 0 writes, write-behind) and restores it on every rank."""

    def __init__(self, cfg: TrainConfig, dist: Dist, meta: dict[str, Any]) -> None:
        self.url = cfg.ckpt
        self.dist = dist
        self.meta = meta
        self.sharded = cfg.parallel == "fsdp"
        self.seed = cfg.seed
        self.ck: Checkpointer | None = None
        if cfg.ckpt:
            self.ck = Checkpointer(cfg.ckpt, keep=cfg.keep, storage_options=cfg.storage_options or None)
        self.last_saved = -1

    def save(self, pos: Position, *, model: nn.Module, optimizer: Any, scheduler: Any, loader: Any) -> float:
        """Snapshot the state at ``pos`` (every rank calls this); returns seconds the caller was held."""
        if self.ck is None or pos.step == self.last_saved:
            return 0.0
        t0 = time.perf_counter()
        mine = {"rng": rng_state(self.dist.device), "loader": loader.state_dict()}
        if self.sharded:  # every rank saves its own shards and its own values, no gather
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, optimizer)
            self.ck.save(pos.step, {
                "meta": self.meta,
                "progress": {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch},
                "model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(),
                "ranks": PerRank(mine),
            })  # fmt: skip
            self.last_saved = pos.step
            return time.perf_counter() - t0
        ranks = self.dist.all_gather_object(mine)
        if self.dist.is_main:
            state = {
                "meta": self.meta,
                "progress": {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch},
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ranks": ranks,
            }
            self.ck.save(pos.step, state)
        self.last_saved = pos.step
        return time.perf_counter() - t0

    def finish(self) -> None:
        """Wait until every save is persisted (re-raises a background write error), then free the
        staging buffer and the retired checkpoint kept for reuse: only the ``keep`` newest stay."""
        if self.ck is not None and (self.dist.is_main or self.sharded):
            self.ck.close()

    def restore(
        self, *, model: nn.Module, optimizer: Any, scheduler: Any, existing: list[int],
        steps_per_epoch: int, loader: Any,
    ) -> Position | None:  # fmt: skip
        """Load the newest valid checkpoint into the model, optimizer, scheduler and RNGs.

        Rank 0 picks the checkpoint (falling back past corrupt ones); the others load the same step.
        Returns None when there is no checkpoint yet.
        """
        assert self.ck is not None
        if self.sharded:
            if not existing:
                return None
            return self._restore_sharded(model, optimizer, scheduler, steps_per_epoch, loader)
        state = self.ck.load() if self.dist.is_main and self.ck.latest() is not None else None
        step = self.dist.broadcast_object(None if state is None else int(state["progress"]["step"]))
        if step is None:
            return None
        if state is None:
            state = self.ck.load(step=step)
        where = f"checkpoint {self.url} step {step}"
        check_meta(state.get("meta", {}), self.meta, where)
        check_shapes(state["model"], model.state_dict(), where)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][self.dist.rank]
        set_rng_state(mine["rng"], self.dist.device)
        prog = state["progress"]
        return Position(
            step=int(prog["step"]), epoch=int(prog["epoch"]), batch=int(prog["batch"]), loader=mine["loader"]
        )

    def _restore_sharded(
        self, model: nn.Module, optimizer: Any, scheduler: Any, steps_per_epoch: int, loader: Any
    ) -> Position:
        """Every rank loads its new shards (the ranks agree on the step inside ``load``)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        assert self.ck is not None
        msd, osd = get_state_dict(model, optimizer)  # the target: this run's placements
        state = self.ck.load(target={"model": msd, "optimizer": osd})
        prog = state["progress"]
        step = int(prog["step"])
        where = f"checkpoint {self.url} step {step}"
        saved_meta = state.get("meta", {})
        check_meta(saved_meta, self.meta, where, elastic=True)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ranks = state["ranks"]
        saved_world = len(ranks)
        epoch, batch = int(prog["epoch"]), int(prog["batch"])
        if saved_world == self.dist.world_size:
            mine = ranks[self.dist.rank]
            set_rng_state(mine["rng"], self.dist.device)
            return Position(step=step, epoch=epoch, batch=batch, loader=mine["loader"])
        # Another world size: the loader re-plans the rest of the interrupted epoch over this run's
        # ranks (every remaining sample once, equal steps; hpstore.loading.plan, elastic resume). The
        # step counter and schedule move to where this run's epoch has that many steps left.
        saved_loader = ranks[0]["loader"]  # the same position on every rank
        rest = steps_per_epoch
        if saved_loader is not None:
            loader.set_epoch(epoch)
            loader.load_state_dict(saved_loader)
            rest = loader.steps_in_epoch
        new_batch = max(0, steps_per_epoch - rest)
        new_step = epoch * steps_per_epoch + new_batch
        _move_schedule(scheduler, optimizer, new_step)
        torch.manual_seed(self.seed * 7919 + new_step * 31 + self.dist.rank)
        np.random.seed((self.seed * 7919 + new_step * 31 + self.dist.rank) % 2**32)
        random.seed(self.seed * 7919 + new_step * 31 + self.dist.rank)
        if saved_loader is None:
            return Position(step=new_step, epoch=epoch, batch=0, loader=None)
        return Position(step=new_step, epoch=epoch, batch=new_batch, loader=loader.state_dict())

    def list_existing(self) -> list[int]:
        return list(self.ck.steps()) if self.ck is not None else []


def _move_schedule(scheduler: Any, optimizer: Any, step: int) -> None:
    """Put a ``LambdaLR`` at ``step`` of this run (its learning rates as if it had stepped there)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def check_meta(saved: dict[str, Any], current: dict[str, Any], where: str, *, elastic: bool = False) -> None:
    """``elastic``: a sharded checkpoint, which may resume on another world size."""
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a trainer checkpoint (format {saved.get('format')!r})")
    if saved.get("parallel", "ddp") != current.get("parallel", "ddp"):
        raise CheckpointError(
            f"{where} was written by a --parallel {saved.get('parallel', 'ddp')} run; this run is "
            f"--parallel {current.get('parallel', 'ddp')}"
        )
    if any(saved.get(k) != current[k] for k in SHAPE_KEYS):
        raise CheckpointError(
            f"{where} is for a {_describe(saved)}; this run builds a {_describe(current)} "
            "(different --model or dataset)"
        )
    for k in ORDER_KEYS:
        if elastic and k == "world_size":
            continue
        if saved.get(k) != current[k]:
            raise CheckpointError(
                f"{where}: written with {k}={saved.get(k)!r}, this run has {k}={current[k]!r}; exact resume "
                "needs the same world size, --batch-size, --seed and --train-split"
            )


def check_shapes(saved: dict[str, Any], current: dict[str, torch.Tensor], where: str) -> None:
    missing = [k for k in current if k not in saved]
    extra = [k for k in saved if k not in current]
    if missing or extra:
        raise CheckpointError(
            f"{where}: model parameters differ (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, t in current.items():
        s = saved[name]
        if tuple(s.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: parameter {name} has shape {list(s.shape)} in the checkpoint, {list(t.shape)} in this model"
            )


def _describe(meta: dict[str, Any]) -> str:
    return f"{meta.get('model')} on {meta.get('input_dtype')}{meta.get('input_shape')} with {meta.get('num_classes')} classes"
