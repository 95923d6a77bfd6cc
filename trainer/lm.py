"""Language modelling from a token store: ``--model gpt``.

What differs from classification, each behind the same seam the classifier uses:

- the split is seen through ``Dataset.windows(field, seq_len)`` (``hpstore.tokens``): a sample is
  a window of ``seq_len + 1`` tokens, dealt exactly once per epoch across ranks like any row;
- ``LMFeeder`` turns a window batch ``[B, seq_len + 1]`` into inputs ``[B, seq_len]`` and targets
  flattened to ``[B·seq_len]`` (``-100``, cross-entropy's ignore index, where a document-packed
  window is padding), and ``GPT`` returns logits ``[B·seq_len, vocab]``, so the training step's
  ``cross_entropy(logits, y)`` is unchanged and the metrics' "samples" are target tokens;
- ``evaluate_lm`` is the mean next-token loss (and accuracy) over every held-out window, each
  counted once across ranks.

``GPT`` is a small decoder-only transformer in the style of nanoGPT: learned token and position
embeddings, pre-norm blocks of causal self-attention (``scaled_dot_product_attention``) and a 4×
MLP, the output layer tied to the token embedding.

Packed windows (``--respect-documents``): the batch's ``doc_ids`` (which document of the window
each token belongs to) go to ``GPT.forward`` as ``segments``; attention is then causal *and*
block-diagonal (a token sees only earlier tokens of its own document: ``attn_mask`` of
``[B, 1, T, T]``) and positions restart at 0 at each document start, so a window holding two
documents computes exactly what the two documents would compute alone. The mask is ``B·T²``
bools (268 MB at B = 16, T = 4096) and takes SDPA off its fused causal kernels; a varlen or
``flex_attention`` kernel fed the ``doc_ids`` boundaries would avoid both.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpstore.dataset import Dataset
from hpstore.errors import InputError
from hpstore.loading.loader import Loader
from trainer.distributed import Dist
from trainer.evaluate import EvalResult
from trainer.feeder import Batch, Feeder
from trainer.task import Task

if TYPE_CHECKING:
    from trainer.config import TrainConfig

IGNORE = -100
"""Target id cross-entropy ignores (padding of document-packed windows)."""


def lm_task(train: Dataset, evals: list[Dataset], cfg: TrainConfig) -> Task:
    """The task of a token field: vocabulary from its attributes, context from ``--seq-len``."""
    where = f"{train.store.url}: split {train.name!r}"
    f = train.fields[cfg.input]
    if f.variable or f.shape != () or np.dtype(f.dtype).kind not in "iu":
        raise InputError(f"{where}: field {cfg.input!r} is not a token stream (ingest text with --tokenizer)")
    vocab = f.attrs.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise InputError(f"{where}: field {cfg.input!r} records no vocab_size")
    for ds in (train, *evals):
        if len(ds) <= 2 * cfg.seq_len:
            raise InputError(
                f"{train.store.url}: split {ds.name!r} has {len(ds)} tokens, too few for --seq-len {cfg.seq_len}"
            )
    return Task(
        input_field=cfg.input, target_field=cfg.input, input_shape=(cfg.seq_len,), input_dtype=f.dtype,
        num_classes=vocab, class_names=None, scale=1.0, mean=0.0, std=1.0,
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position of each token in its document: ``j`` minus where its segment starts (``[B, T]``)."""
    t = segments.shape[1]
    j = torch.arange(t, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return j - torch.cummax(torch.where(starts, j, 0), dim=1).values


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """Causal, block-diagonal attention (bool ``[B, 1, T, T]``, True = may attend): query ``i``
    sees key ``j <= i`` of the same segment only."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(tokens [B, T], segments [B, T] | None)`` -> logits
    ``[B·T, vocab]``; with ``segments`` (document ids of packed windows) no attention crosses a
    document boundary and positions restart per document."""

    def __init__(self, task: Task, *, layers: int, heads: int, width: int) -> None:
        super().__init__()
        if width % heads:
            raise InputError(f"--gpt-width {width} is not a multiple of --gpt-heads {heads}")
        self.context = task.input_shape[0]
        self.tok = nn.Embedding(task.num_classes, width)
        self.pos = nn.Embedding(self.context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, task.num_classes, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        t = idx.shape[1]
        mask = None
        if segments is None:
            pos = torch.arange(t, device=idx.device)
        else:
            seg = segments[:, :t]
            pos, mask = document_positions(seg), document_mask(seg)
        x = self.tok(idx.int()) + self.pos(pos)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x)).reshape(-1, self.head.out_features)


