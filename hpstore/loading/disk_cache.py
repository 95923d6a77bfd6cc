"""DiskCache: fetched chunk bytes kept on local disk under a byte budget, for stores on S3.

One file per cached object, named ``hpc-<sha1>.chunk`` in ``directory``. Each file is the object's
bytes followed by a 16-byte trailer (magic, crc32c, length), so a reader can tell a good file from a
torn, truncated or bit-flipped one without trusting anything else: a file whose length or checksum is
wrong is deleted and counted (``corrupt``), and the bytes are fetched again. (Decoded chunks are
checked once more above, against the store's own checksums.)

Safe for several processes sharing one directory, with no shared mutable index that could tear:

- a file appears only whole: it is written to a private temporary name and renamed into place
  (``os.replace`` is atomic), so readers never see a partial file;
- each process keeps its own in-memory index, rebuilt from the directory on start (so a restart
  reuses what is there) and refreshed when its accounting says the budget is reached, so files
  written by others count against the budget;
- eviction is ``unlink``; a file evicted by another process between "exists" and "open" is simply a
  miss, and a file being read when it is unlinked stays readable to that reader (POSIX).

With several processes the budget can be exceeded briefly (each sees the others' writes at its next
rescan); it is respected again after the next eviction pass.

Eviction is decided by a ``hpstore.loading.cache.Policy`` over file names: the loader mirrors its RAM cache's
plan into a ``FurthestUsePolicy`` (``ChunkDiskCache.follow``), so the disk evicts the chunk needed
furthest in the future and does not admit one needed later than everything it holds, exactly like
the RAM cache. Without a plan, ``LruPolicy`` is the default.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from hpstore.checksum import crc32c
from hpstore.counters import Counters
from hpstore.errors import InputError
from hpstore.loading.cache import FurthestUsePolicy, LruPolicy, Policy
from hpstore.storage.base import Range

MAGIC = b"HPC1"
TRAILER = struct.Struct("<4sIQ")  # magic, crc32c of the payload, payload length
PREFIX, SUFFIX = "hpc-", ".chunk"
STALE_TEMP_SECONDS = 600.0
"""A temporary file older than this belongs to a process that died mid-write: removed on rescan."""
RESCAN_SECONDS = 1.0
"""At most one directory rescan per this interval when the budget is reached."""


@dataclass
class DiskCacheStats(Counters):
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evictions: int = 0
    bypassed: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    resident_bytes: int = 0
    rescans: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def file_name(identity: str) -> str:
    """The cache file name of an object identified by ``identity`` (any stable string)."""
    return f"{PREFIX}{hashlib.sha1(identity.encode()).hexdigest()}{SUFFIX}"


class DiskCache:
    """Byte blobs by file name in ``directory``, at most ``budget_bytes`` of them on disk."""

    def __init__(self, directory: str, budget_bytes: int, *, policy: Policy | None = None) -> None:
        if budget_bytes < 0:
            raise InputError(f"disk cache budget must be >= 0 bytes, got {budget_bytes}")
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cache directory {self.directory}: {exc.strerror or exc}") from None
        self.budget_bytes = budget_bytes
        self.policy = policy if policy is not None else LruPolicy()
        self.stats = DiskCacheStats()
        self._index: dict[str, int] = {}  # file name -> bytes on disk, as this process knows it
        self._writing: set[str] = set()  # reserved in the index, file not renamed into place yet
        self._lock = threading.Lock()
        self._last_scan = 0.0
        with self._lock:
            self._rescan()

    # -- the plan (for plan-aware policies) --------------------------------------------------------

    def plan(self, future: Sequence[Hashable]) -> None:
        with self._lock:
            self.policy.plan(future)

    def access(self, name: str, pos: int | None) -> None:
        with self._lock:
            self.policy.access(name, pos)

    # -- reads and writes --------------------------------------------------------------------------

    def get(self, name: str, size: int) -> bytes | None:
        """The cached ``size`` bytes of ``name``, verified; ``None`` when absent or corrupt."""
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            with self._lock:
                if name not in self._writing:
                    self._forget(name)  # evicted by another process
            return None
        if not _valid(blob, size):
            self.stats.add(corrupt=1)
            with self._lock:
                self._delete(name)
            return None
        with self._lock:
            if name not in self._index:  # written by another process: count it from now on
                self._index[name] = len(blob)
                self.policy.insert(name)
                self.stats.add(resident_bytes=len(blob))
        self.stats.add(read_bytes=size)
        return blob[:size]

    def put(self, name: str, data: bytes | memoryview) -> bool:
        """Keep ``data`` under ``name`` if the policy finds room for it; ``True`` when kept."""
        total = len(data) + TRAILER.size
        with self._lock:
            if name in self._index:
                return True
            if not self._make_room(name, total):
                self.stats.add(bypassed=1)
                return False
            self._index[name] = total  # reserve before writing, so concurrent puts see it
            self._writing.add(name)
            self.policy.insert(name)
            self.stats.add(resident_bytes=total)
        written = self._write(name, data)
        with self._lock:
            self._writing.discard(name)
            if not written:
                self._forget(name)
        if written:
            self.stats.add(written_bytes=total)
        return written

    def get_many(
        self,
        names: Sequence[str],
        sizes: Sequence[int],
        fetch: Callable[[list[int]], Sequence[bytes | memoryview]],
    ) -> list[bytes | memoryview]:
        """The bytes of every name: cached ones from disk, the others from ``fetch(indices)`` in one
        call (so the caller can coalesce and parallelise those reads), then kept if there is room."""
        out: list[bytes | memoryview | None] = [self.get(n, s) for n, s in zip(names, sizes, strict=True)]
        missing = [i for i, b in enumerate(out) if b is None]
        self.stats.add(hits=len(out) - len(missing), misses=len(missing))
        if missing:
            fetched = fetch(missing)
            for i, data in zip(missing, fetched, strict=True):
                out[i] = data
                self.put(names[i], data)
        return [b for b in out if b is not None]

    # -- internals (callers hold self._lock unless noted) --------------------------------------------

    def _make_room(self, name: str, size: int) -> bool:
        if size > self.budget_bytes:
            return False
        if (
            self.stats.resident_bytes + size > self.budget_bytes
            and time.monotonic() - self._last_scan > RESCAN_SECONDS
        ):
            self._rescan()  # others may have added or removed files since we last looked
        while self.stats.resident_bytes + size > self.budget_bytes:
            victim = self.policy.victim()
            if victim is None or not self.policy.keeps(name, victim):
                return False
            self._delete(str(victim))
            self.stats.add(evictions=1)
        return True

    def _delete(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass  # evicted by another process first
        self._forget(name)

    def _forget(self, name: str) -> None:
        size = self._index.pop(name, None)
        if size is not None:
            self.policy.remove(name)
            self.stats.add(resident_bytes=-size)

    def _rescan(self) -> None:
        """Rebuild the index from the directory (what survives a restart, what others wrote)."""
        found: dict[str, int] = {}
        now = time.time()
        with os.scandir(self.directory) as entries:
            for e in entries:
                try:
                    if e.name.startswith(PREFIX) and e.name.endswith(SUFFIX):
                        found[e.name] = e.stat().st_size
                    elif e.name.startswith(f".{PREFIX}") and now - e.stat().st_mtime > STALE_TEMP_SECONDS:
                        os.unlink(e.path)
                except FileNotFoundError:
                    continue  # removed while we looked
        for name in [n for n in self._index if n not in found]:
            self._forget(name)
        for name, size in found.items():
            if name not in self._index:
                self._index[name] = size
                self.policy.insert(name)
                self.stats.add(resident_bytes=size)
        self._last_scan = time.monotonic()
        self.stats.add(rescans=1)

    def _write(self, name: str, data: bytes | memoryview) -> bool:
        """Write ``data`` + trailer under a private name and rename it into place (no lock held)."""
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(TRAILER.pack(MAGIC, crc32c(data), len(data)))
            os.replace(tmp, final)
            return True
        except OSError:  # a full or vanished cache disk must not fail the read: skip caching
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False


def _valid(blob: bytes, size: int) -> bool:
    if len(blob) != size + TRAILER.size:
        return False
    magic, crc, length = TRAILER.unpack_from(blob, size)
    return magic == MAGIC and length == size and crc == crc32c(memoryview(blob)[:size])


class ChunkDiskCache:
    """The loader's disk tier: raw chunk bytes of one store by ``(field, chunk)``, evicted with the
    RAM cache's plan. Files are named after the store URL, the field's path (which contains the
    store generation, so a re-ingested store never reuses stale files) and the chunk number."""

    def __init__(self, url: str, field_paths: dict[str, str], directory: str, budget_bytes: int) -> None:
        self.url = url
        self.field_paths = field_paths
        self.cache = DiskCache(directory, budget_bytes, policy=FurthestUsePolicy())
        self._names: dict[tuple[str, int], str] = {}

    @property
    def stats(self) -> DiskCacheStats:
        return self.cache.stats

    def name(self, key: Any) -> str:
        name = self._names.get(key)
        if name is None:
            field_name, chunk = key
            name = file_name(f"{self.url}\0{self.field_paths[field_name]}\0{int(chunk)}")
            self._names[key] = name
        return name

    def follow(self, policy: Policy) -> Policy:
        """``policy`` (the RAM cache's), also telling this cache every plan and access."""
        return _Mirror(policy, self)

    def fetch(
        self,
        keys: Sequence[Any],
        ranges: Sequence[Range],
        fetch: Callable[[list[Range]], Sequence[bytes | memoryview]],
    ) -> list[bytes | memoryview]:
        """Raw bytes of ``keys`` (one range each): from disk when verified, else via ``fetch``."""
        names = [self.name(k) for k in keys]
        sizes = [e - s for _, s, e in ranges]
        return self.cache.get_many(names, sizes, lambda idx: fetch([ranges[i] for i in idx]))


class _Mirror(Policy):
    """A RAM-cache policy that forwards the plan and every access to the disk cache's policy."""

    def __init__(self, inner: Policy, disk: ChunkDiskCache) -> None:
        self.inner = inner
        self.disk = disk

    def plan(self, future: Sequence[Hashable]) -> None:
        self.inner.plan(future)
        self.disk.cache.plan([self.disk.name(k) for k in future])

    def access(self, key: Hashable, pos: int | None) -> None:
        self.inner.access(key, pos)
        self.disk.cache.access(self.disk.name(key), pos)

    def insert(self, key: Hashable) -> None:
        self.inner.insert(key)

    def remove(self, key: Hashable) -> None:
        self.inner.remove(key)

    def victim(self) -> Hashable | None:
        return self.inner.victim()

    def keeps(self, key: Hashable, victim: Hashable) -> bool:
        return self.inner.keeps(key, victim)
