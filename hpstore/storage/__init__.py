"""Bytes: keys to bytes under one root, local or remote, with wrappers for retries and latency.

Imports nothing from the layers above (format, loading, checkpoint). See README.md.
"""

from hpstore.storage.base import PrefixStorage, Range, Storage, StorageStats, check_key
from hpstore.storage.local import LocalStorage
from hpstore.storage.open import is_local, open_storage

__all__ = [
    "LocalStorage",
    "PrefixStorage",
    "Range",
    "Storage",
    "StorageStats",
    "check_key",
    "is_local",
    "open_storage",
]
