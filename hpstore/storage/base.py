"""Storage: the byte I/O of one store root, local or any fsspec URL.

Everything above this layer speaks in *keys* (``"data-ab12/train/image/c/0"``) relative to a root,
never in paths or URLs. A Storage reads whole objects or byte ranges and writes whole objects
atomically: a reader sees the old object, the new one, or none, never a torn write (``overwrite``
is the one exception, for objects no reader looks at yet).

This module holds the contract (``Storage``), ``Range``, the stats and prefixed views. The backends
live beside it (``local``, ``fsspec``), and ``open.open_storage`` builds the stack for a URL.

Cross-cutting behaviour (latency injection, retries, counting) is added by wrappers that are
themselves Storages (see ``hpstore.storage.wrappers``); ``open_storage`` builds the stack in one place.
Every backend counts what it does in ``stats``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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
    """Of ``bytes_written``, those that bypassed the page cache (``hpstore.storage.direct_io``)."""
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


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a backend can do beyond the contract's defaults. Declared by each backend and passed
    through by every wrapper, so callers choose a strategy from these flags, never by looking at
    which methods a class overrides (a wrapper would hide the override)."""

    concurrent_ranges: bool = False
    """``read_ranges`` keeps many requests in flight itself (else callers add their own threads)."""
    move_prefix: bool = False
    """``move_prefix`` can move a whole prefix in one cheap step (a directory rename)."""
    overwrite_in_place: bool = False
    """``overwrite`` rewrites an existing object's blocks instead of writing a new object."""


class ObjectSink:
    """One object written in pieces: ``write`` each piece in order, then ``commit`` (the object
    appears, atomically) or ``abort`` (nothing appears). This base keeps the pieces in memory and
    commits them with one ``Storage.write``; ``size`` counts the bytes written so far."""

    def __init__(self, storage: Storage, key: str, *, durable: bool = True) -> None:
        self.storage = storage
        self.key = check_key(key)
        self.durable = durable
        self.size = 0
        self._pieces: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self._pieces.append(data)
        self.size += len(data)

    def commit(self) -> None:
        pieces, self._pieces = self._pieces, []
        self.storage.write(self.key, b"".join(pieces), durable=self.durable)

    def abort(self) -> None:
        self._pieces = []


class Storage(ABC):
    """Byte I/O under one root. Implementations must be safe to call from many threads."""

    url: str
    stats: StorageStats
    capabilities: Capabilities = Capabilities()

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

    def view_range(self, key: str, start: int, end: int) -> memoryview | None:
        """Bytes ``[start, end)`` as a read-only view of the object's memory mapping, without a
        copy, or ``None`` when this backend does not map objects (the caller then reads). Only the
        local backend maps; wrappers return ``None`` so whatever they add (faults, latency,
        retries) still sees every read."""
        return None

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

    def open_sink(self, key: str, *, durable: bool = True) -> ObjectSink:
        """An object written piece by piece (``ObjectSink``), atomic like ``write``: it appears
        whole at ``commit`` or not at all. Backends override this to stream the pieces out (local
        files: a temp file renamed at commit), so a writer holds one piece, not the object; this
        default gathers the pieces and makes one ``write`` at commit."""
        return ObjectSink(self, key, durable=durable)

    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if no object ``key`` exists: True if this call created it, False
        (writing nothing) if one was there. Backends make this atomic where they can (local files:
        an exclusive link; S3: a conditional PUT, ``If-None-Match: *``); this default checks and
        then writes, which two writers can race, so a caller that relies on exclusivity reads the
        object back to learn whose it is (``hpstore.format.commit.WriterLock`` does)."""
        if self.exists(key):
            return False
        self.write(key, data)
        return True

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

    def is_scratch(self, key: str) -> bool:
        """Whether a listed ``key`` is this backend's own scratch (a write in flight, or one a killed
        process left: a local temp file before its rename), not an object anyone wrote. Listings
        show scratch, so that garbage collection can remove it with what holds it; the commit
        protocol never counts it as someone else's data."""
        return False

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def child(self, prefix: str) -> Storage:
        """A Storage rooted at ``prefix`` inside this one, sharing backend and counters."""
        return PrefixStorage(self, prefix)


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

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}"

    def is_scratch(self, key: str) -> bool:
        return self.inner.is_scratch(self._k(key))

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

    def view_range(self, key: str, start: int, end: int) -> memoryview | None:
        return self.inner.view_range(self._k(key), start, end)

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        self.inner.write(self._k(key), data, durable=durable)

    def open_sink(self, key: str, *, durable: bool = True) -> ObjectSink:
        return self.inner.open_sink(self._k(key), durable=durable)

    def overwrite(self, key: str, data: bytes | memoryview) -> None:
        self.inner.overwrite(self._k(key), data)

    def create(self, key: str, data: bytes) -> bool:
        return self.inner.create(self._k(key), data)

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
