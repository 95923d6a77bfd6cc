"""Store and Dataset: random access to a committed store.

``hpstore.open(url)`` reads and checks the manifest (version, safe keys, every listed object
present with its recorded size, nothing extra) and returns a ``Store``; ``store.split(name)`` gives a
``Dataset`` indexed by sample: ``ds[i]``, ``ds[i:j]``, ``ds[array]``. A batched read fetches each
needed chunk once, with all of its requests issued together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpstore.errors import IndexTypeError, InputError, InvalidIndexError
from hpstore.format.chunks import ChunkReader
from hpstore.format.manifest import (
    FieldSpec,
    Manifest,
    SplitSpec,
    check_listing,
    list_objects,
    read_manifest,
)
from hpstore.gather import gather
from hpstore.storage.base import Storage
from hpstore.storage.open import open_storage


@dataclass(frozen=True)
class FieldInfo:
    """What a user sees of a field: dtype and per-sample shape, or ``shape=None`` when variable."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    attrs: Mapping[str, Any]

    @property
    def variable(self) -> bool:
        return self.shape is None


class Store:
    """An opened, committed store."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self.url = storage.url

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    @property
    def stats(self) -> dict[str, float]:
        return self.storage.stats.as_dict()

    def split(self, name: str) -> Dataset:
        try:
            spec = self.manifest.splits[name]
        except KeyError:
            raise InputError(f"{self.url}: no split {name!r} (splits: {', '.join(self.splits)})") from None
        return Dataset(self, spec)

    def __repr__(self) -> str:
        return f"Store({self.url!r}, splits={self.splits})"


def open(url: str, *, storage_options: Mapping[str, Any] | None = None, check: bool = True) -> Store:
    """Open the committed store at ``url`` (a local path or an fsspec URL).

    ``check`` lists the store once and rejects missing, extra or wrongly sized objects.
    """
    storage = open_storage(url, storage_options)
    manifest = read_manifest(storage)
    if check:
        check_listing(manifest, list_objects(storage, manifest), storage.url)
    return Store(storage, manifest)


class Dataset:
    """One split of a store, indexed by sample."""

    def __init__(self, store: Store, spec: SplitSpec) -> None:
        self.store = store
        self.spec = spec
        self.name = spec.name
        self.reader = ChunkReader(store.storage, store.manifest, spec)

    def __len__(self) -> int:
        return self.spec.num_samples

    @property
    def fields(self) -> dict[str, FieldInfo]:
        return {name: _info(f) for name, f in self.spec.fields.items()}

    def field_names(self, fields: Sequence[str] | None) -> list[str]:
        names = list(self.spec.fields) if fields is None else list(fields)
        for name in names:
            self.reader.field(name)  # raises a clear error for unknown names
        return names

    def read(self, indices: Any, fields: Sequence[str] | None = None) -> dict[str, Any]:
        """Rows at ``indices`` (a 1-d sequence or array of ints, negative from the end, or a
        boolean mask of ``len(self)``), each needed chunk read once."""
        return self._read(row_indices(indices, len(self), self.name), fields)

    def _read(self, idx: np.ndarray, fields: Sequence[str] | None) -> dict[str, Any]:
        chunk_ids = np.unique(idx // self.spec.chunk_rows).tolist()
        out: dict[str, Any] = {}
        for name in self.field_names(fields):
            decoded = dict(zip(chunk_ids, self.reader.read(name, chunk_ids), strict=True))
            out[name] = gather(self.spec.fields[name], idx, self.spec.chunk_rows, decoded)
        return out

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> dict[str, Any]:
        """NumPy semantics along the sample axis: an int gives one row (values per field); a
        slice, an int array or a boolean mask give a batch (arrays / lists per field). Floats,
        strings, tuples and 2-d arrays are refused (``IndexTypeError`` / ``InvalidIndexError``)."""
        n = len(self)
        if isinstance(key, int | np.integer) and not isinstance(key, bool | np.bool_):
            row = self._read(np.array([_one_index(int(key), n, self.name)]), None)
            return {k: v[0] for k, v in row.items()}
        if isinstance(key, np.ndarray) and key.ndim == 0 and key.dtype.kind in "iu":
            return self[int(key)]
        if isinstance(key, slice):
            # Only the selected rows: a slice of a 10^9-row split costs what it reads.
            return self._read(np.arange(*key.indices(n), dtype=np.int64), None)
        if key is Ellipsis:
            return self[:]
        return self.read(key)

    def windows(self, field: str, seq_len: int, *, respect_documents: bool = False) -> Any:
        """Windows of ``seq_len + 1`` tokens of a token field, usable as a split
        (``hpstore.tokens.TokenWindows``)."""
        from hpstore.tokens.windows import TokenWindows

        return TokenWindows(self, field, seq_len, respect_documents=respect_documents)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}: {f.describe()}" for n, f in self.spec.fields.items())
        return f"Dataset({self.name!r}, {len(self)} samples, {{{fields}}})"


def row_indices(key: Any, n: int, split: str) -> np.ndarray:
    """``key`` as int64 row numbers in ``[0, n)``, by NumPy's rules for one axis: ints (negative
    count from the end) or a boolean mask of length ``n``; anything else is refused."""
    if isinstance(key, str | bytes | float | bool | np.bool_ | tuple | dict | set | slice) or key is None:
        raise IndexTypeError(
            f"split {split!r}: cannot index rows with {type(key).__name__} {key!r} "
            "(use an int, a slice, a 1-d array of ints or a boolean mask)"
        )
    try:
        arr = np.asarray(key)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InvalidIndexError(f"split {split!r}: index is not a 1-d array ({exc})") from None
    if arr.size == 0 and arr.ndim == 1:
        return np.empty(0, dtype=np.int64)  # [] is an empty int index in NumPy, whatever its dtype
    if arr.ndim != 1:
        raise InvalidIndexError(
            f"split {split!r}: index arrays must be 1-d, got shape {list(arr.shape)} (one row axis only)"
        )
    if arr.dtype.kind == "b":
        if len(arr) != n:
            raise InvalidIndexError(
                f"split {split!r}: boolean mask of length {len(arr)} for {n} samples (lengths must match)"
            )
        return np.flatnonzero(arr).astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise IndexTypeError(
            f"split {split!r}: index arrays must hold integers or booleans, got dtype {arr.dtype}"
        )
    if arr.dtype.kind == "u" and arr.max() >= n:
        raise InvalidIndexError(f"index {int(arr.max())} out of range for split {split!r} of {n} samples")
    idx = arr.astype(np.int64, copy=False)
    if idx.min() < -n or idx.max() >= n:
        bad = int(idx.min()) if idx.min() < -n else int(idx.max())
        raise InvalidIndexError(f"index {bad} out of range for split {split!r} of {n} samples")
    return np.where(idx < 0, idx + n, idx)


def _one_index(i: int, n: int, split: str) -> int:
    if not -n <= i < n:
        raise InvalidIndexError(f"index {i} out of range for split {split!r} of {n} samples")
    return i + n if i < 0 else i


def _info(f: FieldSpec) -> FieldInfo:
    if f.is_array:
        return FieldInfo(f.name, f.dtype or "", tuple(f.shape or ()), f.attrs)
    return FieldInfo(f.name, f.arrow_type or "", None, f.attrs)
