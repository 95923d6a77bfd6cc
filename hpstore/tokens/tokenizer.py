"""Tokenizers: text -> token ids, a batch of documents at a time, with an end-of-document token.

Two kinds, chosen by ``load_tokenizer(spec)``:

- ``"byte"``: built in, no files. Ids 0-255 are the UTF-8 bytes, 256 is the end-of-document token
  (vocabulary 257, stored as uint16). A batch is encoded straight from the Arrow string buffer with
  one ``np.insert``: no per-document Python.
- a path to a Hugging Face ``tokenizer.json`` (the ``tokenizers`` package, optional extra
  ``hpstore[tokens]``). The end-of-document token is the first of ``EOT_NAMES`` the vocabulary has;
  a vocabulary without one gets a new id, ``vocab_size``, appended. ``encode_batch`` runs in Rust
  and releases the GIL, so threads tokenize in parallel.

``identity()`` is what the store's manifest records (kind, file name, SHA-256 of the file,
vocabulary size, end-of-document id): a store can be checked against the tokenizer a model uses.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from hpstore.errors import InputError

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>")
"""Names the end-of-document token goes by in common vocabularies, in order of preference."""


class Tokenizer(Protocol):
    vocab_size: int  # every id is < vocab_size, the end-of-document id included
    eot: int

    def encode(self, docs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)`` of a string array: each document's ids followed by ``eot``,
        concatenated (unsigned: uint16 or uint32), and each document's length in ids including its ``eot``."""
        ...

    def decode(self, ids: np.ndarray) -> str: ...

    def identity(self) -> dict[str, Any]: ...


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype[Any]:
    """uint16 when every id fits, else uint32; ``requested`` forces one (and is checked)."""
    if requested not in ("auto", "uint16", "uint32"):
        raise InputError(f"token dtype must be auto, uint16 or uint32, got {requested!r}")
    if requested == "auto":
        requested = "uint16" if vocab_size <= 1 << 16 else "uint32"
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise InputError(
            f"the tokenizer's vocabulary has {vocab_size} ids, more than {requested} holds "
            f"({np.iinfo(dtype).max + 1}); use --token-dtype uint32"
        )
    return dtype


def _string_buffers(docs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, utf8 bytes)`` of a string / large_string array without copying per document."""
    if pa.types.is_string(docs.type):
        off_dtype: Any = np.int32
    elif pa.types.is_large_string(docs.type):
        off_dtype = np.int64
    else:
        raise InputError(f"expected strings, got {docs.type}")
    n = len(docs)
    bufs = docs.buffers()
    offsets = np.frombuffer(
        bufs[1], dtype=off_dtype, count=n + 1, offset=docs.offset * np.dtype(off_dtype).itemsize
    )
    start, stop = int(offsets[0]), int(offsets[-1])
    data = (
        np.frombuffer(bufs[2], dtype=np.uint8)[start:stop] if bufs[2] is not None else np.zeros(0, np.uint8)
    )
    return offsets.astype(np.int64) - start, data


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 ends a document."""

    vocab_size = 257
    eot = 256

    def encode(self, docs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        offsets, data = _string_buffers(docs)
        # uint16 straight away (every id < 257): one pass fewer over the corpus than via uint32.
        ids = np.insert(data.astype(np.uint16), offsets[1:], np.uint16(self.eot))
        return ids, np.diff(offsets) + 1

    def decode(self, ids: np.ndarray) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def identity(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eot": self.eot}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:  # pragma: no cover - the optional extra is missing
            raise InputError(
                "--tokenizer FILE needs the 'tokenizers' package (pip install 'hpstore[tokens]')"
            ) from None
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such tokenizer file (or 'byte' for the built-in byte tokenizer)")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            self.tok = _HF.from_str(raw.decode("utf-8"))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path}: not a tokenizer.json file ({first})") from None
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()
        base = self.tok.get_vocab_size(with_added_tokens=True)
        found = [(name, self.tok.token_to_id(name)) for name in EOT_NAMES]
        named = [(n, i) for n, i in found if i is not None]
        if named:
            self.eot_token: str | None = named[0][0]
            self.eot = int(named[0][1])
            self.vocab_size = max(base, self.eot + 1)
        else:  # no end-of-document token in the vocabulary: a new id after the last one
            self.eot_token, self.eot, self.vocab_size = None, base, base + 1

    def encode(self, docs: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        encs = self.tok.encode_batch_fast(docs.to_pylist(), add_special_tokens=False)
        lists = [e.ids for e in encs]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.uint32, count=int(lengths.sum()))
        ids = np.insert(flat, np.cumsum(lengths), np.uint32(self.eot))
        return ids, lengths + 1

    def decode(self, ids: np.ndarray) -> str:
        keep = [int(i) for i in np.asarray(ids).tolist() if i != self.eot]
        return str(self.tok.decode(keep))

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "huggingface",
            "file": os.path.basename(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eot": self.eot,
            "eot_token": self.eot_token,
        }


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` or a path to a ``tokenizer.json``."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
