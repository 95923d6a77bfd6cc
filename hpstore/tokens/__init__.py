"""Token streams: tokenizers and windows of a token field (see README.md).

The window view (``TokenWindows`` and friends) loads on first use: it needs torch, and the token
ingest, which needs only the tokenizers, should not pay torch's import on every run."""

from typing import Any

from hpstore.tokens.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype

__all__ = [
    "DOC_IDS",
    "LOSS_MASK",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenWindows",
    "load_tokenizer",
    "pack_documents",
    "token_dtype",
]

_WINDOWS = ("DOC_IDS", "LOSS_MASK", "TokenWindows", "pack_documents")


def __getattr__(name: str) -> Any:
    if name in _WINDOWS:
        from hpstore.tokens import windows

        return getattr(windows, name)
    raise AttributeError(f"module 'hpstore.tokens' has no attribute {name!r}")
