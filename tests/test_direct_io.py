"""O_DIRECT writes: the aligned prefix bypasses the page cache, the tail and the rest do not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hpstore.checkpoint.checkpointer import Checkpointer, CheckpointLayout
from hpstore.storage import direct_io
from hpstore.storage.direct_io import ALIGN, DIRECT_MIN
from hpstore.storage.local import LocalStorage


def aligned(nbytes: int, shift: int = 0) -> np.ndarray:
    """``nbytes`` of random bytes starting ``shift`` bytes past an ``ALIGN`` boundary."""
    raw = np.empty(nbytes + 2 * ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN + shift
    out = raw[start : start + nbytes]
    out[:] = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    return out


def direct_supported(path: Path) -> bool:
    try:
        fd = os.open(path / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    os.unlink(path / "probe")
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("tail", [0, 1, ALIGN - 1, 12345])
def test_write_new_writes_every_byte(tmp_path: Path, tail: int) -> None:
    data = aligned(DIRECT_MIN + tail)
    assert direct_io.direct_prefix(data) == DIRECT_MIN + tail - (DIRECT_MIN + tail) % ALIGN
    direct_io.write(str(tmp_path / "f"), data.data, new=True)
    assert (tmp_path / "f").read_bytes() == data.tobytes()
    with pytest.raises(FileExistsError):  # never overwrites
        direct_io.write(str(tmp_path / "f"), data.data, new=True)


def test_small_or_unaligned_payloads_are_not_direct() -> None:
    assert direct_io.direct_prefix(aligned(DIRECT_MIN - ALIGN)) == 0
    assert direct_io.direct_prefix(aligned(DIRECT_MIN, shift=64)) == 0
    assert direct_io.direct_prefix(bytes(100)) == 0


def test_local_storage_counts_direct_bytes(tmp_path: Path) -> None:
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    st = LocalStorage(str(tmp_path))
    big, odd = aligned(DIRECT_MIN + 100), aligned(DIRECT_MIN, shift=8)
    st.write("a/big", big.data, durable=False)
    st.write("a/odd", odd.data)
    assert st.stats.bytes_written_direct == DIRECT_MIN  # the aligned prefix of big only
    assert st.stats.bytes_written == 2 * DIRECT_MIN + 100
    assert st.read("a/big") == big.tobytes() and st.read("a/odd") == odd.tobytes()
    assert sorted(os.listdir(tmp_path / "a")) == ["big", "odd"]  # no temp files left


def test_checkpoint_chunks_go_direct_and_load_back(tmp_path: Path) -> None:
    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    state = {
        "w": torch.randn(1000, 1000),  # 256-row chunks: 4096-aligned although a row is 4000 bytes
        "b": torch.randn(1000),
        "h": torch.randn(3, 1 << 19, dtype=torch.float64),  # 3 x 4 MiB
    }
    with Checkpointer(str(tmp_path / "ck"), layout=CheckpointLayout(chunk_bytes=1 << 20)) as ck:
        ck.save(1, state)
        ck.wait()
        stats = ck.storage.stats
        big = state["w"].numel() * 4 + state["h"].numel() * 8
        assert stats.bytes_written_direct >= big  # edge chunks too (zero-padded, aligned)
        got = ck.load(1)
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_checkpoint_bytes_do_not_stay_in_the_page_cache(tmp_path: Path) -> None:
    from benchmarks.cache import resident_fraction

    if not direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    state = {f"w{i}": torch.randn(1024, 1024) for i in range(4)}  # 16 MiB in 4 MiB arrays
    with Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save(1, state)
        ck.wait()
    chunks = [p for p in (tmp_path / "ck").rglob("*") if p.is_file() and "c" in p.parent.parts]
    resident = resident_fraction(chunks)
    if resident is None:
        pytest.skip("mincore is not available here")
    assert len(chunks) == 4 and resident < 0.05  # buffered writes would leave all of it cached
