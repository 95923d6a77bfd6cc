"""The commit protocol: data first, manifest last and atomically, old generations deleted after.

A reader must only ever see a complete store: the previous one until the new manifest lands, then
the new one; an abandoned or killed writer leaves nothing that opens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpstore
from hpstore.errors import ObjectNotFoundError, StoreExistsError, StoreLockedError, StoreNotFoundError
from hpstore.format.commit import LOCK_KEY
from hpstore.format.manifest import MANIFEST_KEY, Manifest
from hpstore.format.verify import verify
from hpstore.format.writer import StoreWriter
from hpstore.storage.base import Storage
from hpstore.storage.local import LocalStorage
from hpstore.storage.wrappers import ForwardingStorage
from tests.support.stores import SMALL, sample_columns, write_store

REPO = Path(__file__).resolve().parents[1]


class BeforeManifest(ForwardingStorage):
    """Calls ``hook`` just before ``manifest.json`` is written."""

    def __init__(self, inner: Storage, hook: Callable[[], None]) -> None:
        super().__init__(inner)
        self.hook = hook

    def write(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        if key == MANIFEST_KEY:
            self.hook()
        self.inner.write(key, data, durable=durable)


def assert_exactly_committed(root: Path, m: Manifest) -> None:
    """The store holds the manifest and the objects it lists, nothing else, all intact."""
    storage = LocalStorage(str(root))
    assert set(storage.list()) == {MANIFEST_KEY, *m.objects}
    assert verify(storage, m).ok


def assert_reads(root: Path, cols: dict[str, Any]) -> None:
    got = hpstore.open(str(root)).split("train")[:]
    assert np.array_equal(got["image"], cols["image"])
    assert got["text"] == cols["text"].to_pylist()


def test_writer_abandoned_by_an_exception_leaves_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    with pytest.raises(RuntimeError, match="source broke"), StoreWriter(storage, layout=SMALL) as w:
        sw = w.split("train")
        sw.append(sample_columns(200))
        w.add_split(sw)
        raise RuntimeError("source broke")
    assert storage.list() == {}
    with pytest.raises(StoreNotFoundError):
        hpstore.open(str(tmp_path))


def test_writer_closed_without_commit_leaves_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    with StoreWriter(storage, layout=SMALL) as w:
        sw = w.split("train")
        sw.append(sample_columns(100))
        w.add_split(sw)
    assert storage.list() == {}


def test_existing_store_is_refused_without_overwrite(tmp_path: Path) -> None:
    m = write_store(LocalStorage(str(tmp_path)), {"train": sample_columns(50)})
    with pytest.raises(StoreExistsError, match="already exists"):
        StoreWriter(LocalStorage(str(tmp_path)))
    assert_exactly_committed(tmp_path, m)


def test_abandoned_overwrite_keeps_the_previous_store(tmp_path: Path) -> None:
    old = sample_columns(120, seed=1)
    m = write_store(LocalStorage(str(tmp_path)), {"train": old})
    with (
        pytest.raises(ValueError, match="bad batch"),
        StoreWriter(LocalStorage(str(tmp_path)), layout=SMALL, overwrite=True) as w,
    ):
        sw = w.split("train")
        sw.append(sample_columns(300, seed=2))
        w.add_split(sw)
        raise ValueError("bad batch")
    assert_exactly_committed(tmp_path, m)
    assert_reads(tmp_path, old)


def test_overwrite_keeps_the_previous_store_readable_until_commit(tmp_path: Path) -> None:
    old, new = sample_columns(120, seed=1), sample_columns(180, seed=2)
    old_m = write_store(LocalStorage(str(tmp_path)), {"train": old})
    old_ds = hpstore.open(str(tmp_path)).split("train")
    old_ds.read([0])
    seen: list[str] = []

    def just_before_commit() -> None:
        # Every object of the new generation is in place, and the store is still the old one.
        store = hpstore.open(str(tmp_path))
        assert store.manifest.generation == old_m.generation
        assert_reads(tmp_path, old)
        assert np.array_equal(old_ds[:]["image"], old["image"])
        generations = {k.split("/")[0] for k in LocalStorage(str(tmp_path)).list() if "/" in k}
        assert len(generations) == 2
        seen.append("checked")

    new_m = write_store(
        BeforeManifest(LocalStorage(str(tmp_path)), just_before_commit), {"train": new}, overwrite=True
    )
    assert seen == ["checked"]
    assert new_m.generation != old_m.generation
    assert_exactly_committed(tmp_path, new_m)  # the old generation is gone
    assert_reads(tmp_path, new)
    with pytest.raises(ObjectNotFoundError):  # a reader of the old generation must reopen
        old_ds.read(np.arange(len(old_ds)), ["image"])


def test_committed_manifest_lists_every_object_and_only_those(tmp_path: Path) -> None:
    m = write_store(LocalStorage(str(tmp_path)), {"train": sample_columns(250), "test": sample_columns(40)})
    assert_exactly_committed(tmp_path, m)
    m2 = write_store(LocalStorage(str(tmp_path)), {"test": sample_columns(10)}, overwrite=True)
    assert_exactly_committed(tmp_path, m2)
    assert hpstore.open(str(tmp_path)).splits == ["test"]


KILLED_WRITER = """
import sys
from hpstore.storage.local import LocalStorage
from hpstore.storage.wrappers import LatencyStorage
from hpstore.format.writer import Layout
from tests.support.stores import sample_columns, write_store

storage = LatencyStorage(LocalStorage(sys.argv[1]), 0.02)  # slow enough to be killed midway
layout = Layout(chunk_bytes=1024, shard_bytes=2048, workers=1, writers=1)
write_store(storage, {"train": sample_columns(2000, seed=9)}, layout=layout, overwrite=True)
"""


def test_writer_killed_midway_never_damages_the_committed_store(tmp_path: Path) -> None:
    old = sample_columns(100, seed=1)
    m = write_store(LocalStorage(str(tmp_path)), {"train": old})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while len(LocalStorage(str(tmp_path)).list()) < len(m.objects) + 20:
            assert proc.poll() is None, "the writer finished before it could be killed"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = {k.split("/")[0] for k in LocalStorage(str(tmp_path)).list()} - {MANIFEST_KEY, m.generation}
    assert len(leftovers) == 2 and LOCK_KEY in leftovers  # the killed generation and its lock
    assert hpstore.open(str(tmp_path)).manifest.generation == m.generation
    assert_reads(tmp_path, old)
    assert verify(LocalStorage(str(tmp_path)), m).ok

    new = sample_columns(60, seed=3)
    # The killed writer's lock stops the next one, with a message that names it and the way out...
    with pytest.raises(StoreLockedError, match=rf"{LOCK_KEY}.*pid {proc.pid}.*killed.*--break-lock"):
        write_store(LocalStorage(str(tmp_path)), {"train": new}, overwrite=True)
    # ...until it is broken on purpose.
    m2 = write_store(LocalStorage(str(tmp_path)), {"train": new}, overwrite=True, break_lock=True)
    assert_exactly_committed(tmp_path, m2)  # the next commit removed the leftover
    assert_reads(tmp_path, new)
