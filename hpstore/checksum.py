"""CRC32C checksums, the one algorithm used for objects and chunks.

CRC32C is what Zarr's ``crc32c`` codec uses, so one implementation checks both the manifest's
object checksums and the per-chunk trailers inside shards. google-crc32c runs at several GB/s with
the CPU's CRC instructions.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

Buffer = bytes | bytearray | memoryview | np.ndarray


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value`` (0 starts a new checksum)."""
    # google-crc32c accepts bytes and numpy arrays but not memoryviews or bytearrays; a uint8 numpy
    # view of those is zero-copy (``bytes(view)`` would copy a multi-MB chunk just to checksum it).
    if not isinstance(data, bytes | np.ndarray):
        data = np.frombuffer(data, dtype=np.uint8)
    return int(google_crc32c.extend(value, data))


def crc32c_hex(data: Buffer) -> str:
    """The checksum as the manifest records it: eight lowercase hex digits."""
    return f"{crc32c(data):08x}"
