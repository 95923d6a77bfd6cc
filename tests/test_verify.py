"""verify() and the reader catch damage to a store: bit flips, truncation, missing and stray objects."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

import hpstore
from hpstore.errors import CorruptObjectError, ManifestError
from hpstore.format.manifest import MANIFEST_KEY, Manifest
from hpstore.format.verify import verify
from hpstore.storage.local import LocalStorage
from hpstore.storage.open import open_storage
from tests.support.stores import flip_bit, sample_columns, write_store

N = 300


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest]:
    return tmp_path, write_store(LocalStorage(str(tmp_path)), {"train": sample_columns(N)})


def chunk_range(root: Path, field: str, chunk: int) -> tuple[str, int, int]:
    ds = hpstore.open(str(root)).split("train")
    (rng,) = ds.reader.ranges(field, [chunk])
    return rng


def test_clean_store_verifies_and_counts(store: tuple[Path, Manifest]) -> None:
    root, m = store
    seen: list[int] = []
    report = verify(LocalStorage(str(root)), m, progress=seen.append)
    assert report.ok and report.problems == ()
    assert report.objects == report.objects_read == len(m.objects)
    assert report.bytes_read == sum(seen) == m.total_bytes
    assert report.seconds > 0
    assert "OK" in report.summary()


def test_objects_are_streamed_in_blocks(store: tuple[Path, Manifest]) -> None:
    """Memory is bounded by the block size: a large object is read as many ranges, not at once."""
    root, m = store
    storage = LocalStorage(str(root))
    report = verify(storage, m, block_bytes=1000, workers=3)
    assert report.ok
    assert storage.stats.read_requests == sum(math.ceil(o.size / 1000) for o in m.objects.values())
    assert storage.stats.bytes_read == m.total_bytes


def test_bit_flip_in_a_zarr_shard(store: tuple[Path, Manifest]) -> None:
    root, m = store
    key, start, end = chunk_range(root, "image", 5)
    flip_bit(str(root / key), (start + end) // 2, bit=3)

    report = verify(LocalStorage(str(root)), m)
    assert [(p.kind, p.key) for p in report.problems] == [("corrupt", key)]
    assert f"manifest says {m.objects[key].crc32c}" in report.problems[0].detail

    ds = hpstore.open(str(root)).split("train")  # sizes are unchanged: the listing check passes
    ds.read(np.arange(ds.spec.chunk_rows))  # other chunks still read
    with pytest.raises(CorruptObjectError, match="checksum mismatch in chunk") as exc:
        ds.read(np.arange(N), ["image"])
    assert exc.value.key == key
    assert str(exc.value).startswith(key)


def test_bit_flip_in_a_shard_index(store: tuple[Path, Manifest]) -> None:
    root, m = store
    key, _, _ = chunk_range(root, "label", 0)
    flip_bit(str(root / key), m.objects[key].size - 10)
    assert [(p.kind, p.key) for p in verify(LocalStorage(str(root)), m).problems] == [("corrupt", key)]
    with pytest.raises(CorruptObjectError, match="shard index checksum mismatch") as exc:
        hpstore.open(str(root)).split("train")[0]
    assert exc.value.key == key


def test_bit_flip_in_an_arrow_part(store: tuple[Path, Manifest]) -> None:
    root, m = store
    key, _start, end = chunk_range(root, "text", 3)
    flip_bit(str(root / key), end - 5, bit=6)
    report = verify(LocalStorage(str(root)), m)
    assert [(p.kind, p.key) for p in report.problems] == [("corrupt", key)]
    with pytest.raises(CorruptObjectError, match="checksum mismatch in record batch") as exc:
        hpstore.open(str(root)).split("train").read(np.arange(N), ["text"])
    assert exc.value.key == key


def test_bit_flip_outside_any_chunk_is_caught_by_verify(store: tuple[Path, Manifest]) -> None:
    """The Arrow footer is never read by hpstore's reader; the whole-object checksum still covers it."""
    root, m = store
    key = m.splits["train"].fields["blob"].parts[0].key
    flip_bit(str(root / key), m.objects[key].size - 12)
    assert [(p.kind, p.key) for p in verify(LocalStorage(str(root)), m).problems] == [("corrupt", key)]


def test_truncated_shard(store: tuple[Path, Manifest]) -> None:
    root, m = store
    key, _, _ = chunk_range(root, "image", 0)
    size = m.objects[key].size
    os.truncate(root / key, size - 100)
    report = verify(LocalStorage(str(root)), m)
    assert [(p.kind, p.key) for p in report.problems] == [("truncated", key)]
    assert report.problems[0].detail == f"{size - 100} bytes, manifest says {size}"
    with pytest.raises(ManifestError, match=f"size mismatch for {key}"):
        hpstore.open(str(root))


def test_every_problem_is_named(store: tuple[Path, Manifest]) -> None:
    root, m = store
    shards = sorted(k for k in m.objects if "/image/c/" in k)
    parts = [p.key for p in m.splits["train"].fields["ragged"].parts]
    flip_bit(str(root / shards[0]), 40)
    flip_bit(str(root / parts[1]), 200)
    (root / shards[1]).unlink()
    os.truncate(root / shards[2], 10)
    with open(root / parts[0], "ab") as f:
        f.write(b"more")
    stray = f"{m.generation}/train/image/stray.tmp"
    (root / stray).write_bytes(b"x")

    report = verify(LocalStorage(str(root)), m)
    assert sorted((p.kind, p.key) for p in report.problems) == sorted(
        [
            ("corrupt", shards[0]),
            ("corrupt", parts[1]),
            ("missing", shards[1]),
            ("truncated", shards[2]),
            ("resized", parts[0]),
            ("extra", stray),
        ]
    )
    assert not report.ok and "6 problem(s)" in report.summary()
    assert report.objects_read == len(m.objects) - 3  # missing and resized objects are not read


def test_objects_the_manifest_uses_but_does_not_list(store: tuple[Path, Manifest]) -> None:
    root, _m = store
    key, _, _ = chunk_range(root, "label", 0)
    doc = json.loads((root / MANIFEST_KEY).read_text())
    del doc["objects"][key]
    manifest = Manifest.from_json(json.dumps(doc))
    report = verify(LocalStorage(str(root)), manifest)
    assert sorted((p.kind, p.key) for p in report.problems) == [("extra", key), ("unlisted", key)]


def test_other_generations_are_not_this_stores_problem(store: tuple[Path, Manifest]) -> None:
    """A leftover of a killed writer (another generation) is invisible to readers and to verify."""
    root, m = store
    (root / "data-leftover" / "train").mkdir(parents=True)
    (root / "data-leftover" / "train" / "x").write_bytes(b"half")
    assert verify(LocalStorage(str(root)), m).ok
    hpstore.open(str(root))


def test_verify_over_fsspec_memory() -> None:
    name = f"hpstore-verify-{uuid.uuid4().hex}"
    url = f"memory://{name}/store"
    storage = open_storage(url)
    m = write_store(storage, {"train": sample_columns(120)})
    try:
        assert verify(storage, m).ok
        key = sorted(k for k in m.objects if "/image/c/" in k)[0]
        data = bytearray(storage.read(key))
        data[20] ^= 0x10
        storage.write(key, bytes(data))
        assert [(p.kind, p.key) for p in verify(storage, m, workers=2).problems] == [("corrupt", key)]
    finally:
        fsspec.filesystem("memory").rm(name, recursive=True)
