"""One root exception type; each subclass also inherits the builtin it means.

Callers may catch ``HpstoreError`` for anything hpstore raises on purpose, or the builtin
(``FileNotFoundError``, ``ValueError``, ...) they would catch anyway.
"""

from __future__ import annotations


class HpstoreError(Exception):
    """Root of every error hpstore raises on purpose."""


class StoreNotFoundError(HpstoreError, FileNotFoundError):
    """The URL names no committed store (missing, or a store whose manifest was never written)."""


class ObjectNotFoundError(HpstoreError, FileNotFoundError):
    """An object the manifest lists (or a caller asked for) does not exist."""


class ManifestError(HpstoreError, ValueError):
    """A manifest that cannot be trusted: unknown version, malformed, unsafe keys, wrong listing."""


class CorruptObjectError(HpstoreError, ValueError):
    """An object whose bytes do not match its recorded size or checksum."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.key, self.problem))  # crosses to a loader's consumer process intact


class StoreExistsError(HpstoreError, FileExistsError):
    """A destination already holds a committed store and overwriting was not asked for."""


class StoreLockedError(HpstoreError, FileExistsError):
    """Another writer holds the destination's writer lock (``hpstore.format.commit.WriterLock``)."""


class ForeignDataError(HpstoreError, FileExistsError):
    """The destination holds data that is not provably this store's; hpstore never replaces it."""


class InputError(HpstoreError, ValueError):
    """Bad user input: a source file, a flag, a field or a shape that cannot be used."""


class InvalidIndexError(InputError, IndexError):
    """An index that selects no rows of a split: out of range, a mask of the wrong length, 2-D."""


class IndexTypeError(InputError, IndexError, TypeError):
    """A key whose type cannot select rows (a float, a string, None, a tuple). Also an
    ``IndexError``, which is what NumPy raises for such keys."""


class StorageError(HpstoreError, OSError):
    """An I/O failure from the storage backend that retries did not cure (or that is permanent)."""


class CheckpointError(HpstoreError, ValueError):
    """A checkpoint that cannot be loaded (missing, incomplete, corrupt) or saved."""
