"""``tools.ingest --engine dask`` on a real ``distributed.LocalCluster`` of 2 worker processes: the
store equals the single-process ingest object for object (same keys below the generation, same
sizes, same CRC32C) and row for row, also when a worker process is SIGKILLed in the middle of the
job; sources and destination on the loopback S3 server; bad sources refused with one line."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hpstore
from hpstore.checksum import crc32c_hex
from hpstore.format.manifest import MANIFEST_KEY
from hpstore.format.parts import FieldPlan, SplitPlan, assemble_split, write_part
from hpstore.format.writer import Layout, split_geometry
from hpstore.storage.base import ObjectSink, Storage
from hpstore.storage.local import LocalStorage
from hpstore.storage.wrappers import ForwardingStorage
from tests.support.s3server import SECRET, S3Server, bucket_objects, client_env, s3_server  # noqa: F401
from tools import ingest
from tools.partitions import plan_partitions

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parent.parent
LAYOUT = ["--chunk-bytes", "4KiB", "--shard-bytes", "16KiB", "--no-progress"]
"""Small shards: a few hundred partitions, so partition edges fall inside files and row groups."""


def write_parquet_dir(root: Path, *, files: int = 3, seed: int = 0) -> Path:
    """Parquet shards with row groups that do not line up with store shards, and a string column
    whose values differ in length (so variable-length chunks differ in bytes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        n = 2000 + 700 * i
        table = pa.table(
            {
                "x": rng.integers(0, 1000, n).astype("int32"),
                "v": pa.array(
                    list(rng.normal(size=(n, 4)).astype("float32")), type=pa.list_(pa.float32(), 4)
                ),
                "s": pa.array([f"row-{k}-" + "z" * (k % 13) for k in range(n)]),
            }
        )
        pq.write_table(table, root / f"part-{i:03d}.parquet", row_group_size=611, compression="zstd")
    return root


def layout_of(dst: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's objects and splits with the generation name taken out (it is per run)."""
    from hpstore.storage.open import open_storage

    doc = json.loads(open_storage(str(dst), storage_options).read(MANIFEST_KEY))
    gen = doc["generation"]
    return {
        "objects": {k.removeprefix(gen): v for k, v in doc["objects"].items()},
        "splits": json.loads(json.dumps(doc["splits"]).replace(gen, "GEN")),
    }


def run_ingest(*args: str) -> int:
    return ingest.main([*args, *LAYOUT])


@pytest.fixture(scope="module")
def cluster() -> Any:
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        yield c


def assert_same_store(a: Path | str, b: Path | str, **opts: Any) -> None:
    la, lb = layout_of(a), layout_of(b, opts.get("b_options"))
    assert la["objects"] == lb["objects"]
    assert la["splits"] == lb["splits"]
    sa, sb = hpstore.open(str(a)), hpstore.open(str(b), storage_options=opts.get("b_options"))
    for name in sa.splits:
        ra, rb = sa.split(name)[:], sb.split(name)[:]
        for field, col in ra.items():
            if isinstance(col, np.ndarray):
                np.testing.assert_array_equal(col, rb[field])
            else:
                assert list(col) == list(rb[field])


def test_plan_partitions_cover_every_shard_once() -> None:
    plan = SplitPlan(
        generation="data-x",
        split="train",
        num_samples=1001,
        chunk_rows=10,
        chunks_per_shard=3,
        fields=(),
        codec={"name": "none"},
        attrs={},
    )
    for per in (1, 2, 7, 100):
        parts = plan_partitions(plan, shards_per_partition=per)
        assert parts[0].start == 0 and parts[-1].stop == 1001
        assert all(p.stop == q.start and q.start % plan.shard_rows == 0 for p, q in itertools.pairwise(parts))
        assert sum(p.num_shards for p in parts) == plan.num_shards == 34


def test_two_workers_equal_single_process(tmp_path: Path, cluster: Any) -> None:
    src = write_parquet_dir(tmp_path / "pq")
    npy = tmp_path / "a.npy"
    np.save(npy, np.random.default_rng(1).integers(0, 255, (3001, 8, 8), dtype=np.uint8))
    for source in (src, npy):
        local, dask = tmp_path / f"{source.name}-local", tmp_path / f"{source.name}-dask"
        assert run_ingest(str(source), str(local)) == 0
        assert (
            run_ingest(str(source), str(dask), "--engine", "dask", "--scheduler", cluster.scheduler_address)
            == 0
        )
        assert_same_store(local, dask)
        listed = {p.relative_to(dask).as_posix() for p in dask.rglob("*") if p.is_file()}
        gen = json.loads((dask / MANIFEST_KEY).read_text())["generation"]
        assert listed == {MANIFEST_KEY} | {gen + k for k in layout_of(dask)["objects"]}


def test_worker_killed_mid_job(tmp_path: Path, cluster: Any) -> None:
    npy = tmp_path / "big.npy"
    np.save(npy, np.random.default_rng(2).integers(0, 255, (40000, 16, 16), dtype=np.uint8))
    local, dask = tmp_path / "local", tmp_path / "dask"
    assert run_ingest(str(npy), str(local)) == 0
    client = distributed.Client(cluster)
    pids = list(client.run(os.getpid).values())
    codes: list[int] = []
    job = threading.Thread(
        target=lambda: codes.append(
            run_ingest(str(npy), str(dask), "--engine", "dask", "--scheduler", cluster.scheduler_address)
        )
    )
    job.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(dask.glob("data-*/train/*/c/*/*")):
        time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)  # a worker with tasks in flight, shards already written
    assert job.is_alive(), "the job finished before the kill; the test proves nothing"
    job.join(240)
    client.close()
    assert codes == [0]
    assert_same_store(local, dask)


def test_s3_source_and_destination(tmp_path: Path, s3_server: S3Server) -> None:  # noqa: F811
    src = write_parquet_dir(tmp_path / "pq", files=2, seed=3)
    bucket = s3_server.create_bucket()
    c = s3_server.client()
    for f in sorted(src.iterdir()):
        c.put_object(Bucket=bucket, Key=f"src/{f.name}", Body=f.read_bytes())
    local = tmp_path / "local"
    assert run_ingest(str(src), str(local)) == 0
    opts = [
        f"endpoint_url={s3_server.endpoint}",
        f"key={s3_server.storage_options()['key']}",
        f"secret={SECRET}",
    ]
    cmd = [sys.executable, "-m", "tools.ingest", f"s3://{bucket}/src/*.parquet", f"s3://{bucket}/dst"]
    cmd += ["--engine", "dask", "--workers", "2", *LAYOUT]
    for o in opts:
        cmd += ["--source-option", o, "--storage-option", o]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert_same_store(local, f"s3://{bucket}/dst", b_options=s3_server.storage_options())
    manifest = bucket_objects(s3_server, bucket, "dst/manifest.json")["dst/manifest.json"]
    assert SECRET.encode() not in manifest
    assert json.loads(manifest)["source"]["path"] == f"s3://{bucket}/src/*.parquet"


@pytest.mark.parametrize("case", ["missing-url", "empty-glob", "mixed-schemas"])
def test_bad_sources_refused(tmp_path: Path, s3_server: S3Server, case: str) -> None:  # noqa: F811
    bucket = s3_server.create_bucket()
    src = write_parquet_dir(tmp_path / "pq", files=2)
    if case == "mixed-schemas":
        pq.write_table(pa.table({"x": pa.array(["a", "b"])}), src / "part-999.parquet")
        source = str(src / "*.parquet")
    elif case == "empty-glob":
        source = str(tmp_path / "nothing-*.parquet")
    else:
        source = f"s3://{bucket}/no/such/file.parquet"
    dst = f"s3://{bucket}/dst"
    cmd = [sys.executable, "-m", "tools.ingest", source, dst, "--engine", "dask", "--workers", "1", *LAYOUT]
    for o in (f"endpoint_url={s3_server.endpoint}", "key=hpstore-test-key-id", f"secret={SECRET}"):
        cmd += ["--source-option", o, "--storage-option", o]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ingest: error: "), out.stderr
    assert SECRET not in out.stderr
    assert {"missing-url": "no such file", "empty-glob": "matches no files", "mixed-schemas": "column"}[
        case
    ] in lines[0]
    assert not bucket_objects(s3_server, bucket)  # nothing written, nothing committed


def test_csv_is_refused_for_partitions(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    code = run_ingest(str(csv), str(tmp_path / "dst"), "--engine", "dask", "--workers", "1")
    assert code == 2
    assert not (tmp_path / "dst").exists()


def test_partitions_are_bounded_in_bytes_whatever_the_source_size() -> None:
    # The npy digits layout (28x28 uint8 + int64 label, 792 bytes a row) with the default layout:
    # a partition is one shard, at most ``shard_bytes`` of source rows for 1 GB as for 1 TB, so
    # what a task holds does not grow with the source; only the number of partitions does.
    first = {"image": np.zeros((4, 28, 28), np.uint8), "label": np.zeros(4, np.int64)}
    layout = Layout()
    largest = {}
    for source_bytes in (10**9, 10**12):
        rows = source_bytes // 792
        chunk_rows, chunks_per_shard = split_geometry(first, layout, rows)
        plan = SplitPlan(
            generation="data-x",
            split="train",
            num_samples=rows,
            chunk_rows=chunk_rows,
            chunks_per_shard=chunks_per_shard,
            fields=(
                FieldPlan(name="image", kind="array", dtype="uint8", shape=(28, 28)),
                FieldPlan(name="label", kind="array", dtype="int64"),
            ),
            codec={"name": "none"},
            attrs={},
        )
        parts = plan_partitions(plan)
        sizes = [p.rows * 792 for p in parts]
        assert sum(sizes) == rows * 792
        assert max(sizes) <= layout.shard_bytes
        assert len(parts) == math.ceil(rows * 792 / (chunk_rows * chunks_per_shard * 792))
        largest[source_bytes] = max(sizes)
    assert largest[10**9] == largest[10**12]


class _PieceLog(ForwardingStorage):
    """A local store that records the size of every piece streamed into an object."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.pieces: dict[str, list[int]] = {}

    def open_sink(self, key: str, *, durable: bool = True) -> ObjectSink:
        sink = self.inner.open_sink(key, durable=durable)
        log = self.pieces.setdefault(key, [])
        write = sink.write

        def logged(data: bytes | memoryview) -> None:
            log.append(len(data))
            write(data)

        sink.write = logged  # type: ignore[method-assign]
        return sink


def test_a_part_streams_its_shards_out_chunk_by_chunk(tmp_path: Path) -> None:
    # 4 shards of 8 chunks of 1000 rows x 64 bytes: no piece a part writes is larger than one
    # encoded chunk (so a worker never holds a shard), and each object reads back as the shard.
    data = np.random.default_rng(2).integers(0, 4, (32000, 64), dtype=np.uint8)
    plan = SplitPlan(
        generation="data-x",
        split="train",
        num_samples=len(data),
        chunk_rows=1000,
        chunks_per_shard=8,
        fields=(FieldPlan(name="x", kind="array", dtype="uint8", shape=(64,), codec={"name": "none"}),),
        codec={"name": "none"},
        attrs={},
    )
    storage = _PieceLog(LocalStorage(str(tmp_path)))
    batches = ({"x": data[i : i + 3000]} for i in range(0, len(data), 3000))
    result = write_part(storage, plan, first_shard=0, num_shards=4, batches=batches, encode_threads=2)
    assert [k for k, _, _ in result.objects] == sorted(storage.pieces)
    for key, size, crc in result.objects:
        assert len(storage.pieces[key]) == 9  # 8 chunks, then the index
        assert max(storage.pieces[key]) == 1000 * 64 + 4  # a chunk and its CRC32C trailer
        raw = (tmp_path / key).read_bytes()
        assert (len(raw), crc32c_hex(raw)) == (size, crc)
    assert sorted(p.name for p in tmp_path.rglob("*.tmp-*")) == []
    sa = assemble_split(storage, plan, [result])
    assert sa[0].num_samples == len(data)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_the_jobs_rows_and_bytes(tmp_path: Path, cluster: Any) -> None:
    # One bar for the whole job under a real cluster: its last line counts every row and every
    # source byte exactly once (running totals from the workers, then each partition's result).
    arr = np.random.default_rng(3).integers(0, 255, (5001, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    term = _Terminal()
    result = ingest.ingest(
        ingest.IngestConfig(
            src=str(tmp_path / "a.npy"),
            dst=str(tmp_path / "store"),
            chunk_bytes=4096,
            shard_bytes=65536,
            engine="dask",
            scheduler=cluster.scheduler_address,
        ),
        stream=term,
    )
    assert (result.samples, result.bytes_in) == (5001, arr.nbytes)
    last = term.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "| 5001/5001 [" in last and "rows/s" in last, last
    assert f"{arr.nbytes / 1e6:.1f} MB" in last, last