def build_gpt(task: Task, cfg: TrainConfig) -> GPT:
    return GPT(task, layers=cfg.gpt_layers, heads=cfg.gpt_heads, width=cfg.gpt_width)


def make_lm_loader(ds: Dataset, cfg: TrainConfig, dist: Dist, *, train: bool, with_index: bool) -> Loader:
    view: Any = ds.windows(cfg.input, cfg.seq_len, respect_documents=cfg.respect_documents)
    return Loader(
        view, cfg.batch_size, shuffle=train, seed=cfg.seed, fields=[cfg.input], drop_last=False,
        rank=dist.rank, world_size=dist.world_size, num_workers=cfg.workers,
        prefetch_bytes=cfg.prefetch_bytes, cache_bytes=cfg.cache_bytes, with_index=with_index,
        cache_dir=cfg.cache_dir if train else None, cache_disk_bytes=cfg.cache_disk_bytes,
    )  # fmt: skip


class LMFeeder(Feeder):
    """Window batches as (inputs ``[B, T]``, flattened targets ``[B·T]``) on the device."""

    def __iter__(self) -> Any:
        it = iter(self.loader)
        while True:
            t0 = _now()
            try:
                raw = next(it)
            except StopIteration:
                return
            wait = _now() - t0
            tokens = raw[self.input]
            mask = raw.get("loss_mask")
            segments = raw.get("doc_ids")
            if self.stream is not None:
                tokens = self._to_device(tokens)
                mask = self._to_device(mask) if mask is not None else None
                segments = self._to_device(segments) if segments is not None else None
            tokens = tokens.int()  # uint16/uint32 as stored; embedding and targets want signed ids
            y = tokens[:, 1:].long()
            if mask is not None:
                y = y.masked_fill(~mask, IGNORE)
            seg = segments[:, :-1] if segments is not None else None
            yield Batch(x=tokens[:, :-1], y=y.reshape(-1), index=raw.get("index"), wait_s=wait, segments=seg)


def _now() -> float:
    import time

    return time.perf_counter()


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    feeder: Feeder,
    *,
    num_samples: int,
    dist: Dist,
    autocast: AbstractContextManager[object],
) -> EvalResult:
    """Mean next-token loss and accuracy over every held-out window, each counted once across ranks
    (the loader's few wrap-around duplicates are divided out, as in ``trainer.evaluate``)."""
    device = feeder.device
    table = torch.zeros(4, num_samples, dtype=torch.float64, device=device)  # loss, correct, targets, seen
    was_training = model.training
    model.eval()
    try:
        for batch in feeder:
            if batch.index is None:
                raise RuntimeError("the eval loader must be built with with_index=True")
            idx = batch.index.to(device, non_blocking=True).long()
            with autocast:
                logits = model(batch.x) if batch.segments is None else model(batch.x, batch.segments)
            b = batch.x.shape[0]
            loss = F.cross_entropy(logits.float(), batch.y, reduction="none").view(b, -1)
            valid = (batch.y != IGNORE).view(b, -1)
            right = (logits.argmax(1) == batch.y).view(b, -1) & valid
            table[0].index_add_(0, idx, loss.double().sum(1))
            table[1].index_add_(0, idx, right.double().sum(1))
            table[2].index_add_(0, idx, valid.double().sum(1))
            table[3].index_add_(0, idx, torch.ones(b, dtype=torch.float64, device=device))
    finally:
        model.train(was_training)
    table = dist.all_reduce(table.cpu(), "sum")
    seen = table[3]
    if int((seen == 0).sum()):
        raise RuntimeError("evaluation missed some held-out windows: the loader skipped some")
    per = table[:3] / seen
    return EvalResult(
        loss=float(per[0].sum() / per[2].sum()),
        accuracy=float(per[1].sum() / per[2].sum()),
        samples=num_samples,
    )
