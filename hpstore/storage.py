"""Storage: the byte I/O of one store root, local or any fsspec URL.

Everything above this layer speaks in *keys* (``"data-ab12/train/image/c/0"``) relative to a root,
never in paths or URLs. A Storage reads whole objects or byte ranges and writes whole objects
atomically: a reader sees the old object, the new one, or none, never a torn write (``overwrite``
is the one exception, for objects no reader looks at yet).

This module holds the contract (``Storage``), the local backend (``LocalStorage``), prefixed views
and ``open_storage``; remote URLs are served by ``hpstore.fsspec_storage``.

Cross-cutting behaviour (latency injection, retries, counting) is added by wrappers that are
themselves Storages (see ``hpstore.wrappers``); ``open_storage`` builds the stack in one place.
Every backend counts what it does in ``stats``.
"""

from __future__ import annotations

import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpstore import direct_io
from hpstore.counters import Counters
from hpstore.errors import InputError, ObjectNotFoundError, StorageError

Range = tuple[str, int, int]
"""``(key, start, end)``: bytes ``[start, end)`` of object ``key``."""


@dataclass
class StorageStats(Counters):
    """Counters of one storage stack. Reads and writes are counted where bytes move (successful
    requests only); ``errors`` counts failed requests, ``retries`` the requests repeated after a
    transient failure, ``failures`` the operations given up after the retry bound."""

    bytes_read: int = 0
    read_requests: int = 0
    bytes_written: int = 0
    write_requests: int = 0
    bytes_written_direct: int = 0
    """Of ``bytes_written``, those that bypassed the page cache (``hpstore.direct_io``)."""
    retries: int = 0
    failures: int = 0
    errors: int = 0
    retry_wait_seconds: float = 0.0
    read_seconds: float = 0.0
    write_seconds: float = 0.0


def check_key(key: str) -> str:
    """Reject keys that could escape the store root or alias another key."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InputError(f"unsafe object key {key!r}: keys are relative, '/'-separated paths")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"unsafe object key {key!r}: no empty, '.' or '..' segments")
    return key


class Storage(ABC):
    """Byte I/O under one root. Implementations must be safe to call from many threads."""

    url: str
    stats: StorageStats

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; ``ObjectNotFoundError`` when it does not exist."""

    def read_into(self, key: str, out: memoryview) -> int:
        """Read the whole object into the start of ``out`` (a writable byte buffer at least as
        large) and return its size. Backends override this to skip the intermediate ``bytes``."""
        data = self.read(key)
        if len(data) > len(out):
            raise StorageError(f"{self.url}/{key}: object has {len(data)} bytes, buffer only {len(out)}")
        out[: len(data)] = data
        return len(data)

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; a short result (object smaller than ``end``) raises."""

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        """Many ranges, in order. Backends override this to keep many requests in flight."""
        return [self.read_range(k, s, e) for k, s, e in ranges]

    def read_ranges_each(self, ranges: Sequence[Range]) -> list[bytes | BaseException]:
        """Like ``read_ranges``, but a range that fails gives its exception in its place while the
        others still arrive, so a retry can repeat just the failed requests."""
        out: list[bytes | BaseException] = []
        for k, s, e in ranges:
            try:
                out.append(self.read_range(k, s, e))
            except Exception as exc:
                out.append(exc)
        return out

    @abstractmethod
    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Write a whole object atomically (replace if it exists).

        ``durable=False`` lets a local backend leave the bytes in the OS cache until ``sync()``:
        for many objects that one later durable write (a manifest) commits together. A killed
        process loses nothing either way; only a power loss before ``sync()`` could.
        """

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        """Write a whole object the cheapest way, *not* atomically: until ``sync()`` a reader may
        see it torn. Only for objects no reader looks at yet (a generation before its manifest).
        Local files are rewritten in place, reusing the file and its blocks; the default is a
        ``durable=False`` write."""
        self.write(key, data, durable=False)

    def move_prefix(self, src: str, dst: str) -> bool:
        """Move every object under ``src`` to the same key under ``dst`` in one cheap step (a
        directory rename) if this backend can and ``dst`` is free. False, having moved nothing,
        when it cannot (object stores: a move is a copy)."""
        return False

    def sync(self) -> None:  # noqa: B027 - a no-op is the right default (object stores)
        """Make every earlier ``durable=False`` write durable (object stores: nothing to do)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Object size in bytes; ``ObjectNotFoundError`` when it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` (recursive), as key -> size. Missing prefix: empty."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (a directory-like prefix or a single key)."""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def child(self, prefix: str) -> Storage:
        """A Storage rooted at ``prefix`` inside this one, sharing backend and counters."""
        return PrefixStorage(self, prefix)


