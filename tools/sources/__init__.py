"""Ingest sources: turn files on disk into named splits of row-aligned field batches.

``open_splits(src, ...)`` resolves what the user named (a file, a directory, ``--field`` files)
into ``Split``s, each with a ``Source`` whose ``batches()`` stream bounded ``{field: column}``
dicts (see ``tools.sources.base`` for the contract). One module per source kind:

- ``npy``: ``.npy`` files, ``.npz`` archives, directories of ``.npy`` files;
- ``idx``: IDX files (MNIST), gzipped or not, and the MNIST directory layout (splits train/test);
- ``tabular``: Parquet, CSV, JSON Lines, Arrow IPC / Feather (and directories of them);
- ``imagefolder``: ``root/<class>/<image>`` trees;
- ``aligned``: ``--field NAME=PATH`` files zipped into one split;
- ``detect``: which of these a path is.

Sources are local files. Everything they can check before reading data (headers, sizes, counts,
schemas) is checked when they are opened, so bad input is refused before a store is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hpstore.errors import InputError
from tools.sources import npy, tabular
from tools.sources.aligned import AlignedSource
from tools.sources.base import Batch, Source, Split
from tools.sources.detect import FORMATS, detect_format
from tools.sources.idx import mnist_splits, open_idx
from tools.sources.imagefolder import open_imagefolder

DEFAULT_SPLIT = "train"

__all__ = [
    "DEFAULT_SPLIT",
    "FORMATS",
    "Batch",
    "Source",
    "Split",
    "detect_format",
    "open_source",
    "open_splits",
]


def open_source(path: str, fmt: str, field: str | None = None) -> Source:
    """One source of a single split; ``field`` names the field of a single-field file."""
    if fmt == "mnist":
        raise InputError(f"{path}: the MNIST layout is a directory of splits, not a single field source")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    isdir = os.path.isdir(path)
    if fmt == "npy":
        return npy.open_npy_dir(path) if isdir else npy.open_npy(path, field)
    if isdir and fmt in ("npz", "idx"):
        raise InputError(f"{path}: is a directory, not a .{fmt} file")
    if fmt == "npz":
        return npy.open_npz(path)
    if fmt == "idx":
        return open_idx(path, field)
    if fmt == "imagefolder":
        if not isdir:
            raise InputError(f"{path}: an image folder is a directory of <class>/<image> folders")
        return open_imagefolder(path)
    if fmt in tabular.FORMATS:
        return tabular.open_table(path, fmt)
    raise InputError(f"{path}: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def open_splits(
    src: str | None,
    *,
    fmt: str | None = None,
    split: str | None = None,
    fields: Sequence[tuple[str, str]] = (),
) -> list[Split]:
    """The splits to ingest: an MNIST directory's train/test, ``--field`` files, or one source."""
    if fields:
        base = src or ""
        parts = []
        for name, path in fields:
            full = os.path.join(base, path) if base else path
            parts.append((name, open_source(full, fmt or detect_format(full), field=name)))
        return [Split(name=split or DEFAULT_SPLIT, source=AlignedSource(parts), format="fields")]
    if src is None:
        raise InputError("no source: give SRC or --field NAME=PATH")
    fmt = fmt or detect_format(src)
    if fmt == "mnist" or (fmt == "idx" and os.path.isdir(src)):
        if split is not None:
            raise InputError(
                f"{src}: --split does not apply to an MNIST directory (its splits are train and test)"
            )
        return mnist_splits(src)
    return [Split(name=split or DEFAULT_SPLIT, source=open_source(src, fmt), format=fmt)]
