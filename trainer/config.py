"""TrainConfig: everything a training run is told, parsed from the command line and validated.

The flag names are part of the command-line contract (``python -m trainer --help``). Parsing
resolves every string into a typed value here, so nothing downstream switches on raw strings it
could have rejected up front.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hpstore.errors import InputError
from hpstore.loading.options import LoaderOptions
from hpstore.options import OneLineParser, parse_size, parse_storage_option

ModelName = Literal["mlp", "cnn", "linear", "gpt", "resnet"]
DeviceName = Literal["auto", "cpu", "cuda"]
AmpName = Literal["none", "bf16"]
ParallelName = Literal["ddp", "fsdp"]

TRAINER_LOADER = LoaderOptions(num_workers=2)
"""The training loader's options: the library's (``hpstore.LoaderOptions``) except two read-ahead
threads, so window building overlaps the training step. Chosen by ``benchmarks/loader.py``'s
consumer rows (a training step holding the GIL, 28×28, batch 256): see the README's "Random access and
loading" section for the figures. The flags below take their defaults from here."""

AUTO_EVAL = "auto"
"""``--eval-split`` default: the ``test`` split when the store has one, else no evaluation."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str
    model: ModelName = "cnn"
    epochs: int = 1
    batch_size: int = 128
    train_split: str = "train"
    eval_split: str | None = AUTO_EVAL
    input: str = "image"
    target: str = "label"
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: DeviceName = "auto"
    amp: AmpName = "none"
    parallel: ParallelName = "ddp"
    workers: int = TRAINER_LOADER.num_workers
    worker_kind: str = TRAINER_LOADER.workers
    """What the training loader's ``--workers`` are (``LoaderOptions.workers``); eval uses threads."""
    cache_bytes: int = TRAINER_LOADER.cache_bytes
    prefetch_bytes: int = TRAINER_LOADER.prefetch_bytes
    cache_dir: str | None = TRAINER_LOADER.cache_dir
    cache_disk_bytes: int = TRAINER_LOADER.cache_disk_bytes
    storage_options: dict[str, Any] = field(default_factory=dict)
    ckpt: str | None = None
    ckpt_every: int = 0
    keep: int = 3
    resume: bool = False
    metrics: str | None = None
    log_every: int = 50
    max_steps: int | None = None
    log_indices: str | None = None
    step_delay: float = 0.0
    seq_len: int = 256
    gpt_layers: int = 4
    gpt_heads: int = 4
    gpt_width: int = 256
    respect_documents: bool = False
    image_size: int | None = None

    def __post_init__(self) -> None:
        _positive("--epochs", self.epochs)
        _positive("--batch-size", self.batch_size)
        _positive("--log-every", self.log_every)
        _positive("--keep", self.keep)
        if self.max_steps is not None:
            _positive("--max-steps", self.max_steps)
        for flag, value in (
            ("--lr", self.lr),
            ("--weight-decay", self.weight_decay),
            ("--step-delay", self.step_delay),
        ):
            if not math.isfinite(value):
                raise InputError(f"{flag} must be a finite number, got {value}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay must not be negative, got {self.weight_decay}")
        self.loader_options()  # validates the loader flags (hpstore.LoaderOptions does, in one place)
        if self.ckpt_every < 0:
            raise InputError(f"--ckpt-every must not be negative, got {self.ckpt_every}")
        if self.resume and not self.ckpt:
            raise InputError("--resume needs --ckpt DIR_OR_URL")
        if self.ckpt_every and not self.ckpt:
            raise InputError("--ckpt-every needs --ckpt DIR_OR_URL")
        for flag, value in (
            ("--seq-len", self.seq_len),
            ("--gpt-layers", self.gpt_layers),
            ("--gpt-heads", self.gpt_heads),
            ("--gpt-width", self.gpt_width),
        ):
            _positive(flag, value)
        if self.step_delay < 0:
            raise InputError("--step-delay must not be negative")
        if self.image_size is not None and self.image_size < 8:
            raise InputError(f"--image-size must be at least 8, got {self.image_size}")

    def loader_options(self) -> LoaderOptions:
        """The training loader's options from the flags (``TRAINER_LOADER`` with them applied)."""
        flags = {
            "num_workers": "--workers",
            "workers": "--worker-kind",
            "cache_bytes": "--cache-bytes",
            "prefetch_bytes": "--prefetch-bytes",
        }
        flags |= {"cache_disk_bytes": "--cache-disk-bytes"}
        try:
            return TRAINER_LOADER.replace(
                seed=self.seed,
                num_workers=self.workers,
                workers=self.worker_kind,
                cache_bytes=self.cache_bytes,
                prefetch_bytes=self.prefetch_bytes,
                cache_dir=self.cache_dir,
                cache_disk_bytes=self.cache_disk_bytes,
                fields=(self.input, self.target),
            )
        except InputError as exc:
            name = str(exc).split(" ", 1)[0]
            raise InputError(str(exc).replace(name, flags.get(name, name), 1)) from None


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{flag} must be at least 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="")
    p = OneLineParser(
        prog="python -m trainer",
        description="Train a classifier from an hpstore store; under torchrun, one process per rank (DDP).",
    )
    p.add_argument("--data", required=True, help="store path or URL (s3://..., memory://...)")
    p.add_argument(
        "--model",
        choices=["mlp", "cnn", "linear", "gpt", "resnet"],
        default=d.model,
        help="linear: I/O-bound experiments; gpt: a decoder-only transformer on a token store; "
        "resnet: a small residual net for 32-128 px images",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    p.add_argument("--train-split", default=d.train_split)
    p.add_argument(
        "--eval-split",
        default=d.eval_split,
        help="split evaluated after each epoch; default: 'test' if present, 'none' to skip",
    )
    p.add_argument(
        "--input",
        default=None,
        help="fixed-shape image field (uint8 or float); gpt: the token field (tokens)",
    )
    p.add_argument("--target", default=d.target, help="integer label field")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--amp", choices=["none", "bf16"], default=d.amp, help="autocast dtype")
    p.add_argument(
        "--parallel", choices=["ddp", "fsdp"], default=d.parallel,
        help="ddp: replicated model; fsdp: parameters, gradients and optimizer state sharded (FSDP2)",
    )  # fmt: skip
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="loader threads reading ahead (0: read in the training thread)",
    )
    p.add_argument(
        "--worker-kind", choices=["threads", "processes", "auto"], default=d.worker_kind,
        help="training loader's --workers as threads, as processes pinned off the training thread's "
        "CPU (plain splits, no image transforms), or auto (processes where they run)",
    )  # fmt: skip
    p.add_argument(
        "--cache-bytes", type=parse_size, default=d.cache_bytes, help="loader RAM cache, e.g. 512M"
    )
    p.add_argument(
        "--prefetch-bytes", type=parse_size, default=d.prefetch_bytes, help="loader read-ahead budget"
    )
    p.add_argument(
        "--cache-dir", default=None, help="local disk cache for chunks of a remote store (verified, shared)"
    )
    p.add_argument(
        "--cache-disk-bytes", type=parse_size, default=d.cache_disk_bytes, help="disk cache budget, e.g. 50G"
    )
    p.add_argument(
        "--storage-option", action="append", default=[], metavar="K=V", type=parse_storage_option,
        help="fsspec option for the store and the checkpoints (repeatable)",
    )  # fmt: skip
    p.add_argument("--ckpt", default=None, metavar="DIR_OR_URL", help="checkpoint location")
    p.add_argument(
        "--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints (0: only at the end)"
    )
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint in --ckpt"
    )
    p.add_argument(
        "--metrics", default=None, metavar="FILE.jsonl", help="append metrics records here (rank 0)"
    )
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument(
        "--log-indices",
        default=None,
        metavar="FILE",
        help="debug: write each step's sample indices (JSONL; '.rankN' appended on ranks > 0)",
    )
    p.add_argument(
        "--step-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="debug: sleep after each step (stands in for a slower model)",
    )
    g = p.add_argument_group("gpt (--model gpt, a token store from tools.ingest --tokenizer)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="context: tokens per window")
    g.add_argument("--gpt-layers", type=int, default=d.gpt_layers)
    g.add_argument("--gpt-heads", type=int, default=d.gpt_heads)
    g.add_argument("--gpt-width", type=int, default=d.gpt_width)
    g.add_argument(
        "--respect-documents",
        action="store_true",
        help="windows hold whole documents (padding + loss mask); attention and positions stay within each document",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="crop size for stores of encoded images (default 64): random resized crops, centre crops for eval",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The validated config for ``argv``; a malformed command line raises ``UsageError``."""
    a = build_parser().parse_args(argv)
    eval_split = None if a.eval_split.lower() in ("", "none") else a.eval_split
    return TrainConfig(
        data=a.data,
        model=a.model,
        epochs=a.epochs,
        batch_size=a.batch_size,
        train_split=a.train_split,
        eval_split=eval_split,
        input=a.input or ("tokens" if a.model == "gpt" else "image"),
        target=a.target,
        lr=a.lr,
        weight_decay=a.weight_decay,
        seed=a.seed,
        device=a.device,
        amp=a.amp,
        parallel=a.parallel,
        workers=a.workers,
        worker_kind=a.worker_kind,
        cache_bytes=a.cache_bytes,
        prefetch_bytes=a.prefetch_bytes,
        cache_dir=a.cache_dir,
        cache_disk_bytes=a.cache_disk_bytes,
        storage_options=dict(a.storage_option),
        ckpt=a.ckpt,
        ckpt_every=a.ckpt_every,
        keep=a.keep,
        resume=a.resume,
        metrics=a.metrics,
        log_every=a.log_every,
        max_steps=a.max_steps,
        log_indices=a.log_indices,
        step_delay=a.step_delay,
        seq_len=a.seq_len,
        gpt_layers=a.gpt_layers,
        gpt_heads=a.gpt_heads,
        gpt_width=a.gpt_width,
        respect_documents=a.respect_documents,
        image_size=a.image_size,
    )
