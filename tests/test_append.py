"""``tools.ingest --append``: rows added to a split, or as a new split, in a new generation that
reuses the committed objects without rewriting them (inode, mtime and bytes unchanged); readers
opened before the append keep reading their rows; a bad schema or a killed append leaves the store
as it was; the Dask engine appends exactly what the single process appends; the same on the
loopback S3 server; every segment stays readable with plain zarr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

import hpstore
from hpstore.format.commit import LOCK_KEY
from hpstore.format.manifest import MANIFEST_KEY, Manifest
from hpstore.format.verify import verify
from hpstore.storage.open import open_storage
from tests.support.s3server import SECRET, S3Server, bucket_objects, s3_server  # noqa: F401
from tools import ingest

REPO = Path(__file__).resolve().parent.parent
LAYOUT = ["--chunk-bytes", "4KiB", "--shard-bytes", "16KiB", "--no-progress"]
"""Small shards: the first store ends inside a shard, so an append rewrites a partial one."""


def write_parquet(path: Path, n: int, seed: int, *, x_type: str = "int32") -> pa.Table:
    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "x": rng.integers(0, 1000, n).astype(x_type),
            "v": pa.array(list(rng.normal(size=(n, 4)).astype("float32")), type=pa.list_(pa.float32(), 4)),
            "s": pa.array([f"r{seed}-{k}-" + "z" * (k % 11) for k in range(n)]),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=700)
    return table


def rows_of(dst: str | Path, split: str = "train", **opts: Any) -> dict[str, Any]:
    return hpstore.open(str(dst), **opts).split(split)[:]


def assert_rows(got: dict[str, Any], tables: list[pa.Table]) -> None:
    want = pa.concat_tables(tables)
    np.testing.assert_array_equal(got["x"], want["x"].to_numpy())
    np.testing.assert_array_equal(got["v"], np.stack(want["v"].to_numpy(zero_copy_only=False)))
    assert list(got["s"]) == want["s"].to_pylist()


def files(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every object under ``root``: (inode, mtime_ns, bytes)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and p.name != MANIFEST_KEY:
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return out


def manifest_of(root: Path) -> Manifest:
    return Manifest.from_json((root / MANIFEST_KEY).read_bytes())


def test_append_to_a_split_and_a_new_split(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "a.parquet", 3000, 1)
    b = write_parquet(tmp_path / "b.parquet", 2100, 2)
    c = write_parquet(tmp_path / "c.parquet", 500, 3)
    dst = tmp_path / "store"
    assert ingest.main([str(tmp_path / "a.parquet"), str(dst), *LAYOUT]) == 0
    first = manifest_of(dst)
    assert first.required_version == 1 and json.loads((dst / MANIFEST_KEY).read_text())["version"] == 1
    before = files(dst)

    assert ingest.main([str(tmp_path / "b.parquet"), str(dst), "--append", *LAYOUT]) == 0
    assert ingest.main([str(tmp_path / "c.parquet"), str(dst), "--append", "--split", "val", *LAYOUT]) == 0

    # Nothing committed before was rewritten: same inode, same mtime, same bytes.
    after = files(dst)
    assert all(after[k] == v for k, v in before.items())
    m = manifest_of(dst)
    assert json.loads((dst / MANIFEST_KEY).read_text())["version"] == 2
    assert first.generation in m.generations and len(m.generations) == 3
    reused = [k for k in m.objects if k.startswith(first.generation + "/")]
    split = first.splits["train"]
    whole_shards = split.num_samples // split.shard_rows
    assert whole_shards > 0 and len(reused) == 3 * whole_shards + 2  # shards of x, v, s + 2 zarr.json
    assert all(m.objects[k] == first.objects[k] for k in reused)

    assert_rows(rows_of(dst), [a, b])
    assert_rows(rows_of(dst, "val"), [c])
    assert verify(open_storage(str(dst)), m).ok


def test_each_segment_reads_with_plain_zarr(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "a.parquet", 3000, 1)
    b = write_parquet(tmp_path / "b.parquet", 2100, 2)
    dst = tmp_path / "store"
    assert ingest.main([str(tmp_path / "a.parquet"), str(dst), *LAYOUT]) == 0
    assert ingest.main([str(tmp_path / "b.parquet"), str(dst), "--append", *LAYOUT]) == 0
    split = manifest_of(dst).splits["train"]
    f = split.fields["x"]
    assert len(f.segments) == 2
    parts = []
    for g in f.segments:
        arr = zarr.open_array(zarr.storage.LocalStore(str(dst)), path=g.path, mode="r")
        stop = min(g.stop_shard * split.shard_rows, split.num_samples)
        parts.append(arr[g.first_shard * split.shard_rows : stop])
    np.testing.assert_array_equal(np.concatenate(parts), pa.concat_tables([a, b])["x"].to_numpy())
    # Arrow parts: standalone IPC files, one record batch per chunk, in order.
    s = pa.concat_arrays(
        [
            b2.column(0)
            for p in split.fields["s"].parts
            for b2 in pa.ipc.open_file(str(dst / p.key)).read_all().to_batches()
        ]
    )
    assert s.to_pylist() == pa.concat_tables([a, b])["s"].to_pylist()


def test_reader_opened_before_the_append_keeps_its_rows(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "a.parquet", 3000, 1)
    b = write_parquet(tmp_path / "b.parquet", 2100, 2)
    dst = tmp_path / "store"
    assert ingest.main([str(tmp_path / "a.parquet"), str(dst), *LAYOUT]) == 0
    old = hpstore.open(str(dst)).split("train")
    for _ in range(2):  # a second append collects nothing the first reader reads either
        assert ingest.main([str(tmp_path / "b.parquet"), str(dst), "--append", *LAYOUT]) == 0
    assert_rows(old[:], [a])
    assert_rows(rows_of(dst), [a, b, b])


def test_schema_mismatch_is_one_line_and_commits_nothing(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", 3000, 1)
    write_parquet(tmp_path / "f.parquet", 100, 2, x_type="float64")
    dst = tmp_path / "store"
    assert ingest.main([str(tmp_path / "a.parquet"), str(dst), *LAYOUT]) == 0
    before, manifest = files(dst), (dst / MANIFEST_KEY).read_bytes()
    for engine in ("local", "dask"):
        cmd = [sys.executable, "-m", "tools.ingest", str(tmp_path / "f.parquet"), str(dst), "--append"]
        out = subprocess.run(
            [*cmd, "--engine", engine, "--workers", "1", *LAYOUT],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "field 'x' is int32[] in the store, float64[] in the source" in lines[0]
        assert (dst / MANIFEST_KEY).read_bytes() == manifest and files(dst) == before
    # Appending to a store that is not there is refused too.
    assert ingest.main([str(tmp_path / "a.parquet"), str(tmp_path / "none"), "--append", *LAYOUT]) == 2


def test_killed_append_leaves_the_old_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    small = rng.integers(0, 255, (3001, 16, 16), dtype=np.uint8)
    big = rng.integers(0, 255, (60_000, 16, 16), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "a" / "img.npy", small)
    np.save(tmp_path / "b" / "img.npy", big)
    dst = tmp_path / "store"
    layout = ["--chunk-bytes", "64KiB", "--shard-bytes", "256KiB", "--no-progress"]
    assert ingest.main([str(tmp_path / "a" / "img.npy"), str(dst), *layout]) == 0
    before, manifest = files(dst), (dst / MANIFEST_KEY).read_bytes()
    gens = set(os.listdir(dst))
    cmd = [sys.executable, "-m", "tools.ingest", str(tmp_path / "b" / "img.npy"), str(dst), "--append"]
    proc = subprocess.Popen([*cmd, *layout], cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (
        proc.poll() is None and not (set(os.listdir(dst)) - gens - {LOCK_KEY}) and time.monotonic() < deadline
    ):
        time.sleep(0.002)
    time.sleep(0.05)
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "the append finished before the kill; the test proves nothing"
    assert (dst / MANIFEST_KEY).read_bytes() == manifest
    assert {k: v for k, v in files(dst).items() if k in before} == before
    np.testing.assert_array_equal(rows_of(dst)["img"], small)
    # The next append (told the killed one is gone) succeeds and collects its leftovers.
    assert ingest.main([str(tmp_path / "b" / "img.npy"), str(dst), "--append", "--break-lock", *layout]) == 0
    np.testing.assert_array_equal(rows_of(dst)["img"], np.concatenate([small, big]))
    assert set(os.listdir(dst)) - {MANIFEST_KEY} == manifest_of(dst).generations


def normalised(root: Path) -> tuple[str, str]:
    """Splits and objects with generation names replaced by their order of first use."""
    doc = json.loads((root / MANIFEST_KEY).read_text())
    text = json.dumps([doc["splits"], doc["objects"]])
    names: list[str] = []
    for key in doc["objects"]:
        g = key.split("/")[0]
        if g != doc["generation"] and g not in names:
            names.append(g)
    text = text.replace(doc["generation"], "NEW")
    for i, g in enumerate(names):
        text = text.replace(g, f"OLD{i}")
    # Objects are listed in key order, and the key order of the generations' random names varies.
    splits, objects = json.loads(text)
    return json.dumps([splits, dict(sorted(objects.items()))]), doc["version"]


def test_dask_append_equals_local_append(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    a = write_parquet(tmp_path / "a.parquet", 3000, 1)
    b = write_parquet(tmp_path / "b" / "b0.parquet", 2100, 2)
    b1 = write_parquet(tmp_path / "b" / "b1.parquet", 1700, 4)
    local, dask = tmp_path / "local", tmp_path / "dask"
    for dst in (local, dask):
        assert ingest.main([str(tmp_path / "a.parquet"), str(dst), *LAYOUT]) == 0
    assert ingest.main([str(tmp_path / "b"), str(local), "--append", *LAYOUT]) == 0
    cmd = [sys.executable, "-m", "tools.ingest", str(tmp_path / "b"), str(dask), "--append"]
    out = subprocess.run(
        [*cmd, "--engine", "dask", "--workers", "2", *LAYOUT],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert "3800 samples" in out.stdout  # rows of the source, not the rewritten partial shard
    assert normalised(local) == normalised(dask)
    assert_rows(rows_of(dask), [a, b, b1])


def test_append_on_s3(tmp_path: Path, s3_server: S3Server) -> None:  # noqa: F811
    a = write_parquet(tmp_path / "a.parquet", 3000, 1)
    b = write_parquet(tmp_path / "b.parquet", 2100, 2)
    bucket = s3_server.create_bucket()
    dst = f"s3://{bucket}/dst"
    opts = [
        f"endpoint_url={s3_server.endpoint}",
        f"key={s3_server.storage_options()['key']}",
        f"secret={SECRET}",
    ]
    flags = [x for o in opts for x in ("--storage-option", o)]
    assert ingest.main([str(tmp_path / "a.parquet"), dst, *flags, *LAYOUT]) == 0
    c = s3_server.client()

    def stamps() -> dict[str, Any]:
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="dst/data-")
        return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}

    before, old_bytes = stamps(), bucket_objects(s3_server, bucket, "dst/data-")
    old = hpstore.open(dst, storage_options=s3_server.storage_options()).split("train")
    assert ingest.main([str(tmp_path / "b.parquet"), dst, "--append", *flags, *LAYOUT]) == 0
    after = stamps()
    assert {k: after[k] for k in before} == before
    assert {
        k: v for k, v in bucket_objects(s3_server, bucket, "dst/data-").items() if k in old_bytes
    } == old_bytes
    assert_rows(old[:], [a])
    assert_rows(rows_of(dst, storage_options=s3_server.storage_options()), [a, b])
