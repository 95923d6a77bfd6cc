"""CRC32C checksums, the one algorithm used for objects and chunks.

CRC32C is what Zarr's ``crc32c`` codec uses, so one implementation checks both the manifest's
object checksums and the per-chunk trailers inside shards. google-crc32c runs at several GB/s with
the CPU's CRC instructions.
"""

from __future__ import annotations

import google_crc32c


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value`` (0 starts a new checksum)."""
    return int(google_crc32c.extend(value, bytes(data) if isinstance(data, memoryview) else data))


def crc32c_hex(data: bytes | bytearray | memoryview) -> str:
    """The checksum as the manifest records it: eight lowercase hex digits."""
    return f"{crc32c(data):08x}"
