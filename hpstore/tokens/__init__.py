"""Token streams: tokenizers and windows of a token field (see README.md)."""

from hpstore.tokens.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype
from hpstore.tokens.windows import LOSS_MASK, TokenWindows, pack_documents

__all__ = [
    "LOSS_MASK",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenWindows",
    "load_tokenizer",
    "pack_documents",
    "token_dtype",
]
