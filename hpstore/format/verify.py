"""Verify: re-read every object a manifest lists and check it against its recorded size and CRC32C.

Where ``hpstore.open`` checks only the listing (cheap: one LIST) and readers check the chunks they
touch, ``verify`` reads every byte of a store once and reports *every* problem, not the first:

- ``missing``: listed in the manifest, absent from the store;
- ``truncated`` / ``resized``: present, but shorter / longer than the manifest says;
- ``corrupt``: the right size, the wrong CRC32C;
- ``extra``: under the store's generation prefix but not in the manifest;
- ``unlisted``: a key the manifest's splits point at (a shard, an Arrow part, a ``zarr.json``) that
  its object table does not list, so no checksum protects it;
- ``unreadable``: the backend failed to return the object's bytes (after its retries).

Objects are streamed in ``block_bytes`` ranges by ``workers`` threads, so memory stays at
``workers * block_bytes`` whatever the object sizes; remote backends keep ``workers`` requests in
flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from hpstore.checksum import crc32c
from hpstore.errors import ObjectNotFoundError, StorageError
from hpstore.format.manifest import Manifest, ObjectEntry, list_objects, referenced_keys
from hpstore.storage.base import Storage

ProblemKind = Literal["missing", "truncated", "resized", "corrupt", "extra", "unlisted", "unreadable"]

BLOCK_BYTES = 8 << 20
"""Bytes per range request while streaming an object: large enough to run at disk/network speed."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    key: str
    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.key}: {self.detail}"


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What ``verify`` found. ``ok`` when ``problems`` is empty."""

    url: str
    generation: str
    problems: tuple[Problem, ...]
    objects: int  # objects listed in the manifest
    objects_read: int  # objects whose bytes were read and checksummed
    bytes_read: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (
            f"verify {self.url}: {state}; {self.objects_read} of {self.objects} objects read, "
            f"{self.bytes_read / 1e6:.1f} MB in {self.seconds:.2f} s ({self.mb_per_s:.0f} MB/s)"
        )


def verify(
    storage: Storage,
    manifest: Manifest,
    *,
    progress: Callable[[int], None] | None = None,
    workers: int = 4,
    block_bytes: int = BLOCK_BYTES,
) -> VerifyReport:
    """Check every object of ``manifest`` in ``storage``; ``progress(n)`` is called with each
    block's byte count as it is checked (from one thread at a time)."""
    t0 = time.perf_counter()
    listing = list_objects(storage, manifest)
    problems = [*_listing_problems(manifest, listing), *_unlisted(manifest)]
    to_read = sorted(k for k, o in manifest.objects.items() if k in listing and listing[k] == o.size)
    lock = threading.Lock()
    bytes_read = 0

    def report(n: int) -> None:
        nonlocal bytes_read
        with lock:
            bytes_read += n
            if progress is not None:
                progress(n)

    def check(key: str) -> Problem | None:
        return _check_object(storage, key, manifest.objects[key], block_bytes, report)

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="hpstore-verify") as pool:
        found = list(pool.map(check, to_read))
    problems.extend(p for p in found if p is not None)
    return VerifyReport(
        url=storage.url,
        generation=manifest.generation,
        problems=tuple(sorted(problems, key=lambda p: (p.key, p.kind))),
        objects=len(manifest.objects),
        objects_read=len(to_read),
        bytes_read=bytes_read,
        seconds=time.perf_counter() - t0,
    )


def _listing_problems(manifest: Manifest, listing: dict[str, int]) -> Iterator[Problem]:
    for key, entry in manifest.objects.items():
        size = listing.get(key)
        if size is None:
            yield Problem(key=key, kind="missing", detail="listed in the manifest, not in the store")
        elif size < entry.size:
            yield Problem(key=key, kind="truncated", detail=f"{size} bytes, manifest says {entry.size}")
        elif size > entry.size:
            yield Problem(key=key, kind="resized", detail=f"{size} bytes, manifest says {entry.size}")
    prefix = manifest.generation + "/"
    for key in listing:
        if key.startswith(prefix) and key not in manifest.objects:
            yield Problem(key=key, kind="extra", detail="in the store, not in the manifest")


def _unlisted(manifest: Manifest) -> Iterator[Problem]:
    for key in referenced_keys(manifest):
        if key not in manifest.objects:
            yield Problem(
                key=key, kind="unlisted", detail="used by a split but not in the manifest's objects"
            )


def _check_object(
    storage: Storage, key: str, entry: ObjectEntry, block_bytes: int, report: Callable[[int], None]
) -> Problem | None:
    """Stream one object and compare its CRC32C; a vanished or shrunken object is reported too."""
    value = 0
    try:
        for start in range(0, entry.size, block_bytes):
            block = storage.read_range(key, start, min(start + block_bytes, entry.size))
            value = crc32c(block, value)
            report(len(block))
    except ObjectNotFoundError:
        return Problem(key=key, kind="missing", detail="disappeared while being verified")
    except StorageError as exc:
        return Problem(key=key, kind="unreadable", detail=str(exc))
    got = f"{value:08x}"
    if got != entry.crc32c:
        return Problem(key=key, kind="corrupt", detail=f"crc32c {got}, manifest says {entry.crc32c}")
    return None
