"""Tabular sources: Parquet, CSV, JSON Lines and Arrow IPC / Feather files, or a directory of them.

Every column is one field. The rule that decides how a column is stored, once per source:

- integer, float and bool columns, fixed-size lists of them (nested to any depth) and Arrow
  fixed-shape tensors become **fixed-shape** fields (zarr arrays; a fixed-size list of 3 floats is a
  float field of shape ``[3]``) -- provided the column holds **no nulls anywhere in the source**;
- a numeric column that holds nulls, and every other type (strings, binary, variable lists,
  structs, maps, dates and timestamps, decimals) becomes a **variable-length** Arrow field, stored
  exactly as Arrow has it (nulls included). Dictionary columns are decoded to their value type.

Whether a numeric column holds nulls is settled by a first pass over those columns only (cheap for
Parquet and Arrow, one extra parse for CSV and JSON), so the decision does not depend on where in
the file the first null is. Files are read as streams (``iter_batches``, streaming CSV/JSON
readers, IPC record batches); large batches are cut into slices of about ``BATCH_BYTES``. CSV and
JSON column types are inferred from the first block, as pyarrow's streaming readers do; a later
value that does not fit is reported with the file name. Compressed CSV/JSON (``.gz``, ``.bz2``,
``.zst``) are decompressed on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc
import pyarrow.json as pjson
import pyarrow.parquet as pq

from hpstore.errors import InputError
from tools.sources.base import BATCH_BYTES, Batch, Column, Source, batch_rows, check_field_name

FORMATS = ("parquet", "csv", "jsonl", "arrow")
EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".arrow": "arrow",
    ".arrows": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")  # CSV / JSON only: columnar formats compress inside

_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)

Reader = Callable[[list[str] | None], Iterator[pa.RecordBatch]]
Opener = Callable[[str], Any]
"""Opens a file of a remote source for reading (``tools.sources.location``); ``None``: a local path."""


def format_of(path: str) -> str | None:
    """The tabular format a file name says, if any (``data.csv.gz`` -> ``csv``)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSED and EXTENSIONS.get(suffixes[-2]) in ("csv", "jsonl"):
        return EXTENSIONS[suffixes[-2]]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _guard(path: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Re-raise reader errors as one-line ``InputError``s that name the file."""
    try:
        yield from batches
    except InputError:
        raise
    except _ERRORS as exc:
        hint = ""
        if "CSV conversion error" in str(exc) or "JSON" in type(exc).__name__ + str(exc)[:40]:
            hint = " (column types are inferred from the first block of the file)"
        raise InputError(f"{path}: {_first_line(exc)}{hint}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass(frozen=True, kw_only=True)
class _File:
    """One file of a tabular source: schema, rows (when the format says), and a batch reader."""

    path: str
    schema: pa.Schema
    num_rows: int | None
    read: Reader
    opener: Opener | None = None

    def input(self) -> Any:
        """What pyarrow readers take: the local path, or an open remote file."""
        return self.path if self.opener is None else self.opener(self.path)


def _input(path: str, opener: Opener | None) -> Any:
    return path if opener is None else opener(path)


def _parquet(path: str, opener: Opener | None = None) -> _File:
    pf = pq.ParquetFile(_input(path, opener))
    md = pf.metadata
    row_bytes = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) // max(1, md.num_rows)

    def read(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        yield from pq.ParquetFile(_input(path, opener)).iter_batches(
            batch_size=batch_rows(row_bytes), columns=columns
        )

    return _File(path=path, schema=pf.schema_arrow, num_rows=md.num_rows, read=read, opener=opener)


def _csv(path: str, opener: Opener | None = None) -> _File:
    opts = pcsv.ReadOptions(block_size=BATCH_BYTES // 2)
    with pcsv.open_csv(_input(path, opener), read_options=opts) as r:
        schema = r.schema

    def read(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        convert = pcsv.ConvertOptions(include_columns=columns) if columns is not None else None
        with pcsv.open_csv(_input(path, opener), read_options=opts, convert_options=convert) as r:
            yield from r

    return _File(path=path, schema=schema, num_rows=None, read=read)


def _jsonl(path: str, opener: Opener | None = None) -> _File:
    opts = pjson.ReadOptions(block_size=BATCH_BYTES // 2)
    with pjson.open_json(_input(path, opener), read_options=opts) as r:
        schema = r.schema

    def read(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        with pjson.open_json(_input(path, opener), read_options=opts) as r:
            for b in r:
                yield b if columns is None else b.select(columns)

    return _File(path=path, schema=schema, num_rows=None, read=read)


def _arrow(path: str, opener: Opener | None = None) -> _File:
    """Arrow IPC file format (Feather v2), else the IPC stream format."""
    open_ = (lambda: pa.OSFile(path)) if opener is None else (lambda: opener(path))
    try:
        with open_() as f, ipc.open_file(f) as r:
            schema, num_rows = r.schema, r.count_rows()

        def read(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
            with open_() as f, ipc.open_file(f) as r:
                for i in range(r.num_record_batches):
                    b = r.get_batch(i)
                    yield b if columns is None else b.select(columns)

        return _File(path=path, schema=schema, num_rows=num_rows, read=read, opener=opener)
    except pa.ArrowInvalid:
        pass
    with open_() as f, ipc.open_stream(f) as r:
        schema = r.schema

    def read_stream(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        with open_() as f, ipc.open_stream(f) as r:
            for b in r:
                yield b if columns is None else b.select(columns)

    return _File(path=path, schema=schema, num_rows=None, read=read_stream)


_OPENERS: dict[str, Callable[[str, Opener | None], _File]] = {
    "parquet": _parquet,
    "csv": _csv,
    "jsonl": _jsonl,
    "arrow": _arrow,
}


def _open_file(path: str, fmt: str, opener: Opener | None = None) -> _File:
    try:
        return _OPENERS[fmt](path, opener)
    except _ERRORS as exc:
        raise InputError(f"{path}: not a readable {fmt} file: {_first_line(exc)}") from None


# -- the column rule --------------------------------------------------------------------------------


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_fixed_candidate(t: pa.DataType) -> bool:
    t = _value_type(t)
    if isinstance(t, pa.FixedShapeTensorType):
        return _is_fixed_candidate(t.value_type)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return True
    return pa.types.is_fixed_size_list(t) and _is_fixed_candidate(t.value_type)


def _has_nulls(arr: pa.Array) -> bool:
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    if arr.null_count:
        return True
    return pa.types.is_fixed_size_list(arr.type) and _has_nulls(arr.flatten())


def _to_numpy(arr: pa.Array) -> np.ndarray:
    """A null-free fixed-shape column as ``(rows, *shape)``."""
    if isinstance(arr.type, pa.FixedShapeTensorType):
        return np.ascontiguousarray(arr.to_numpy_ndarray())
    n, shape = len(arr), []
    while pa.types.is_fixed_size_list(arr.type):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def _decode(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.dictionary_decode() if isinstance(arr, pa.DictionaryArray) else arr


class TableSource(Source):
    """One or more files of one tabular format with the same schema; one field per column."""

    def __init__(self, path: str, files: list[str], fmt: str, opener: Opener | None = None) -> None:
        if not files:
            raise InputError(f"{path}: no {fmt} files")
        self.path = path
        self.format = fmt
        self.files = [_open_file(f, fmt, opener) for f in files]
        self.schema = self.files[0].schema
        for f in self.files[1:]:
            _check_same_schema(self.files[0], f)
        names = self.schema.names
        if len(set(names)) != len(names):
            raise InputError(f"{self.files[0].path}: duplicate column names {names}")
        self.fields = tuple(check_field_name(n, self.files[0].path) for n in names)
        rows = [f.num_rows for f in self.files]
        self.num_rows = None if None in rows else sum(r for r in rows if r is not None)
        self.attrs: dict[str, dict[str, Any]] = {}
        candidates = [f.name for f in self.schema if _is_fixed_candidate(f.type)]
        self.fixed = frozenset(candidates) - self._columns_with_nulls(candidates)

    def _columns_with_nulls(self, candidates: list[str]) -> set[str]:
        """The first pass: which fixed-shape candidates hold a null anywhere."""
        found: set[str] = set()
        for f in self.files:
            if not candidates or found == set(candidates):
                break
            for b in _guard(f.path, f.read(candidates)):
                found.update(n for n in candidates if n not in found and _has_nulls(_decode(b.column(n))))
        return found

    def batches(self) -> Iterator[Batch]:
        for f in self.files:
            for b in _guard(f.path, f.read(None)):
                if b.num_rows == 0:
                    continue
                step = batch_rows(b.nbytes // b.num_rows)
                for start in range(0, b.num_rows, step):
                    yield self._convert(b.slice(start, step))

    def _convert(self, b: pa.RecordBatch) -> Batch:
        out: dict[str, Column] = {}
        for name in self.fields:
            col = _decode(b.column(name))
            out[name] = _to_numpy(col) if name in self.fixed else col
        return out


def _check_same_schema(first: _File, other: _File) -> None:
    a, b = first.schema, other.schema
    if a.names != b.names:
        raise InputError(f"{other.path}: columns {b.names} differ from {a.names} in {first.path}")
    for fa, fb in zip(a, b, strict=True):
        if fa.type != fb.type:
            what = (
                "mixed shapes" if _is_fixed_candidate(fa.type) and _is_fixed_candidate(fb.type) else "types"
            )
            raise InputError(
                f"{other.path}: column {fa.name!r} is {fb.type} here but {fa.type} in {first.path} ({what})"
            )


def files_in(path: str, fmt: str) -> list[str]:
    """The files of format ``fmt`` in a directory (sorted), or the file itself."""
    p = Path(path)
    if not p.is_dir():
        return [path]
    return [str(f) for f in sorted(p.iterdir()) if f.is_file() and format_of(f.name) == fmt]


def open_table(path: str, fmt: str) -> TableSource:
    """A tabular file, or every file of that format in a directory."""
    if fmt not in FORMATS:
        raise InputError(f"{path}: {fmt!r} is not a tabular format ({', '.join(FORMATS)})")
    return TableSource(path, files_in(path, fmt), fmt)
