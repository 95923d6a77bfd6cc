"""``python -m tools.ingest SRC DST --tokenizer byte|FILE.json``: text -> a token store.

SRC is a JSONL or Parquet file (documents under ``--text-field``, default ``text``), a plain-text
file (one document), a directory or a glob of them (``tools.sources.text``). The store has, per
split, one fixed-shape field ``tokens`` of shape ``()`` -- one token per sample, uint16 when the
vocabulary fits, else uint32 -- holding every document's tokens followed by the end-of-document
token, and a split ``<split>.docs`` whose field ``offsets`` (int64) gives each document's first
token and, last, the token count. The token field's attributes record the tokenizer's identity,
``vocab_size``, ``eot`` and the documents split; ``hpstore.tokens.TokenWindows`` reads them.
``--holdout F`` sends every ``round(1/F)``-th document to a second split (``--holdout-split``,
default ``val``), for validation loss on text the model never trained on.

Flow: a reader thread reads raw pieces in order (2 MB blocks of whole JSON lines, Parquet record
batches, groups of text files; ``tools.sources.text``) -> ``--workers`` threads each parse, check
and tokenize a piece (Arrow's JSON parser, UTF-8 validation, the byte tokenizer's numpy calls and
``tokenizers``' Rust all run without the GIL), up to ``2 · workers`` pieces ahead of the one
being appended (so tokenizers keep going while the main thread waits for a free encode slot) ->
the main thread takes results in document order, sends held-out documents to their split, and
appends tokens, one whole chunk at a time and mostly as views of the tokenizer's output (no join
or copy on the main thread), and offsets to ``StoreWriter``, whose encode pool compresses and
checksums chunks in parallel (zstd releases the GIL) -> the manifest commits last. Memory is a few pieces and chunks whatever the corpus size. Parsing used to run on
the reader thread alone, which capped a byte-level ingest at one core's JSON parsing.

Exit status as ``tools.ingest``: 0 done; 2 bad input (invalid UTF-8, a missing text column, an
empty document without ``--skip-empty``, a vocabulary too large for ``--token-dtype``, an unusable
tokenizer file); 1 an I/O failure. Nothing is committed unless everything was read.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from hpstore.errors import InputError
from hpstore.format.manifest import Manifest
from hpstore.format.writer import SplitWriter, StoreWriter, split_geometry
from hpstore.memory import bound_heap
from hpstore.options import OneLineParser, parse_size, parse_storage_option
from hpstore.storage.open import open_storage
from hpstore.tokens.layout import DOCUMENTS_ATTR, OFFSETS_FIELD
from hpstore.tokens.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype
from tools.ingest import (
    CODECS,
    DEFAULT_LAYOUT,
    IngestConfig,
    _check_destination,
    run_command,
)
from tools.sources.base import check_field_name
from tools.sources.prefetch import prefetched
from tools.sources.text import Parsed, Piece, TextSource, open_text

TOKENS_FIELD = "tokens"
DOCS_SUFFIX = ".docs"


@dataclass(frozen=True, kw_only=True)
class TokenIngestConfig:
    src: str
    dst: str
    tokenizer: str
    text_field: str = "text"
    split: str = "train"
    holdout: float = 0.0
    holdout_split: str = "val"
    skip_empty: bool = False
    token_dtype: str = "auto"
    overwrite: bool = False
    chunk_bytes: int = DEFAULT_LAYOUT.chunk_bytes
    shard_bytes: int = DEFAULT_LAYOUT.shard_bytes
    codec: str = str(DEFAULT_LAYOUT.codec["name"])
    level: int | None = None
    workers: int = DEFAULT_LAYOUT.workers
    storage_options: tuple[tuple[str, Any], ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        check_field_name(self.split, "--split", what="split")
        check_field_name(self.holdout_split, "--holdout-split", what="split")
        if not 0 <= self.holdout < 0.5:
            raise InputError(f"--holdout must be in [0, 0.5), got {self.holdout}")
        if self.holdout and self.holdout_split == self.split:
            raise InputError("--holdout-split must differ from --split")
        if self.token_dtype not in ("auto", "uint16", "uint32"):
            raise InputError(f"--token-dtype must be auto, uint16 or uint32, got {self.token_dtype!r}")
        self.layout_config().layout()  # sizes, codec and level are checked now

    def layout_config(self) -> IngestConfig:
        return IngestConfig(
            src=self.src,
            dst=self.dst,
            chunk_bytes=self.chunk_bytes,
            shard_bytes=self.shard_bytes,
            codec=self.codec,
            level=self.level,
            workers=self.workers,
        )

    @property
    def holdout_period(self) -> int:
        return round(1 / self.holdout) if self.holdout else 0


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m tools.ingest",
        description="Tokenize text (JSONL, Parquet, .txt; files, directories, globs) into a token store.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--tokenizer", required=True, help="'byte' or a Hugging Face tokenizer.json")
    p.add_argument("--text-field", default="text", help="JSON key or Parquet column holding the text")
    p.add_argument("--split", default="train")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of documents held out, e.g. 0.01")
    p.add_argument("--holdout-split", default="val")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of refusing")
    p.add_argument("--token-dtype", choices=("auto", "uint16", "uint32"), default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--chunk-bytes", type=parse_size, default=DEFAULT_LAYOUT.chunk_bytes)
    p.add_argument("--shard-bytes", type=parse_size, default=DEFAULT_LAYOUT.shard_bytes)
    p.add_argument("--codec", choices=CODECS, default=DEFAULT_LAYOUT.codec["name"])
    p.add_argument("--level", type=int)
    p.add_argument("--workers", type=int, default=DEFAULT_LAYOUT.workers, help="tokenizer threads")
    p.add_argument("--storage-option", action="append", type=parse_storage_option, default=[], metavar="K=V")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: Sequence[str]) -> TokenIngestConfig:
    a = build_parser().parse_args(argv)
    return TokenIngestConfig(
        src=a.src,
        dst=a.dst,
        tokenizer=a.tokenizer,
        text_field=a.text_field,
        split=a.split,
        holdout=a.holdout,
        holdout_split=a.holdout_split,
        skip_empty=a.skip_empty,
        token_dtype=a.token_dtype,
        overwrite=a.overwrite,
        chunk_bytes=a.chunk_bytes,
        shard_bytes=a.shard_bytes,
        codec=a.codec,
        level=a.level,
        workers=a.workers,
        storage_options=tuple(a.storage_option),
        progress=not a.no_progress,
    )


Encoded = dict[str, tuple[np.ndarray, np.ndarray]]
"""Per split: (token ids in the store's dtype, tokens per document)."""


class _SplitTokens:
    """Appends one split's tokens and its documents' offsets, in document order.

    Tokens reach the split writer one whole chunk at a time, each a view of the tokenizer's output
    where a chunk lies inside one piece (most of them: a piece holds a few chunks): the writer then
    neither joins nor copies them before encoding. Only a chunk that spans two pieces is copied
    once, from the pieces' tails and heads kept here. (The writer re-joins its whole buffer for
    every chunk it emits: fed arbitrary pieces, that copy was the main thread's largest cost.)"""

    def __init__(self, writer: StoreWriter, name: str, attrs: dict[str, Any], dtype: np.dtype[Any]) -> None:
        self.tokens: SplitWriter = writer.split(name, attrs={TOKENS_FIELD: attrs})
        self.docs: SplitWriter = writer.split(name + DOCS_SUFFIX)
        self.name = name
        self.total = 0
        self.documents = 0
        # The split writer's own chunk size for this field (it derives it from the row size alone).
        self.chunk = split_geometry({TOKENS_FIELD: np.zeros(1, dtype)}, writer.layout)[0]
        self._tail: list[np.ndarray] = []  # tokens short of a whole chunk, in order
        self._tail_size = 0

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        starts = np.empty(len(lengths), dtype=np.int64)
        starts[0] = self.total
        np.cumsum(lengths[:-1], out=starts[1:])
        starts[1:] += self.total
        self.docs.append({OFFSETS_FIELD: starts})
        self.total += int(ids.size)
        self.documents += len(lengths)
        c, at = self.chunk, 0
        if self._tail_size:
            at = min(c - self._tail_size, ids.size)
            self._tail.append(ids[:at])
            self._tail_size += at
            if self._tail_size < c:
                return
            self._put(np.concatenate(self._tail))
            self._tail, self._tail_size = [], 0
        while ids.size - at >= c:
            self._put(ids[at : at + c])
            at += c
        if at < ids.size:
            self._tail, self._tail_size = [ids[at:]], ids.size - at

    def _put(self, tokens: np.ndarray) -> None:
        self.tokens.append({TOKENS_FIELD: tokens})

    def finish(self, writer: StoreWriter) -> None:
        if not self.documents:
            raise InputError(f"split {self.name!r} received no documents (a smaller --holdout? more text?)")
        if self._tail_size:
            self._put(np.concatenate(self._tail))
            self._tail, self._tail_size = [], 0
        self.docs.append({OFFSETS_FIELD: np.array([self.total], dtype=np.int64)})
        writer.add_split(self.tokens)
        writer.add_split(self.docs)


@dataclass(frozen=True)
class _Tokenized:
    """One piece, parsed and tokenized on a worker (``failed``: its parse raised ``InputError``,
    re-run in order on the main thread for a message with the right document number)."""

    piece: Piece
    parsed: Parsed | None
    ids: np.ndarray
    lengths: np.ndarray
    failed: bool = False


def _tokenize(
    source: TextSource, tok: ByteTokenizer | HFTokenizer, dtype: np.dtype[Any], piece: Piece
) -> _Tokenized:
    try:
        parsed = source.parse(piece)
    except InputError:
        return _Tokenized(piece, None, np.zeros(0, dtype), np.zeros(0, np.int64), failed=True)
    if not len(parsed.docs):
        return _Tokenized(piece, parsed, np.zeros(0, dtype), np.zeros(0, np.int64))
    ids, lengths = tok.encode(parsed.docs)
    return _Tokenized(piece, parsed, ids.astype(dtype, copy=False), lengths)


def _split_held_out(ids: np.ndarray, lengths: np.ndarray, first: int, cfg: TokenIngestConfig) -> Encoded:
    """Documents ``first, first + 1, ...`` between the train split and the held-out one."""
    if not cfg.holdout_period:
        return {cfg.split: (ids, lengths)}
    number = np.arange(first, first + len(lengths))
    held = number % cfg.holdout_period == cfg.holdout_period - 1
    if not held.any():
        return {cfg.split: (ids, lengths)}
    per_token = np.repeat(held, lengths)
    return {
        cfg.split: (ids[~per_token], lengths[~held]),
        cfg.holdout_split: (ids[per_token], lengths[held]),
    }


@dataclass(frozen=True, kw_only=True)
class TokenIngestResult:
    manifest: Manifest
    documents: dict[str, int]
    tokens: dict[str, int]
    text_bytes: int
    skipped: int
    seconds: float
    tokenizer: dict[str, Any]
    dtype: str

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def summary(self, dst: str) -> str:
        parts = ", ".join(f"{n} {self.tokens[n]:,} tokens in {self.documents[n]:,} docs" for n in self.tokens)
        out = sum(o.size for o in self.manifest.objects.values())
        skipped = f", {self.skipped} empty skipped" if self.skipped else ""
        return (
            f"ingest: {parts}{skipped}; {self.tokenizer['kind']} tokenizer, vocab {self.tokenizer['vocab_size']}, "
            f"{self.dtype}; {self.text_bytes / 1e6:.1f} MB text in, {out / 1e6:.1f} MB out, {self.seconds:.2f} s, "
            f"{self.total_tokens / max(self.seconds, 1e-9) / 1e6:.2f} M tokens/s -> {dst}"
        )


def ingest_tokens(cfg: TokenIngestConfig, *, stream: TextIO = sys.stderr) -> TokenIngestResult:
    """Run one token ingest; DST is unchanged unless it returns."""
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tok.vocab_size, cfg.token_dtype)
    source = open_text(cfg.src, text_field=cfg.text_field, skip_empty=cfg.skip_empty)
    _check_destination(cfg.dst)
    storage = open_storage(cfg.dst, dict(cfg.storage_options))
    identity = tok.identity()
    attrs = {"tokenizer": identity, "vocab_size": tok.vocab_size, "eot": tok.eot}
    record = {
        "tool": "tools.ingest",
        "path": os.path.abspath(cfg.src),
        "format": "text",
        "tokenizer": identity,
        "options": {"text_field": cfg.text_field, "holdout": cfg.holdout, "skip_empty": cfg.skip_empty},
    }
    names = [cfg.split] + ([cfg.holdout_split] if cfg.holdout else [])
    with StoreWriter(
        storage, layout=cfg.layout_config().layout(), overwrite=cfg.overwrite, source=record
    ) as writer:
        outs = {n: _SplitTokens(writer, n, {**attrs, DOCUMENTS_ATTR: n + DOCS_SUFFIX}, dtype) for n in names}
        workers = max(1, cfg.workers)
        # Pieces tokenized ahead of the one being appended: while the main thread waits for the
        # encode pool (at most 2 chunks per encoder in flight), the tokenizers keep going.
        depth = 2 * workers
        pending: deque[Future[_Tokenized]] = deque()
        rows: dict[str, int] = {}  # documents of each file so far (error messages name them)
        first = 0  # documents kept so far (the held-out split takes every holdout_period-th)

        def drain(limit: int) -> None:
            nonlocal first
            while len(pending) > limit:
                done = pending.popleft().result()
                base = rows.get(done.piece.path, 0)
                parsed = done.parsed if not done.failed else source.parse(done.piece, base)  # raises
                assert parsed is not None
                rows[done.piece.path] = base + parsed.rows
                source.account(parsed)
                for name, (ids, lengths) in _split_held_out(done.ids, done.lengths, first, cfg).items():
                    outs[name].append(ids, lengths)
                first += len(done.lengths)

        with (
            ThreadPoolExecutor(workers, thread_name_prefix="hpstore-tokenize") as pool,
            closing(prefetched(source.pieces())) as pieces,
        ):
            try:
                for piece in pieces:
                    pending.append(pool.submit(_tokenize, source, tok, dtype, piece))
                    drain(depth)
                drain(0)
            finally:
                for f in pending:
                    f.cancel()
        source.check_any()
        for out in outs.values():
            out.finish(writer)
        manifest = writer.commit()
    return TokenIngestResult(
        manifest=manifest,
        documents={n: o.documents for n, o in outs.items()},
        tokens={n: o.total for n, o in outs.items()},
        text_bytes=source.bytes_read,
        skipped=source.skipped,
        seconds=time.perf_counter() - t0,
        tokenizer=identity,
        dtype=dtype.name,
    )


def main(argv: Sequence[str]) -> int:
    bound_heap()
    return run_command(argv, parse_args, ingest_tokens)
