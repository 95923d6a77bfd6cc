"""Ingest sources on their own and through ``tools.ingest``: Hypothesis round trips over dtypes,
shapes and Arrow types, format detection, bounded batches, re-cut row-aligned fields, read-ahead."""

from __future__ import annotations

import datetime
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hpstore
from hpstore.errors import InputError
from tests.support.ingest_data import read_all, write_idx, write_mnist_dir
from tools.ingest import main
from tools.sources import detect_format, open_source, open_splits
from tools.sources.aligned import AlignedSource
from tools.sources.base import BATCH_BYTES, Batch, Source, batch_nbytes
from tools.sources.prefetch import prefetched

SMALL = ["--chunk-bytes", "1KiB", "--shard-bytes", "4KiB", "--no-progress"]
FIXED_DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", ">i4", ">f8",
]  # fmt: skip


def ingest_to_memory(*argv: str) -> dict[str, dict[str, Any]]:
    url = f"memory://sources-{uuid.uuid4().hex}"
    code = main([*SMALL, *argv, url] if "--field" not in argv else [*SMALL, url, *argv])
    assert code == 0
    return read_all(url)


# -- Hypothesis round trips ------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(FIXED_DTYPES),
    shape=st.tuples(st.integers(1, 200)).flatmap(
        lambda n: st.lists(st.integers(1, 4), max_size=3).map(lambda s: (n[0], *s))
    ),
    fortran=st.booleans(),
    container=st.sampled_from(["npy", "npz", "idx"]),
    data=st.data(),
)
def test_arrays_round_trip_any_dtype_and_shape(
    dtype: str, shape: tuple[int, ...], fortran: bool, container: str, data: st.DataObject
) -> None:
    arr = data.draw(hnp.arrays(np.dtype(dtype), shape))
    with tempfile.TemporaryDirectory() as tmp:
        if container == "idx" and np.dtype(dtype).name in IDX_DTYPES:
            path = write_idx(Path(tmp) / "values-idx-ubyte", arr.astype(np.dtype(dtype).name), gz=fortran)
            field = "data"
        elif container == "npz":
            path = Path(tmp) / "a.npz"
            np.savez(path, values=np.asfortranarray(arr) if fortran else arr)
            field = "values"
        else:
            path = Path(tmp) / "values.npy"
            np.save(path, np.asfortranarray(arr) if fortran else arr)
            field = "values"
        got = ingest_to_memory(str(path))["train"][field]
    assert got.dtype.name == arr.dtype.name and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


IDX_DTYPES = {"uint8", "int8", "int16", "int32", "float32", "float64"}
ARROW_TYPES = {
    "int8": pa.int8(), "uint16": pa.uint16(), "int64": pa.int64(), "float32": pa.float32(),
    "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string(), "binary": pa.binary(),
    "list": pa.list_(pa.int32()), "vec2": pa.list_(pa.float32(), 2), "mat": pa.list_(pa.list_(pa.int16(), 3), 2),
    "struct": pa.struct([("a", pa.int32()), ("b", pa.string())]), "date": pa.date32(),
}  # fmt: skip
FIXED_ARROW = {"int8", "uint16", "int64", "float32", "float64", "bool", "vec2", "mat"}


@st.composite
def tables(draw: st.DrawFn) -> tuple[pa.Table, set[str]]:
    """A table of random columns; returns it and the names of columns drawn with nulls."""
    n = draw(st.integers(1, 120))
    names = draw(st.lists(st.sampled_from(sorted(ARROW_TYPES)), min_size=1, max_size=5, unique=True))
    seed = draw(st.integers(0, 2**32 - 1))
    nullable = {c for c in names if draw(st.booleans()) and draw(st.booleans())}
    rng = np.random.default_rng(seed)
    cols = {}
    for name in names:
        t = ARROW_TYPES[name]
        values = [_value(rng, t) for _ in range(n)]
        if name in nullable:
            values[int(rng.integers(0, n))] = None
        cols[name] = pa.array(values, type=t)
    return pa.table(cols), nullable


def _value(rng: np.random.Generator, t: pa.DataType) -> Any:
    if pa.types.is_fixed_size_list(t):
        return [_value(rng, t.value_type) for _ in range(t.list_size)]
    if pa.types.is_list(t):
        return [int(x) for x in rng.integers(-9, 9, int(rng.integers(0, 4)))]
    if pa.types.is_struct(t):
        return {"a": int(rng.integers(0, 100)), "b": str(rng.integers(0, 100))}
    if pa.types.is_boolean(t):
        return bool(rng.integers(0, 2))
    if pa.types.is_integer(t):
        return int(rng.integers(0, 100))
    if pa.types.is_floating(t):
        return float(rng.normal())
    if pa.types.is_string(t):
        return "ü" * int(rng.integers(0, 5))
    if pa.types.is_binary(t):
        return rng.bytes(int(rng.integers(0, 6)))
    if pa.types.is_date(t):
        return datetime.date(2020, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 1000)))
    raise AssertionError(t)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=tables(), fmt=st.sampled_from(["parquet", "arrow"]))
