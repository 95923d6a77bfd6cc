"""hpstore: out-of-core chunked stores and a streaming loader for training neural networks."""

from typing import TYPE_CHECKING, Any

from hpstore.dataset import Dataset, FieldInfo, Store, open
from hpstore.errors import (
    CheckpointError,
    CorruptObjectError,
    HpstoreError,
    InputError,
    ManifestError,
    ObjectNotFoundError,
    StorageError,
    StoreExistsError,
    StoreNotFoundError,
)
from hpstore.loading.options import LoaderOptions

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "CorruptObjectError",
    "Dataset",
    "FieldInfo",
    "HpstoreError",
    "InputError",
    "Loader",
    "LoaderOptions",
    "ManifestError",
    "ObjectNotFoundError",
    "StorageError",
    "Store",
    "StoreExistsError",
    "StoreNotFoundError",
    "open",
]

if TYPE_CHECKING:
    from hpstore.checkpoint.checkpointer import Checkpointer
    from hpstore.loading.loader import Loader


def __getattr__(name: str) -> Any:
    # Imported on first use: it needs torch, which tools that only read or write stores do not.
    if name == "Checkpointer":
        from hpstore.checkpoint.checkpointer import Checkpointer

        return Checkpointer
    if name == "images":
        import hpstore.images

        return hpstore.images
    if name == "Loader":
        from hpstore.loading.loader import Loader

        return Loader
    raise AttributeError(f"module 'hpstore' has no attribute {name!r}")
