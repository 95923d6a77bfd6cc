"""The commit protocol every hpstore writer keeps: what is ours, when it is committed, what may go.

A root written by hpstore (a dataset store, or one checkpoint's prefix) holds::

    manifest.json        the committed state: written last, in one atomic write
    <generation>/...     the objects of one write, under a name no other write uses
    writer.lock          while a writer is at work: who it is (not part of the committed state)

The rules, enforced here and nowhere else:

1. **Objects first, manifest last.** Nothing is visible until ``commit_manifest`` lands.
2. **Ownership is proved by name, never guessed.** A top-level prefix is one of our generations
   only if its name matches the writer's ``GenerationNaming`` exactly (``data-20260102T030405-1a2b3c4d``
   for datasets); ``data-mnist/`` or ``data-raw/`` are someone else's and are never touched.
3. **Garbage is what we wrote and nobody references.** ``collect_garbage`` deletes only owned
   generations that the committed manifest does not reference (leftovers of killed or superseded
   writes). A manifest may reference objects of several generations (a dataset append reuses the
   shards of the generations before it): ``referenced_generations`` of its object keys are all kept.
4. **A manifest that is not ours is never replaced.** ``check_destination`` refuses a root whose
   ``manifest.json`` does not parse as the expected format, whatever ``overwrite`` says, and a root
   without a manifest that holds anything we cannot prove we wrote.
5. **One writer at a time.** ``WriterLock`` is created exclusively (``Storage.create``: ``O_EXCL``-style
   link locally, ``If-None-Match: *`` on S3) before a writer writes anything, and deleted only by its
   owner. Two writers collecting each other's generations would leave no readable store; the lock
   makes the second one fail at once. A writer killed with SIGKILL leaves its lock behind: the next
   writer's error names it, and ``break_lock=True`` (``--break-lock``) removes it.

Format-specific parts (what a manifest looks like) come in as a ``parse`` function, so datasets
(``hpstore.format.manifest``) and checkpoints (``hpstore.checkpoint.manifest``) share this code.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from hpstore.errors import (
    ForeignDataError,
    HpstoreError,
    InputError,
    ManifestError,
    ObjectNotFoundError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from hpstore.storage.base import Storage, check_key

log = logging.getLogger(__name__)

MANIFEST_KEY = "manifest.json"
LOCK_KEY = "writer.lock"
LOCK_FORMAT = "hpstore-writer-lock"

M = TypeVar("M")
Parse = Callable[[bytes, str], M]
"""``parse(text, where)``: the manifest, or an ``HpstoreError`` naming ``where``."""


@dataclass(frozen=True, kw_only=True)
class GenerationNaming:
    """How one kind of writer names its generations, as a strict pattern.

    ``stamped``: ``<prefix>-<UTC YYYYmmddTHHMMSS>-<hex>`` (datasets: sorts by age, readable in a
    listing); otherwise ``<prefix>-<hex>`` (checkpoints). ``hex_digits`` random hex digits follow.
    ``readable_hex``: the range of hex digits a *manifest* may name (``readable``), wider than what
    this writer produces so that manifests of earlier writers still load; ownership (``owns``,
    hence garbage collection) stays the exact pattern.
    """

    prefix: str = "data"
    stamped: bool = True
    hex_digits: int = 8
    readable_hex: tuple[int, int] | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        return self._pattern(str(self.hex_digits))

    def _pattern(self, digits: str) -> re.Pattern[str]:
        stamp = r"\d{8}T\d{6}-" if self.stamped else ""
        return re.compile(rf"^{re.escape(self.prefix)}-{stamp}[0-9a-f]{{{digits}}}$")

    def new(self) -> str:
        rand = uuid.uuid4().hex[: self.hex_digits]
        if not self.stamped:
            return f"{self.prefix}-{rand}"
        return f"{self.prefix}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%dT%H%M%S')}-{rand}"

    def owns(self, name: str) -> bool:
        """True only for a name this naming produces (never a prefix match: ``data-raw`` is not ours)."""
        return self.pattern.fullmatch(name) is not None

    def readable(self, name: str) -> bool:
        """A name a manifest may reference as its generation: ours, or one of ``readable_hex``."""
        if self.owns(name):
            return True
        if self.readable_hex is None:
            return False
        lo, hi = self.readable_hex
        return self._pattern(f"{lo},{hi}").fullmatch(name) is not None


STORE_GENERATIONS = GenerationNaming(stamped=True, hex_digits=8)
"""Dataset stores (``hpstore.format.writer``)."""
CHECKPOINT_GENERATIONS = GenerationNaming(stamped=False, hex_digits=12, readable_hex=(8, 32))
"""Checkpoints: ``data-<12 hex>`` under each ``step-<n>/`` (``hpstore.checkpoint.writer``). A
manifest may name 8 to 32 hex digits (what checkpoint manifests have always been validated
against); only the 12 the writer produces are ever collected as garbage."""


def safe_key(key: str, where: str, error: type[HpstoreError] = ManifestError) -> str:
    """``key`` if it stays inside the root (relative, no ``..``/empty segments); else ``error``
    (the format's own manifest error) naming ``where``: a manifest's keys are checked with this
    before anything is read or deleted by them."""
    try:
        return check_key(key)
    except InputError as exc:
        raise error(f"{where}: {exc}") from None


def read_manifest(storage: Storage, parse: Parse[M], *, key: str = MANIFEST_KEY) -> M:
    """The committed manifest under ``storage``; ``StoreNotFoundError`` if there is none."""
    try:
        text = storage.read(key)
    except ObjectNotFoundError:
        raise StoreNotFoundError(f"{storage.url}: no committed store here (no {key})") from None
    return parse(text, f"{storage.url}/{key}")


def commit_manifest(storage: Storage, data: bytes, *, key: str = MANIFEST_KEY) -> None:
    """Make ``data`` the committed state: one atomic, durable object write, after every object."""
    storage.write(key, data)


def top_level(storage: Storage) -> tuple[set[str], set[str]]:
    """The root's top-level names: (prefixes that hold objects, plain objects)."""
    prefixes: set[str] = set()
    plain: set[str] = set()
    for key in storage.list():
        head, sep, _ = key.partition("/")
        (prefixes if sep else plain).add(head)
    return prefixes, plain


def check_destination(
    storage: Storage, naming: GenerationNaming, parse: Parse[Any], *, overwrite: bool
) -> None:
    """Refuse a root a writer may not write into (rule 4).

    - a ``manifest.json`` that does not parse as ours: ``ForeignDataError``, even with ``overwrite``;
    - our manifest without ``overwrite``: ``StoreExistsError``;
    - no manifest, but objects we cannot prove we wrote: ``ForeignDataError``.
    """
    try:
        read_manifest(storage, parse)
    except StoreNotFoundError:
        pass
    except HpstoreError as exc:
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise  # an I/O failure says nothing about whose the manifest is
        raise ForeignDataError(
            f"{storage.url}/{MANIFEST_KEY} is not a manifest this version of hpstore wrote "
            f"({_reason(exc)}); refusing to replace it, even with --overwrite: choose another destination"
        ) from None
    else:
        if not overwrite:
            raise StoreExistsError(
                f"{storage.url}: a store already exists here (use --overwrite to replace it)"
            )
        return
    prefixes, plain = top_level(storage)
    foreign = sorted(
        {p + "/" for p in prefixes if not naming.owns(p)}
        | {k for k in plain if k != LOCK_KEY and not storage.is_scratch(k)}
    )
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        raise ForeignDataError(
            f"{storage.url}: is not empty and is not a store (holds {', '.join(foreign[:3])}{more}); "
            "choose a new or empty destination"
        )


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.rsplit(": ", 1)[-1] if ": " in text else text


def referenced_generations(keys: Iterable[str]) -> set[str]:
    """The top-level prefixes (generations) of ``keys``: what a manifest listing them references."""
    return {k.partition("/")[0] for k in keys if "/" in k}


def collect_garbage(storage: Storage, naming: GenerationNaming, *, keep: Collection[str]) -> list[str]:
    """Delete our generations (rule 2) that are not in ``keep`` (rule 3), and the backend's scratch
    of the protocol's own objects (a manifest or lock write killed before its rename); returns
    their names.

    ``keep`` must hold every generation the committed manifest references (its own and
    ``referenced_generations`` of its objects), read *after* the commit."""
    prefixes, plain = top_level(storage)
    gone = sorted(p for p in prefixes if naming.owns(p) and p not in keep)
    scratch = sorted(
        k for k in plain if k.startswith((f"{MANIFEST_KEY}.", f"{LOCK_KEY}.")) and storage.is_scratch(k)
    )
    for name in gone + scratch:
        storage.delete_prefix(name)
    return gone + scratch


class WriterLock:
    """The one-writer rule (rule 5): an object created exclusively, deleted only by its owner.

    The lock holds JSON naming its owner (a random token, host, pid, start time, tool). ``acquire``
    reads the object back after creating it, so a backend whose create is only check-then-write, or
    a retried create whose first attempt had landed, still ends with exactly one owner. There is no
    expiry: a lease that times out would let a slow writer and a new one collect each other's
    generations. A writer that was killed leaves the lock behind; ``break_lock=True`` removes it
    (only do so when that writer is gone: the error says which process it was).
    """

    def __init__(self, storage: Storage, token: str, key: str = LOCK_KEY) -> None:
        self.storage = storage
        self.token = token
        self.key = key
        self.held = True

    @classmethod
    def acquire(
        cls, storage: Storage, *, tool: str, break_lock: bool = False, key: str = LOCK_KEY
    ) -> WriterLock:
        token = uuid.uuid4().hex
        body = json.dumps(
            {
                "format": LOCK_FORMAT,
                "token": token,
                "tool": tool,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
        ).encode()
        if break_lock:
            storage.delete_prefix(key)
        storage.create(key, body)
        holder = _read_lock(storage, key)
        if holder.get("token") == token:
            return cls(storage, token, key)
        raise StoreLockedError(_locked_message(storage, key, holder))

    def release(self) -> None:
        """Delete the lock if it is still ours (someone may have broken and retaken it)."""
        if not self.held:
            return
        self.held = False
        try:
            if _read_lock(self.storage, self.key).get("token") == self.token:
                self.storage.delete_prefix(self.key)
        except (HpstoreError, OSError) as exc:  # the commit stands; only the next writer is blocked
            log.warning("%s/%s: could not remove the writer lock: %s", self.storage.url, self.key, exc)

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_lock(storage: Storage, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(storage.read(key))
    except ObjectNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}
    return doc if isinstance(doc, dict) and doc.get("format") == LOCK_FORMAT else {"unreadable": True}


def _locked_message(storage: Storage, key: str, holder: dict[str, Any]) -> str:
    where = f"{storage.url}/{key}"
    if not holder:  # created and gone again before we read it: another writer came and went
        return f"{where}: another writer was taking the lock at the same moment; try again"
    if holder.get("unreadable"):
        who = "an unknown writer"
    else:
        who = f"{holder.get('tool')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"
        if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
            who += f"; no process {holder.get('pid')} runs on this host now, so it was killed"
    return (
        f"{where}: another writer holds this store: {who}; one writer at a time. "
        "If that writer is gone, run again with --break-lock"
    )


def _pid_alive(pid: Any) -> bool:
    if type(pid) is not int or pid <= 0:
        return True  # unknown: do not claim it is dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
