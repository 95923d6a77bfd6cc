"""The element types hpstore stores as Zarr v3 arrays: the Zarr v3 core data types numpy has.

One set for every writer and reader: a dataset's fixed-shape fields (``hpstore.format.zarr_shard``)
and a checkpoint's arrays (``hpstore.checkpoint.plan``) accept exactly these, stored under their
own names. Types outside it are refused, except where a writer maps them onto one of these itself
(a checkpoint stores bfloat16 and float8 tensors as the raw bits of the unsigned integer of the same
width: that torch mapping lives in ``hpstore.checkpoint``, which is the only part that knows torch).
"""

from __future__ import annotations

ZARR_CORE_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64", "complex64", "complex128"}
)
"""numpy dtype names (``np.dtype(x).name``), each also the Zarr v3 ``data_type`` that stores it."""