def test_typed_tables_round_trip(drawn: tuple[pa.Table, set[str]], fmt: str) -> None:
    t, nullable = drawn
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"t.{fmt}"
        if fmt == "parquet":
            pq.write_table(t, path, row_group_size=17)
        else:
            feather.write_feather(t, path, chunksize=23)
        url = f"memory://sources-{uuid.uuid4().hex}"
        assert main([*SMALL, str(path), url]) == 0
    split = hpstore.open(url).split("train")
    got = split[:]
    for name in t.column_names:
        fixed = name in FIXED_ARROW and name not in nullable
        assert split.fields[name].variable is not fixed, name
        expected = t[name].to_pylist()
        if fixed:
            assert np.asarray(got[name]).tolist() == expected
        elif name == "list":
            assert [None if v is None else v.tolist() for v in got[name]] == expected
        else:
            assert got[name] == expected


# -- detection -------------------------------------------------------------------------------------


def test_detect_format_by_name_and_by_content(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path / "mnist", 5, 5, gz=True)
    np.save(tmp_path / "x.npy", np.zeros(3))
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    (tmp_path / "x.csv.gz").write_bytes(b"")
    (tmp_path / "x.ndjson").write_text("{}\n")
    feather.write_feather(pa.table({"a": [1]}), tmp_path / "x.feather")
    write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    write_idx(tmp_path / "anonymous.gz", np.zeros((3, 2), np.uint8), gz=True)
    (tmp_path / "copy-of-parquet").write_bytes((tmp_path / "x.parquet").read_bytes())
    (tmp_path / "copy-of-npy").write_bytes((tmp_path / "x.npy").read_bytes())
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "1.jpg").write_bytes(b"jpeg")
    (tmp_path / "npys").mkdir()
    np.save(tmp_path / "npys" / "a.npy", np.zeros(2))
    expected = {
        "mnist": "mnist", "x.npy": "npy", "x.npz": "npz", "x.parquet": "parquet", "x.csv.gz": "csv",
        "x.ndjson": "jsonl", "x.feather": "arrow", "labels-idx1-ubyte": "idx", "anonymous.gz": "idx",
        "copy-of-parquet": "parquet", "copy-of-npy": "npy", "imgs": "imagefolder", "npys": "npy",
    }  # fmt: skip
    assert {name: detect_format(str(tmp_path / name)) for name in expected} == expected


def test_mixed_directory_and_empty_image_class_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.csv").write_text("a\n1\n")
    (tmp_path / "mixed" / "b.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(InputError, match="csv and jsonl"):
        detect_format(str(tmp_path / "mixed"))
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "1.png").write_bytes(b"png")
    (tmp_path / "imgs" / "dog").mkdir()
    with pytest.raises(InputError, match="dog: class directory holds no image files"):
        open_source(str(tmp_path / "imgs"), "imagefolder")


# -- batches ---------------------------------------------------------------------------------------


def test_batches_are_bounded_whatever_the_source_size(tmp_path: Path) -> None:
    images = np.zeros((40_000, 28, 28), np.uint8)  # 31 MB
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(40_000, np.uint8), gz=True)
    (split,) = open_splits(str(tmp_path))
    sizes = [batch_nbytes(b) for b in split.source.batches()]
    assert sum(len(b["label"]) for b in split.source.batches()) == 40_000
    assert len(sizes) > 3 and max(sizes) <= BATCH_BYTES


class ListSource(Source):
    """A single-field source with fixed batch sizes (a fake of the real interface)."""

    def __init__(self, name: str, values: np.ndarray, step: int, known: bool = True) -> None:
        self.path, self.fields, self.values, self.step = f"{name}.src", (name,), values, step
        self.num_rows = len(values) if known else None
        self.attrs: dict[str, dict[str, Any]] = {}

    def batches(self) -> Iterator[Batch]:
        for i in range(0, len(self.values), self.step):
            yield {self.fields[0]: self.values[i : i + self.step]}


def test_aligned_fields_are_recut_to_common_rows() -> None:
    a = np.arange(1000)
    b = pa.array([str(i) for i in range(1000)])
    src = AlignedSource([("a", ListSource("a", a, 37)), ("b", ListSource("b", b, 101))])  # type: ignore[arg-type]
    batches = list(src.batches())
    assert all(len(x["a"]) == len(x["b"]) for x in batches)
    np.testing.assert_array_equal(np.concatenate([x["a"] for x in batches]), a)
    assert [v for x in batches for v in x["b"].to_pylist()] == b.to_pylist()
    short = AlignedSource([("a", ListSource("a", a, 64)), ("b", ListSource("b", a[:999], 50, known=False))])
    with pytest.raises(InputError, match=r"b.src: ends after 999 rows, but a.src has more"):
        list(short.batches())


def test_prefetch_passes_errors_in_order_and_stops_with_the_consumer() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise InputError("bad byte in source.bin")

    got = []
    with pytest.raises(InputError, match="bad byte"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1, 2]

    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for item in prefetched(endless(), depth=2):
        if item == 5:
            break
    assert closed.wait(5)  # the producer stopped and closed the source's iterator
