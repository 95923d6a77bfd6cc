"""Ingest never deletes or replaces what it cannot prove it wrote, and one writer works at a time.

The same cases run against a local directory, ``memory://`` and the loopback moto S3 server:
foreign prefixes that merely start with ``data-`` survive an overwrite; a destination holding
anything else and no store is refused; a ``manifest.json`` that is not ours is never replaced, not
even with ``--overwrite``; a second writer fails at once with one line naming the lock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpstore
from hpstore.errors import StoreLockedError
from hpstore.format.commit import CHECKPOINT_GENERATIONS, LOCK_KEY, STORE_GENERATIONS, WriterLock
from hpstore.format.manifest import MANIFEST_KEY
from hpstore.format.verify import verify
from hpstore.format.writer import StoreWriter
from hpstore.storage.base import Storage
from hpstore.storage.open import open_storage
from tests.support.s3server import S3Server
from tests.support.s3server import s3_server as s3_server  # the fixture
from tests.support.stores import SMALL, sample_columns, write_store
from tools.ingest import main

FOREIGN = {"data-mnist/train.bin": b"somebody's data", "data-raw/part-0": b"raw", "data-2024/x": b"x"}
"""Prefixes that start like a generation but are not ours: no ingest may ever delete them."""


@dataclass
class Dest:
    url: str
    options: dict[str, Any]

    @property
    def cli(self) -> list[str]:
        return [arg for k, v in self.options.items() for arg in ("--storage-option", f"{k}={v}")]

    def storage(self) -> Storage:
        return open_storage(self.url, self.options)


@pytest.fixture(params=["local", "memory", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dest]:
    if request.param == "local":
        yield Dest(str(tmp_path / "store"), {})
    elif request.param == "memory":
        yield Dest(f"memory://own-{uuid.uuid4().hex}/store", {})
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        yield Dest(f"s3://{server.create_bucket()}/store", server.storage_options())


def ingest(capsys: pytest.CaptureFixture[str], dest: Dest, src: Path, *extra: str) -> tuple[int, str]:
    code = main([str(src), dest.url, "--no-progress", "--chunk-bytes", "4KiB", *dest.cli, *extra])
    _out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


def npy(tmp_path: Path, name: str, n: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(seed).integers(0, 1000, (n, 3))
    np.save(tmp_path / name, x)
    return tmp_path / name, x


def put_foreign(st: Storage) -> None:
    for key, data in FOREIGN.items():
        st.write(key, data)


def assert_foreign_intact(st: Storage) -> None:
    for key, data in FOREIGN.items():
        assert st.read(key) == data, key


def test_overwrite_keeps_foreign_prefixes_that_look_like_generations(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dest: Dest
) -> None:
    src, _x = npy(tmp_path, "x.npy", 500)
    code, err = ingest(capsys, dest, src)
    assert code == 0, err
    st = dest.storage()
    put_foreign(st)
    first = hpstore.open(dest.url, storage_options=dest.options).manifest.generation
    src2, x2 = npy(tmp_path, "x.npy", 700, seed=1)
    code, err = ingest(capsys, dest, src2, "--overwrite")
    assert code == 0, err
    assert_foreign_intact(st)
    store = hpstore.open(dest.url, storage_options=dest.options)
    np.testing.assert_array_equal(store.split("train")[:]["x"], x2)
    assert verify(st, store.manifest).ok
    tops = {k.split("/")[0] for k in st.list()}
    assert first not in tops  # our previous generation was collected
    assert tops == {MANIFEST_KEY, store.manifest.generation, "data-mnist", "data-raw", "data-2024"}
    assert LOCK_KEY not in tops  # released by its owner


def test_destination_holding_only_lookalike_prefixes_is_not_a_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dest: Dest
) -> None:
    """No manifest, and nothing we can prove we wrote: refused, with or without --overwrite."""
    st = dest.storage()
    put_foreign(st)
    src, _ = npy(tmp_path, "x.npy", 100)
    for extra in ([], ["--overwrite"]):
        code, err = ingest(capsys, dest, src, *extra)
        assert code == 2 and err.count("\n") == 1 and "not a store" in err and "data-" in err, err
        assert set(st.list()) == set(FOREIGN)  # not even a lock was written
    assert_foreign_intact(st)


def test_foreign_manifest_is_never_replaced(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dest: Dest
) -> None:
    st = dest.storage()
    theirs = json.dumps({"name": "my project", "files": ["a", "b"]}).encode()
    st.write(MANIFEST_KEY, theirs)
    st.write("data-old/a", b"a")
    src, _ = npy(tmp_path, "x.npy", 100)
    for extra in ([], ["--overwrite"]):
        code, err = ingest(capsys, dest, src, *extra)
        assert code == 2 and err.count("\n") == 1, err
        assert "not a manifest" in err and "even with --overwrite" in err and "already exists" not in err
    assert st.read(MANIFEST_KEY) == theirs
    assert set(st.list()) == {MANIFEST_KEY, "data-old/a"}


def test_leftover_of_a_killed_ingest_is_collected_remotely_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dest: Dest
) -> None:
    """An uncommitted generation with our exact naming is ours: the next commit removes it."""
    st = dest.storage()
    leftover = STORE_GENERATIONS.new()
    st.write(f"{leftover}/train/x/c/0/0", b"half written")
    src, x = npy(tmp_path, "x.npy", 300)
    code, err = ingest(capsys, dest, src)
    assert code == 0, err
    store = hpstore.open(dest.url, storage_options=dest.options)
    assert {k.split("/")[0] for k in st.list()} == {MANIFEST_KEY, store.manifest.generation}
    np.testing.assert_array_equal(store.split("train")[:]["x"], x)


def test_second_writer_fails_fast_and_the_first_commits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dest: Dest
) -> None:
    src, _x = npy(tmp_path, "x.npy", 400)
    code, err = ingest(capsys, dest, src)
    assert code == 0, err
    st = dest.storage()
    new = sample_columns(90, seed=4)
    with StoreWriter(st, layout=SMALL, overwrite=True) as first:
        sw = first.split("train")
        sw.append(new)
        first.add_split(sw)
        # A second ingest arrives while the first is writing: one line, exit 2, nothing touched.
        before = st.list()
        code, err = ingest(capsys, dest, src, "--overwrite")
        assert code == 2 and err.count("\n") == 1, err
        assert LOCK_KEY in err and "another writer" in err and "--break-lock" in err
        assert st.list() == before
        m = first.commit()
    assert LOCK_KEY not in st.list()
    store = hpstore.open(dest.url, storage_options=dest.options)
    assert store.manifest.generation == m.generation and verify(st, m).ok
    assert np.array_equal(store.split("train")[:]["image"], new["image"])


def test_lock_is_exclusive_and_released_only_by_its_owner(dest: Dest) -> None:
    st = dest.storage()
    lock = WriterLock.acquire(st, tool="test")
    with pytest.raises(StoreLockedError, match="pid"):
        WriterLock.acquire(st, tool="test")
    # Broken on purpose and taken by another writer: the first owner must not remove it.
    other = WriterLock.acquire(st, tool="test", break_lock=True)
    lock.release()
    assert st.exists(LOCK_KEY)
    other.release()
    assert not st.exists(LOCK_KEY)
    write_store(st, {"train": sample_columns(20)})  # free again


def test_generation_naming_is_strict() -> None:
    for naming in (STORE_GENERATIONS, CHECKPOINT_GENERATIONS):
        name = naming.new()
        assert naming.owns(name)
        for other in ("data-", "data-mnist", "data-raw", f"{name}x", f"x{name}", name.upper(), "data-2024"):
            assert not naming.owns(other), other
    assert not STORE_GENERATIONS.owns(CHECKPOINT_GENERATIONS.new())
    assert STORE_GENERATIONS.owns("data-20261126T202100-4ef4b58d")  # the golden stores' name
    # A checkpoint manifest may name 8-32 hex digits; only the writer's 12 are ever collected.
    for name in ("data-0123abcd", "data-" + "f" * 32):
        assert CHECKPOINT_GENERATIONS.readable(name) and not CHECKPOINT_GENERATIONS.owns(name)
    for name in ("data-0123abc", "data-" + "f" * 33, "data-raw", "spare-0123456789ab"):
        assert not CHECKPOINT_GENERATIONS.readable(name), name
    assert not STORE_GENERATIONS.readable("data-0123abcd")
