"""Sources named by an fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``) or a glob.

``open_location_splits(src, options=...)`` expands ``src`` into a sorted list of files (a glob, a
directory / prefix, or one file), checks they exist and are of one format, and opens them as one
split through the ordinary source readers with files opened by fsspec (``RemoteOpener``). The
source's options (credentials, endpoint) travel inside the opener, separately from the
destination's: ``--source-option`` vs ``--storage-option``.

Formats read from a URL: Parquet, Arrow IPC, CSV, JSON Lines (``tools.sources.tabular``) and
``.npy`` files (one field per file). A local glob (``data/*.parquet``) takes the same path.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from hpstore.errors import InputError
from tools.sources import npy, tabular
from tools.sources.arrays import ArraySource, ArrayStream, check_stream
from tools.sources.base import Split, check_field_name

DEFAULT_SPLIT = "train"
_GLOB_CHARS = "*?["


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


class RemoteOpener:
    """Opens files of one fsspec filesystem for reading; picklable (it travels to Dask workers)."""

    def __init__(self, protocol: str, options: Mapping[str, Any]) -> None:
        self.protocol = protocol
        self.options = dict(options)
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem(self.protocol, **self.options)
        return self._fs

    def url(self, path: str) -> str:
        return path if "://" in path else f"{self.protocol}://{path}"

    def __call__(self, path: str) -> Any:
        return self.fs.open(self._strip(path), "rb")

    def _strip(self, path: str) -> str:
        return path if self.protocol in ("http", "https") else path.split("://", 1)[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "options": self.options, "_fs": None}


def _kind(path: str) -> str | None:
    if path.endswith(".npy"):
        return "npy"
    return tabular.format_of(path)


def expand(src: str, options: Mapping[str, Any]) -> tuple[RemoteOpener | None, list[str]]:
    """The files ``src`` names, sorted: a glob's matches, a directory's files, or the file."""
    if not is_url(src):
        path = src.removeprefix("file://")
        files = sorted(p for p in _glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"{src}: the pattern matches no files")
        return None, files
    protocol = src.split("://", 1)[0]
    opener = RemoteOpener(protocol, options)
    fs = opener.fs
    target = opener._strip(src)
    try:
        if has_glob(target):
            found = [p for p in fs.glob(target) if fs.isfile(p)]
            if not found:
                raise InputError(f"{src}: the pattern matches no files")
        elif fs.isdir(target):
            found = [p for p in fs.find(target) if _kind(p) is not None]
            if not found:
                raise InputError(f"{src}: holds no Parquet, Arrow, CSV, JSON Lines or .npy files")
        elif fs.exists(target):
            found = [target]
        else:
            raise InputError(f"{src}: no such file or directory")
    except InputError:
        raise
    except (OSError, ValueError) as exc:  # unreachable endpoint, bad bucket name, denied
        raise InputError(
            f"{src}: cannot list: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    urls = [opener.url(p) if protocol not in ("http", "https") else p for p in sorted(found)]
    return opener, urls


def open_location_splits(
    src: str, *, fmt: str | None = None, split: str | None = None, options: Mapping[str, Any]
) -> list[Split]:
    """One split from the files ``src`` names (all of one format)."""
    opener, files = expand(src, options)
    kinds = {fmt or _kind(f) for f in files}
    if None in kinds:
        unknown = next(f for f in files if _kind(f) is None)
        raise InputError(f"{unknown}: unknown format; name it with --format")
    if len(kinds) > 1:
        raise InputError(f"{src}: matches {' and '.join(sorted(k or '' for k in kinds))} files; choose one")
    kind = kinds.pop()
    assert kind is not None
    name = split or DEFAULT_SPLIT
    check_field_name(name, "--split", what="split")
    if kind in tabular.FORMATS:
        return [Split(name=name, source=tabular.TableSource(src, files, kind, opener), format=kind)]
    if kind == "npy":
        return [Split(name=name, source=ArraySource(src, [_npy(f, opener) for f in files]), format="npy")]
    raise InputError(
        f"{src}: {kind} sources are read from local paths only (fsspec URLs: parquet, arrow, csv, jsonl, npy)"
    )


def _npy(path: str, opener: RemoteOpener | None) -> ArrayStream:
    field = check_field_name(PurePosixPath(path.split("://", 1)[-1]).stem, path)
    if opener is None:
        return npy._npy_file(path, field)

    def open_() -> Any:
        f = opener(path)
        npy._read_header(f, path)
        return f

    with opener(path) as f:
        shape, fortran, dtype, offset = npy._read_header(f, path)
    arr = ArrayStream(field=field, where=path, open=open_, shape=shape, dtype=dtype, fortran=fortran)
    return check_stream(arr, int(opener.fs.size(opener._strip(path))), offset)
