"""hpstore: out-of-core chunked stores and a streaming loader for training neural networks."""

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

__all__ = [
    "CheckpointError",
    "CorruptObjectError",
    "Dataset",
    "FieldInfo",
    "HpstoreError",
    "InputError",
    "ManifestError",
    "ObjectNotFoundError",
    "StorageError",
    "Store",
    "StoreExistsError",
    "StoreNotFoundError",
    "open",
]