class LocalStorage(Storage):
    """A directory on a local file system. Reads use ``pread``; writes go through a temp file."""

    direct = True
    """Write large aligned payloads with ``O_DIRECT`` (``hpstore.direct_io``); turned off for
    this storage the first time the file system refuses it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        self.stats = StorageStats()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def read(self, key: str) -> bytes:
        t0 = time.perf_counter()
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        self.stats.add(bytes_read=len(data), read_requests=1, read_seconds=time.perf_counter() - t0)
        return data

    def read_into(self, key: str, out: memoryview) -> int:
        t0 = time.perf_counter()
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > len(out):
                    raise StorageError(f"{self.url}/{key}: object has {size} bytes, buffer only {len(out)}")
                done = 0
                while done < size:  # one read per call is capped (2 GiB on Linux)
                    n = f.readinto(out[done:size])
                    if not n:
                        raise StorageError(f"{self.url}/{key}: short read ({done} of {size} bytes)")
                    done += n
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        self.stats.add(bytes_read=size, read_requests=1, read_seconds=time.perf_counter() - t0)
        return size

    def read_range(self, key: str, start: int, end: int) -> bytes:
        t0 = time.perf_counter()
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None
        try:
            data = os.pread(fd, end - start, start)
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        if len(data) != end - start:
            raise StorageError(
                f"{self.url}/{key}: short read ({len(data)} of {end - start} bytes at {start})"
            )
        self.stats.add(bytes_read=len(data), read_requests=1, read_seconds=time.perf_counter() - t0)
        return data

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        t0 = time.perf_counter()
        path = self._path(key)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            direct = self._put(tmp, data, new=True)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"{self.url}/{key}: cannot write: {exc.strerror or exc}") from exc
        self._count_write(len(data), direct, t0)

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        t0 = time.perf_counter()
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            direct = self._put(path, data, new=False)
        except OSError as exc:
            raise StorageError(f"{self.url}/{key}: cannot write: {exc.strerror or exc}") from exc
        self._count_write(len(data), direct, t0)

    def _put(self, path: str, data: bytes | memoryview, *, new: bool) -> int:
        """Write the file (``direct_io.write``); returns the bytes that went ``O_DIRECT``."""
        try:
            return direct_io.write(path, data, new=new, direct=self.direct)
        except direct_io.DirectRefused:
            self.direct = False
            return direct_io.write(path, data, new=new, direct=False)

    def _count_write(self, nbytes: int, direct: int, t0: float) -> None:
        self.stats.add(
            bytes_written=nbytes,
            bytes_written_direct=direct,
            write_requests=1,
            write_seconds=time.perf_counter() - t0,
        )

    def move_prefix(self, src: str, dst: str) -> bool:
        s, d = self._path(src), self._path(dst)
        if not os.path.isdir(s) or os.path.lexists(d):
            return False
        try:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.rename(s, d)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot move {src} to {dst}: {exc.strerror or exc}") from exc
        return True

    def sync(self) -> None:
        """One ``syncfs`` of the file system holding the store: far cheaper than an fsync per
        object when a checkpoint writes hundreds of small files."""
        try:
            _syncfs(self.root)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot sync: {exc.strerror or exc}") from exc

    def size(self, key: str) -> int:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.url}/{key}: no such object") from None

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        if os.path.isfile(base):
            return {prefix: os.stat(base).st_size}
        out: dict[str, int] = {}
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                try:
                    out[key] = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:  # deleted while listing
                    continue
        return out

    def delete_prefix(self, prefix: str) -> None:
        import shutil

        path = self._path(prefix)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)


def raise_first(results: Sequence[bytes | BaseException]) -> list[bytes]:
    """``results`` as bytes, raising the first exception among them."""
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


class PrefixStorage(Storage):
    """A view of another Storage under a key prefix (shares its backend and counters)."""

    def __init__(self, inner: Storage, prefix: str) -> None:
        self.inner = inner
        self.prefix = check_key(prefix.strip("/"))
        self.url = f"{inner.url}/{self.prefix}"
        self.stats = inner.stats

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}"

    def read(self, key: str) -> bytes:
        return self.inner.read(self._k(key))

    def read_into(self, key: str, out: memoryview) -> int:
        return self.inner.read_into(self._k(key), out)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self.inner.read_range(self._k(key), start, end)

    def read_ranges(self, ranges: Sequence[Range]) -> list[bytes]:
        return self.inner.read_ranges([(self._k(k), s, e) for k, s, e in ranges])

    def read_ranges_each(self, ranges: Sequence[Range]) -> list[bytes | BaseException]:
        return self.inner.read_ranges_each([(self._k(k), s, e) for k, s, e in ranges])

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self.inner.write(self._k(key), data, durable=durable)

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        self.inner.overwrite(self._k(key), data)

    def move_prefix(self, src: str, dst: str) -> bool:
        return self.inner.move_prefix(self._k(src), self._k(dst))

    def sync(self) -> None:
        self.inner.sync()

    def size(self, key: str) -> int:
        return self.inner.size(self._k(key))

    def list(self, prefix: str = "") -> dict[str, int]:
        n = len(self.prefix) + 1
        found = self.inner.list(self._k(prefix) if prefix else self.prefix)
        return {k[n:]: v for k, v in found.items()}

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(self._k(prefix))


def _syncfs(path: str) -> None:
    """Flush the file system holding ``path`` (Linux ``syncfs``; ``os.sync`` elsewhere)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_storage(url: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage stack for a URL: the backend, wrapped for retries where the backend is remote."""
    if not url:
        raise InputError("empty store URL")
    if is_local(url):
        return LocalStorage(url.removeprefix("file://"))
    from hpstore.fsspec_storage import FsspecStorage
    from hpstore.wrappers import RetryingStorage

    return RetryingStorage(FsspecStorage(url, storage_options))
