"""Zarr v3 arrays with the sharding codec, encoded and decoded by hand on the hot paths.

zarr-python writes the metadata (``zarr.json``) so it is exactly what zarr expects; the chunk and
shard bytes are produced and parsed here, because zarr-python's per-call overhead dominates when a
loader gathers shuffled samples (see README, Performance). The bytes are standard: plain
``zarr.open_array`` reads every array we write (tests check this).

Per-chunk codec chain: ``bytes(little) -> [zstd | blosc-lz4] -> crc32c``. The trailing CRC32C lets a
reader that fetched one chunk by byte range verify it without reading the whole shard. Shard index
(at the end): ``chunks_per_shard`` pairs of little-endian uint64 ``(offset, nbytes)`` followed by a
CRC32C of those bytes; ``2**64-1`` marks an empty chunk.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from typing import Any

import numcodecs
import numpy as np

from hpstore.checksum import crc32c
from hpstore.errors import CorruptObjectError, InputError
from hpstore.format.dtypes import ZARR_CORE_DTYPES
from hpstore.format.manifest import Codec

numcodecs.blosc.use_threads = False  # parallelism comes from running several decodes at once

EMPTY = np.uint64(2**64 - 1)


def check_dtype(dtype: np.dtype[Any], where: str) -> str:
    name = np.dtype(dtype).name
    if name not in ZARR_CORE_DTYPES:
        raise InputError(f"{where}: unsupported dtype {name} for a fixed-shape field")
    return name


def validate_codec(codec: Codec) -> Codec:
    name = codec.get("name")
    if name == "zstd":
        level = int(codec.get("level", 1))
        if not -7 <= level <= 22:
            raise InputError(f"zstd level {level} out of range (-7..22)")
        return {"name": "zstd", "level": level}
    if name == "lz4":
        level = int(codec.get("level", 5))
        if not 0 <= level <= 9:
            raise InputError(f"lz4 (blosc) level {level} out of range (0..9)")
        return {"name": "lz4", "level": level}
    if name == "none":
        return {"name": "none"}
    raise InputError(f"unknown codec {name!r} (choose zstd, lz4 or none)")


@functools.lru_cache(maxsize=64)
def _little(dtype: str) -> np.dtype[Any]:
    """The little-endian dtype of a stored field (looked up per chunk: built once)."""
    return np.dtype(dtype).newbyteorder("<")


def _compressor(codec: Codec, itemsize: int) -> numcodecs.abc.Codec | None:
    return _compressor_for(codec["name"], int(codec.get("level", 0)), itemsize)


@functools.lru_cache(maxsize=64)
def _compressor_for(name: str, level: int, itemsize: int) -> numcodecs.abc.Codec | None:
    """Codec objects are stateless and thread-safe; build each once, not once per chunk."""
    if name == "zstd":
        return numcodecs.Zstd(level=level)
    if name == "lz4":
        shuffle = numcodecs.Blosc.SHUFFLE if itemsize > 1 else numcodecs.Blosc.NOSHUFFLE
        return numcodecs.Blosc(cname="lz4", clevel=level, shuffle=shuffle)
    return None


def array_metadata(
    *,
    num_samples: int,
    sample_shape: tuple[int, ...],
    dtype: str,
    chunk_rows: int,
    chunks_per_shard: int,
    codec: Codec,
) -> bytes:
    """The ``zarr.json`` of a sharded array, produced by zarr-python itself."""
    import zarr
    import zarr.codecs
    from zarr.storage import MemoryStore

    itemsize = np.dtype(dtype).itemsize
    compressors: list[Any] = []
    if codec["name"] == "zstd":
        compressors.append(zarr.codecs.ZstdCodec(level=codec["level"]))
    elif codec["name"] == "lz4":
        compressors.append(
            zarr.codecs.BloscCodec(
                cname="lz4",
                clevel=codec["level"],
                shuffle="shuffle" if itemsize > 1 else "noshuffle",
                typesize=itemsize,
            )
        )
    compressors.append(zarr.codecs.Crc32cCodec())
    store = MemoryStore()
    zarr.create_array(
        store,
        shape=(num_samples, *sample_shape),
        dtype=dtype,
        chunks=(chunk_rows, *sample_shape),
        shards=(chunk_rows * chunks_per_shard, *sample_shape),
        compressors=compressors,
        filters=None,
        fill_value=0,
        dimension_names=None,
    )
    return bytes(store._store_dict["zarr.json"].to_bytes())


def group_metadata(attributes: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}).encode()


def index_nbytes(chunks_per_shard: int) -> int:
    return 16 * chunks_per_shard + 4


def encode_chunk(rows: np.ndarray, chunk_rows: int, codec: Codec) -> bytes:
    """One inner chunk: ``rows`` padded to ``chunk_rows`` (edge chunks are stored full-size)."""
    if rows.shape[0] < chunk_rows:
        padded = np.zeros((chunk_rows, *rows.shape[1:]), dtype=rows.dtype)
        padded[: rows.shape[0]] = rows
        rows = padded
    arr = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    comp = _compressor(codec, arr.dtype.itemsize)
    payload = bytes(comp.encode(arr)) if comp is not None else arr.tobytes()
    return payload + struct.pack("<I", crc32c(payload))


def encode_shard(encoded_chunks: list[bytes], chunks_per_shard: int) -> bytes:
    """Concatenate encoded chunks and append the shard index (chunks beyond the list are empty)."""
    return b"".join([*encoded_chunks, shard_index([len(c) for c in encoded_chunks], chunks_per_shard)])


def shard_index(sizes: list[int], chunks_per_shard: int) -> bytes:
    """The index (with its CRC32C) that follows chunks of ``sizes`` bytes, stored back to back from
    offset 0: what a writer that streams the chunks out appends last."""
    index = np.full((chunks_per_shard, 2), EMPTY, dtype="<u8")
    offset = 0
    for i, n in enumerate(sizes):
        index[i] = (offset, n)
        offset += n
    index_bytes = index.tobytes()
    return index_bytes + struct.pack("<I", crc32c(index_bytes))


def parse_index(buf: bytes, chunks_per_shard: int, key: str) -> np.ndarray:
    """The ``(chunks_per_shard, 2)`` uint64 index from the tail of a shard, checksum verified."""
    if len(buf) != index_nbytes(chunks_per_shard):
        raise CorruptObjectError(
            key, f"shard index has {len(buf)} bytes, expected {index_nbytes(chunks_per_shard)}"
        )
    body, (stored,) = buf[:-4], struct.unpack("<I", buf[-4:])
    if crc32c(body) != stored:
        raise CorruptObjectError(key, "shard index checksum mismatch")
    return np.frombuffer(body, dtype="<u8").reshape(chunks_per_shard, 2)


def decode_chunk(
    buf: bytes | memoryview, *, codec: Codec, dtype: str, chunk_shape: tuple[int, ...], key: str, chunk: int
) -> np.ndarray:
    """Verify the CRC32C trailer and decode one inner chunk to a (read-only) array."""
    if len(buf) < 4:
        raise CorruptObjectError(key, f"chunk {chunk} truncated ({len(buf)} bytes)")
    payload, (stored,) = memoryview(buf)[:-4], struct.unpack("<I", buf[-4:])
    if crc32c(payload) != stored:
        raise CorruptObjectError(key, f"checksum mismatch in chunk {chunk}")
    dt = _little(dtype)
    comp = _compressor(codec, dt.itemsize)
    try:
        raw = comp.decode(payload) if comp is not None else payload
    except Exception as exc:  # codec libraries raise assorted types on garbage
        raise CorruptObjectError(key, f"chunk {chunk} does not decode: {exc}") from None
    arr = np.frombuffer(raw, dtype=dt)
    expected = math.prod(chunk_shape)
    if arr.size != expected:
        raise CorruptObjectError(key, f"chunk {chunk} decodes to {arr.size} items, expected {expected}")
    return arr.reshape(chunk_shape)
