"""Text sources: documents (strings) read from JSONL, Parquet or plain-text files, in bounded batches.

What the token ingest (``tools.ingest_tokens``) reads. ``open_text(src, text_field)`` accepts a
file, a directory (searched recursively) or a glob pattern (``corpus/*.jsonl``, ``docs/**/*.txt``);
the files are taken in sorted order, so the same input gives the same store.

- ``.jsonl`` / ``.ndjson`` (optionally ``.gz``, ``.bz2``, ``.zst``): one document per line, the
  string under ``text_field``;
- ``.parquet`` / ``.pq``: one document per row of the string column ``text_field``;
- ``.txt``, ``.md``, ``.rst``, ``.text``: each file is one document (read whole, so a plain-text
  file is meant to be one document, not a corpus).

``documents()`` yields Arrow string arrays of about ``BATCH_BYTES`` of text, fully validated as
UTF-8. For parallel readers the same work comes in two halves: ``pieces()`` reads raw input in
order on one thread (blocks of whole JSON lines of ``BLOCK_BYTES``, Parquet record batches, groups
of text files) and ``parse(piece)``, callable on any thread, turns a piece into checked documents
(JSON parsing, UTF-8 validation and the empty checks run there, mostly in Arrow without the GIL).
``parse`` mutates nothing; the caller adds each result's counts in order with ``account``. Bad input raises one-line ``InputError``s naming the file: invalid UTF-8, a missing or
non-string text column, a null or empty document (unless ``skip_empty``, which drops and counts
them), a corpus without any document.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pjson
import pyarrow.parquet as pq

from hpstore.errors import InputError
from tools.sources.base import BATCH_BYTES
from tools.sources.tabular import COMPRESSED

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")

_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)
BLOCK_BYTES = 2 << 20
"""Raw JSONL per piece: small enough that a few-MB corpus still spreads over the parse threads."""


@dataclass(frozen=True)
class Piece:
    """Raw input for some consecutive documents of one file: ``data`` is whole JSON lines
    (bytes), a Parquet column (``pa.Array``) or, for ``kind == "text"``, a list of file paths."""

    path: str
    kind: str
    data: Any


@dataclass(frozen=True)
class Parsed:
    """A parsed piece: checked, non-empty documents; ``rows`` counts them before empty ones were
    dropped (``skipped``); ``nbytes`` is the text read."""

    docs: pa.Array
    rows: int
    skipped: int
    nbytes: int


def kind_of(path: str) -> str | None:
    """``"text"``, ``"jsonl"``, ``"parquet"`` or ``None`` from a file name."""
    name = path.lower()
    for comp in COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
            return "jsonl" if name.endswith(JSONL_SUFFIXES) else None
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand(src: str) -> list[str]:
    """The files ``src`` names (a file, a directory, a glob pattern), sorted."""
    if any(c in src for c in "*?["):
        found = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
        if not found:
            raise InputError(f"{src}: the pattern matches no file")
    elif os.path.isdir(src):
        found = sorted(
            os.path.join(d, n) for d, _, names in os.walk(src) for n in names if kind_of(n) is not None
        )
        if not found:
            raise InputError(
                f"{src}: the directory holds no text file (.txt, .md, .rst, .jsonl[.gz], .parquet)"
            )
    elif os.path.isfile(src):
        found = [src]
    else:
        raise InputError(f"{src}: no such file or directory")
    unknown = [p for p in found if kind_of(p) is None]
    if unknown:
        raise InputError(f"{unknown[0]}: not a text source (.txt, .md, .rst, .jsonl[.gz], .parquet)")
    return found


@dataclass
class TextSource:
    """Documents from ``files``; ``skipped`` counts empty documents dropped by ``skip_empty``."""

    path: str
    files: list[str]
    text_field: str = "text"
    skip_empty: bool = False
    batch_bytes: int = BATCH_BYTES
    skipped: int = 0
    bytes_read: int = 0
    documents_read: int = 0
    _pending: list[pa.Array] = field(default_factory=list)

    def check(self) -> None:
        """What can be checked before reading: Parquet files have a string ``text_field``."""
        for path in self.files:
            if kind_of(path) == "parquet":
                try:
                    schema = pq.read_schema(path)
                except _ARROW_ERRORS as exc:
                    raise InputError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
                self._check_type(path, schema)

    def _check_type(self, path: str, schema: pa.Schema) -> None:
        if self.text_field not in schema.names:
            raise InputError(
                f"{path}: no text column {self.text_field!r} (columns: {', '.join(schema.names)}); "
                "choose one with --text-field"
            )
        t = schema.field(self.text_field).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise InputError(f"{path}: column {self.text_field!r} holds {t}, not text")

    def documents(self) -> Iterator[pa.Array]:
        """Batches of validated, non-empty documents (``pa.string`` / ``pa.large_string``)."""
        out: list[pa.Array] = []
        size = 0
        rows: dict[str, int] = {}
        for piece in self.pieces():
            parsed = self.parse(piece, rows.get(piece.path, 0))
            rows[piece.path] = rows.get(piece.path, 0) + parsed.rows
            self.account(parsed)
            if not len(parsed.docs):
                continue
            out.append(parsed.docs)
            size += parsed.docs.nbytes
            if size >= self.batch_bytes:
                yield _concat(out)
                out, size = [], 0
        if out:
            yield _concat(out)
        self.check_any()

    def account(self, parsed: Parsed) -> None:
        """Add a parsed piece's counts (call in piece order, on one thread)."""
        self.bytes_read += parsed.nbytes
        self.skipped += parsed.skipped
        self.documents_read += len(parsed.docs)

    def check_any(self) -> None:
        """After the last piece: refuse a corpus without any document."""
        if not self.documents_read:
            raise InputError(f"{self.path}: no documents")

    def pieces(self) -> Iterator[Piece]:
        """Raw input in document order, about ``BLOCK_BYTES`` per piece (see the module docstring)."""
        group: list[str] = []
        size = 0
        for path in self.files:
            kind = kind_of(path) or ""
            if kind == "text":
                group.append(path)
                size += os.path.getsize(path)
                if size >= self.batch_bytes:
                    yield Piece(path, "text", group)
                    group, size = [], 0
                continue
            if group:
                yield Piece(group[0], "text", group)
                group, size = [], 0
            try:
                if kind == "parquet":
                    pf = pq.ParquetFile(path)
                    self._check_type(path, pf.schema_arrow)
                    for batch in pf.iter_batches(batch_size=8192, columns=[self.text_field]):
                        yield Piece(path, kind, batch.column(batch.schema.get_field_index(self.text_field)))
                else:
                    yield from self._json_blocks(path)
            except InputError:
                raise
            except _ARROW_ERRORS as exc:
                raise InputError(f"{path}: {_first_line(exc)}") from None
        if group:
            yield Piece(group[0], "text", group)

    def _json_blocks(self, path: str) -> Iterator[Piece]:
        """Whole lines of ``path`` (decompressed by its suffix), about ``BLOCK_BYTES`` at a time."""
        rest = b""
        with pa.input_stream(path, compression="detect") as f:
            while True:
                data = f.read(BLOCK_BYTES)
                if not data:
                    break
                buf = rest + data if rest else data
                cut = buf.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    rest = buf
                    continue
                rest = buf[cut:]
                yield Piece(path, "jsonl", buf[:cut])
        if rest.strip():
            yield Piece(path, "jsonl", rest)

    def parse(self, piece: Piece, first_row: int = 0) -> Parsed:
        """The checked documents of ``piece``; ``first_row`` (its first document's number in its
        file) only words error messages. Thread-safe: reads ``self``'s settings only."""
        if piece.kind == "text":
            parts = [self._parse_text(p) for p in piece.data]
            docs = [d.docs for d in parts if len(d.docs)]
            return Parsed(
                docs=_concat(docs) if docs else pa.array([], pa.large_string()),
                rows=sum(d.rows for d in parts),
                skipped=sum(d.skipped for d in parts),
                nbytes=sum(d.nbytes for d in parts),
            )
        col = piece.data
        try:
            if piece.kind == "jsonl":
                opts = pjson.ReadOptions(use_threads=False, block_size=max(1 << 20, len(col) + 1))
                table = pjson.read_json(pa.BufferReader(col), read_options=opts)
                self._check_type(piece.path, table.schema)
                col = table.column(self.text_field).combine_chunks()
            if pa.types.is_dictionary(col.type):
                col = col.dictionary_decode()
        except InputError:
            raise
        except _ARROW_ERRORS as exc:
            raise InputError(f"{piece.path}: {_first_line(exc)}") from None
        docs, skipped = self._clean(piece.path, col, first_row)
        text = pc.sum(pc.binary_length(col)).as_py() if len(col) else 0
        return Parsed(docs=docs, rows=len(col), skipped=skipped, nbytes=int(text or 0))

    def _parse_text(self, path: str) -> Parsed:
        with open(path, "rb") as f:
            raw = f.read()
        arr = pa.array([raw], pa.binary()).cast(pa.large_string(), safe=False)
        docs, skipped = self._clean(path, arr, 0)
        return Parsed(docs=docs, rows=1, skipped=skipped, nbytes=len(raw))

    def _clean(self, path: str, arr: pa.Array, first_row: int) -> tuple[pa.Array, int]:
        """Validate UTF-8; refuse (or drop and count) null and empty documents."""
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid:
            bad = _first_invalid(arr)
            where = f"document {first_row + bad}" if kind_of(path) != "text" else "the file"
            raise InputError(f"{path}: {where} is not valid UTF-8") from None
        empty = pc.fill_null(pc.equal(pc.binary_length(arr), 0), True)
        if pc.any(empty).as_py():
            if not self.skip_empty:
                k = int(pc.index(empty, True).as_py())
                what = (
                    "the file is empty"
                    if kind_of(path) == "text"
                    else f"document {first_row + k} is empty or null"
                )
                raise InputError(f"{path}: {what} (--skip-empty drops empty documents)")
            return arr.filter(pc.invert(empty)), int(pc.sum(empty).as_py())
        return arr, 0


def _first_invalid(arr: pa.Array) -> int:
    """Index of the first document that is not valid UTF-8 (a rare path: only on bad input)."""
    for i in range(len(arr)):
        try:
            arr.slice(i, 1).validate(full=True)
        except pa.ArrowInvalid:
            return i
    return 0


def _concat(parts: list[pa.Array]) -> pa.Array:
    if len(parts) == 1:
        return parts[0]
    return pa.concat_arrays([p.cast(pa.large_string()) for p in parts])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def open_text(src: str, *, text_field: str = "text", skip_empty: bool = False) -> TextSource:
    """A checked ``TextSource`` for ``src``."""
    src_files = expand(src)
    source = TextSource(path=src, files=src_files, text_field=text_field, skip_empty=skip_empty)
    source.check()
    return source
