"""``open_storage``: the one place where a URL becomes a storage stack."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpstore.errors import InputError
from hpstore.storage.base import Storage
from hpstore.storage.local import LocalStorage


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_storage(url: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage stack for a URL: the backend, wrapped for retries where the backend is remote."""
    if not url:
        raise InputError("empty store URL")
    if is_local(url):
        return LocalStorage(url.removeprefix("file://"))
    from hpstore.storage.fsspec import FsspecStorage
    from hpstore.storage.wrappers import RetryingStorage

    return RetryingStorage(FsspecStorage(url, storage_options))
