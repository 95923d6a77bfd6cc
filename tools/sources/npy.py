"""NumPy sources: one ``.npy`` file, an ``.npz`` archive, or a directory of ``.npy`` files.

Each array is one field (named after the file or archive member, or given by ``--field``); all
arrays of a source must have the same first dimension (the sample axis). Data is streamed in
batches (see ``tools.sources.arrays``); Fortran-ordered arrays, whose rows are not contiguous, are
memory-mapped (``.npy``) or read whole (``.npz`` member).

dtypes: bool, integers, floats and complex become fixed-shape fields; fixed-width bytes (``S``) and
unicode (``U``) become variable-length Arrow ``binary`` / ``string`` fields; anything else (object
arrays, which would need pickle, datetimes, records) is refused.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpstore.errors import InputError
from tools.sources.arrays import DECODE_ERRORS, ArraySource, ArrayStream, check_stream, describe
from tools.sources.base import check_field_name


def _read_header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """``(shape, fortran_order, dtype, data offset)`` of the ``.npy`` stream ``f``."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except DECODE_ERRORS as exc:
        raise InputError(f"{where}: not a valid .npy array: {exc}") from None
    return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()


def _npy_file(path: str, field: str) -> ArrayStream:
    def open_() -> BinaryIO:
        f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        _read_header(f, path)
        return f

    with open(path, "rb") as f:
        shape, fortran, dtype, offset = _read_header(f, path)
    arr = ArrayStream(
        field=field, where=path, open=open_, shape=shape, dtype=dtype, fortran=fortran, mmap_path=path
    )
    return check_stream(arr, os.path.getsize(path), offset)


def _npz_members(path: str) -> list[ArrayStream]:
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if i.filename.endswith(".npy")]
            arrays = []
            for info in infos:
                where = f"{path}:{info.filename}"
                with z.open(info) as f:
                    shape, fortran, dtype, offset = _read_header(f, where)  # type: ignore[arg-type]

                def open_(info: zipfile.ZipInfo = info, where: str = where) -> BinaryIO:
                    z = zipfile.ZipFile(path)
                    f = z.open(info)
                    _read_header(f, where)  # type: ignore[arg-type]
                    return f  # type: ignore[return-value]

                name = check_field_name(info.filename.removesuffix(".npy"), where)
                arr = ArrayStream(
                    field=name, where=where, open=open_, shape=shape, dtype=dtype, fortran=fortran
                )
                arrays.append(check_stream(arr, info.file_size, offset))
    except InputError:
        raise
    except DECODE_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npz archive: {describe(exc)}") from None
    if not arrays:
        raise InputError(f"{path}: the archive holds no .npy arrays")
    return arrays


def open_npy(path: str, field: str | None = None) -> ArraySource:
    """A ``.npy`` file: one field, named ``field`` or after the file."""
    name = check_field_name(field or Path(path).stem, path)
    return ArraySource(path, [_npy_file(path, name)])


def open_npz(path: str) -> ArraySource:
    """An ``.npz`` archive: one field per member."""
    return ArraySource(path, _npz_members(path))


def open_npy_dir(path: str) -> ArraySource:
    """A directory of ``.npy`` files: one field per file, named after it."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".npy" and p.is_file())
    if not files:
        raise InputError(f"{path}: no .npy files in this directory")
    return ArraySource(path, [_npy_file(str(p), check_field_name(p.stem, str(p))) for p in files])
