"""``python -m tools.ingest`` end to end, in-process: every source format into a real store and back,
the MNIST layout, --field / --split, existing stores, overwrites, and every kind of bad input
(exit status, one line on stderr, no store written)."""

from __future__ import annotations

import gzip
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

import hpstore
from hpstore.format.manifest import MANIFEST_KEY
from hpstore.format.verify import verify
from hpstore.storage.open import open_storage
from tests.support.ingest_data import mnist_like, read_all, write_idx, write_mnist_dir
from tools.ingest import main

SMALL = ["--chunk-bytes", "4KiB", "--shard-bytes", "16KiB", "--no-progress"]
"""Tiny chunks and shards, so small sources still span many chunks and shards."""


def ingest(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*SMALL, *argv])  # options given by a test come last and win
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, dict[str, Any]]:
    code, out, err = ingest(capsys, *argv)
    assert code == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal, no warnings
    assert out.startswith("ingest: ") and out.count("\n") == 1
    dst = argv[1] if len(argv) > 1 and not argv[1].startswith("--") else argv[0]
    report = verify(open_storage(dst), hpstore.open(dst).manifest)
    assert report.ok, report.problems
    return read_all(dst)


# -- MNIST ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_directory_becomes_train_and_test(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, gz: bool
) -> None:
    written = write_mnist_dir(tmp_path / "src", 700, 300, gz=gz)
    data = ok(capsys, str(tmp_path / "src"), str(tmp_path / "store"))
    store = hpstore.open(str(tmp_path / "store"))
    assert sorted(store.splits) == ["test", "train"]
    for split, (images, labels) in written.items():
        fields = store.split(split).fields
        assert (fields["image"].dtype, fields["image"].shape) == ("uint8", (28, 28))
        assert (fields["label"].dtype, fields["label"].shape) == ("int64", ())
        np.testing.assert_array_equal(data[split]["image"], images)
        np.testing.assert_array_equal(data[split]["label"], labels.astype(np.int64))
    source = store.manifest.source
    assert source["path"] == str(tmp_path / "src") and source["format"] == {"train": "mnist", "test": "mnist"}


def test_mnist_directory_prefers_plain_files_and_takes_the_dot_spelling(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    images, labels = mnist_like(50, 1)
    write_idx(src / "train-images.idx3-ubyte", images, gz=False)
    write_idx(src / "train-labels.idx1-ubyte", labels, gz=False)
    write_idx(src / "train-labels.idx1-ubyte.gz", labels[::-1].copy(), gz=True)  # ignored: plain wins
    data = ok(capsys, str(src), str(tmp_path / "store"))
    assert list(data) == ["train"]
    np.testing.assert_array_equal(data["train"]["label"], labels)


def test_single_idx_file_names_its_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    arr = np.arange(600, dtype=np.int16).reshape(200, 3) - 300
    path = write_idx(tmp_path / "readings-idx2-ubyte.gz", arr, gz=True)
    data = ok(capsys, str(path), str(tmp_path / "store"), "--split", "val")
    np.testing.assert_array_equal(data["val"]["data"], arr)


# -- NumPy ------------------------------------------------------------------------------------------


def test_npy_npz_and_directories_of_npy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(333, 4, 5)).astype(np.float32)
    y = rng.integers(-5, 5, 333).astype(np.int8)
    names = np.array([f"row {i}" for i in range(333)])
    np.save(tmp_path / "x.npy", x)
    np.savez_compressed(tmp_path / "xy.npz", x=x, y=y, name=names)
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "x.npy", np.asfortranarray(x))  # Fortran order is read too
    np.save(tmp_path / "dir" / "y.npy", y)

    assert ok(capsys, str(tmp_path / "x.npy"), str(tmp_path / "s1"))["train"]["x"].tolist() == x.tolist()
    data = ok(capsys, str(tmp_path / "xy.npz"), str(tmp_path / "s2"), "--codec", "lz4")["train"]
    np.testing.assert_array_equal(data["x"], x)
    np.testing.assert_array_equal(data["y"], y)
    assert data["name"] == names.tolist()
    data = ok(capsys, str(tmp_path / "dir"), str(tmp_path / "s3"), "--codec", "none")["train"]
    np.testing.assert_array_equal(data["x"], x)
    np.testing.assert_array_equal(data["y"], y)


def test_strings_with_nul_bytes_keep_numpys_values(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """NumPy strips only trailing NULs of fixed-width strings; interior NULs are data."""
    raw = np.array([b"a\x00b" * (i % 3) + b"\x00" * (i % 2) for i in range(200)])
    text = np.array(["\x00x\x00é" * (i % 4) for i in range(200)])
    np.save(tmp_path / "s.npy", raw)
    np.savez(tmp_path / "st.npz", raw=raw, text=text)
    assert ok(capsys, str(tmp_path / "s.npy"), str(tmp_path / "s1"))["train"]["s"] == raw.tolist()
    data = ok(capsys, str(tmp_path / "st.npz"), str(tmp_path / "s2"))["train"]
    assert data["raw"] == raw.tolist() and data["text"] == text.tolist()
    assert data["raw"][1] == b"a\x00b"  # not b"a"


def test_fields_from_separate_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    images, labels = mnist_like(401, 3)
    np.save(tmp_path / "images.npy", images)
    write_idx(tmp_path / "labels-idx1-ubyte.gz", labels, gz=True)
    pq.write_table(pa.table({"caption": [f"c{i}" * (i % 5) for i in range(401)]}), tmp_path / "c.parquet",
                   row_group_size=50)  # fmt: skip
    data = ok(
        capsys,
        str(tmp_path / "store"),
        "--field", f"pixels={tmp_path / 'images.npy'}",
        "--field", f"digit={tmp_path / 'labels-idx1-ubyte.gz'}",
        "--field", f"text={tmp_path / 'c.parquet'}",
        "--split", "holdout",
    )  # fmt: skip
    np.testing.assert_array_equal(data["holdout"]["pixels"], images)
    np.testing.assert_array_equal(data["holdout"]["digit"], labels)
    assert data["holdout"]["text"] == [f"c{i}" * (i % 5) for i in range(401)]
    # With SRC given, relative field paths are under it.
    data = ok(
        capsys, str(tmp_path), str(tmp_path / "s2"), "--field", "a=images.npy", "--field", "b=c.parquet"
    )
    np.testing.assert_array_equal(data["train"]["a"], images)
    source = hpstore.open(str(tmp_path / "s2")).manifest.source
    assert source["fields"] == {"a": str(tmp_path / "images.npy"), "b": str(tmp_path / "c.parquet")}


# -- tabular -----------------------------------------------------------------------------------------


def table(n: int) -> pa.Table:
    rng = np.random.default_rng(n)
    ints = rng.integers(-1000, 1000, n)
    return pa.table(
        {
            "i64": ints,
            "f32": rng.random(n, dtype=np.float32),
            "flag": ints % 3 == 0,
            "name": [f"name-{i}" for i in range(n)],
            "maybe": pa.array([None if i % 7 == 3 else i for i in range(n)], pa.int32()),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(3 * n)), 3),
            "ragged": [list(range(i % 4)) for i in range(n)],
            "point": [{"x": i, "tag": str(i)} for i in range(n)],
        }
    )


def check_table(data: dict[str, Any], t: pa.Table, store: hpstore.Store, split: str = "train") -> None:
    fields = store.split(split).fields
    for name in ("i64", "f32", "flag"):
        assert fields[name].shape == ()
        np.testing.assert_array_equal(data[name], t[name].to_numpy())
    assert fields["vec"].shape == (3,) and fields["vec"].dtype == "float64"
    np.testing.assert_array_equal(data["vec"], np.stack(t["vec"].to_pylist()))
    assert fields["maybe"].variable and fields["name"].variable  # nulls keep a numeric column variable
    assert data["maybe"] == t["maybe"].to_pylist()
    assert data["name"] == t["name"].to_pylist()
    assert [list(v) for v in data["ragged"]] == t["ragged"].to_pylist()
    assert data["point"] == t["point"].to_pylist()


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "arrow-stream", "feather-dir"])
def test_columnar_files(capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str) -> None:
    t = table(1000)
    if fmt == "parquet":
        src = tmp_path / "t.parquet"
        pq.write_table(t, src, row_group_size=128)
    elif fmt == "arrow":
        src = tmp_path / "t.arrow"
        feather.write_feather(t, src, chunksize=300)
    elif fmt == "arrow-stream":
        src = tmp_path / "t.bin"  # no telling extension: detected by its first bytes
        with pa.OSFile(str(src), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
            w.write_table(t, max_chunksize=250)
    else:
        src = tmp_path / "parts"
        src.mkdir()
        feather.write_feather(t.slice(0, 400), src / "a.feather")
        feather.write_feather(t.slice(400), src / "b.feather")
    data = ok(capsys, str(src), str(tmp_path / "store"))
    check_table(data["train"], t, hpstore.open(str(tmp_path / "store")))


@pytest.mark.parametrize("compressed", [False, True])
def test_csv_and_jsonl(capsys: pytest.CaptureFixture[str], tmp_path: Path, compressed: bool) -> None:
    n = 3000
    t = pa.table(
        {
            "id": np.arange(n),
            "score": np.linspace(0, 1, n),
            "label": [f"l{i % 13}" for i in range(n)],
            "late_null": pa.array([None if i == n - 5 else float(i) for i in range(n)]),
        }
    )
    ext = ".gz" if compressed else ""
    csv_path = tmp_path / f"t.csv{ext}"
    with (
        pa.CompressedOutputStream(str(csv_path), "gzip")
        if compressed
        else pa.OSFile(str(csv_path), "wb") as f
    ):
        pcsv.write_csv(t, f)
    json_path = tmp_path / f"t.jsonl{ext}"
    lines = "".join(json.dumps(r) + "\n" for r in t.to_pylist()).encode()
    json_path.write_bytes(gzip.compress(lines) if compressed else lines)
    for i, path in enumerate((csv_path, json_path)):
        data = ok(capsys, str(path), str(tmp_path / f"s{i}"))["train"]
        fields = hpstore.open(str(tmp_path / f"s{i}")).split("train").fields
        np.testing.assert_array_equal(data["id"], np.arange(n))
        np.testing.assert_allclose(data["score"], np.linspace(0, 1, n))
        assert data["label"] == t["label"].to_pylist()
        # A null near the end still makes the column variable: decided over the whole file.
        assert fields["late_null"].variable and data["late_null"] == t["late_null"].to_pylist()


def test_imagefolder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected = []
    for label, cls in enumerate(["cat", "dog", "zebra"]):
        for i in range(5 + label):
            sub = tmp_path / "src" / cls / ("nested" if i % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            payload = rng.bytes(int(rng.integers(10, 3000)))
            (sub / f"{i:03d}.PNG" if i == 0 else sub / f"{i:03d}.jpg").write_bytes(payload)
            expected.append((str(sub / f"{i:03d}"), payload, label))
    (tmp_path / "src" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "src" / ".hidden").mkdir()
    data = ok(capsys, str(tmp_path / "src"), str(tmp_path / "store"))["train"]
    expected.sort(key=lambda e: (e[2], e[0]))  # per class, sorted walk order
    got = sorted(zip(data["label"].tolist(), data["image"], strict=True))
    assert got == sorted((label, payload) for _, payload, label in expected)
    info = hpstore.open(str(tmp_path / "store")).split("train").fields
    assert info["label"].attrs == {"class_names": ["cat", "dog", "zebra"]}
    assert info["image"].variable and info["label"].dtype == "int64"


def test_fsspec_destination(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    x = np.arange(5000, dtype=np.float64).reshape(1000, 5)
    np.save(tmp_path / "x.npy", x)
    url = f"memory://ingest-{uuid.uuid4().hex}/store"
    data = ok(capsys, str(tmp_path / "x.npy"), url, "--storage-option", "skip_instance_cache=true")
    np.testing.assert_array_equal(data["train"]["x"], x)


# -- existing stores and overwrites -----------------------------------------------------------------


def test_existing_store_is_refused_without_overwrite_and_replaced_with_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    old, new = np.arange(100), np.arange(100, 350)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    dst = str(tmp_path / "store")
    ok(capsys, str(tmp_path / "old.npy"), dst)
    before = sorted(os.listdir(dst))
    code, out, err = ingest(capsys, str(tmp_path / "new.npy"), dst)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert sorted(os.listdir(dst)) == before
    np.testing.assert_array_equal(read_all(dst)["train"]["old"], old)
    data = ok(capsys, str(tmp_path / "new.npy"), dst, "--overwrite")
    np.testing.assert_array_equal(data["train"]["new"], new)
    assert len([n for n in os.listdir(dst) if n.startswith("data-")]) == 1  # the old generation is gone


def test_failed_overwrite_keeps_the_previous_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    written = write_mnist_dir(tmp_path / "good", 300, 100, gz=True)
    dst = str(tmp_path / "store")
    ok(capsys, str(tmp_path / "good"), dst)
    manifest_before = (tmp_path / "store" / MANIFEST_KEY).read_bytes()
    # The same layout, but the test images are cut short: this fails after train has been written.
    bad = tmp_path / "bad"
    write_mnist_dir(bad, 3000, 100, gz=True)
    data = gzip.decompress((bad / "t10k-images-idx3-ubyte.gz").read_bytes())
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    code, _, err = ingest(capsys, str(bad), dst, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "t10k-images-idx3-ubyte.gz" in err and "truncated" in err
    assert (tmp_path / "store" / MANIFEST_KEY).read_bytes() == manifest_before
    assert len([n for n in os.listdir(dst) if n.startswith("data-")]) == 1  # the new generation was removed
    np.testing.assert_array_equal(read_all(dst)["train"]["image"], written["train"][0])


def test_non_store_directory_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A directory holding only a ``data-``-named folder of someone else's is not a store: the
    name alone proves nothing (a generation of ours is ``data-<UTC stamp>-<8 hex>``)."""
    np.save(tmp_path / "x.npy", np.arange(10))
    (tmp_path / "precious" / "data-2024").mkdir(parents=True)
    (tmp_path / "precious" / "data-2024" / "keep.bin").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        code, _, err = ingest(capsys, str(tmp_path / "x.npy"), str(tmp_path / "precious"), *extra)
        assert code == 2 and "not a store" in err and "data-2024/" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path / "precious")) == ["data-2024"]
    assert (tmp_path / "precious" / "data-2024" / "keep.bin").read_text() == "keep me"


# -- bad input -------------------------------------------------------------------------------------


def _mnist(tmp_path: Path, gz: bool = True) -> Path:
    write_mnist_dir(tmp_path / "src", 2000, 200, gz=gz)
    return tmp_path / "src"


def _truncated_gzip(tmp_path: Path) -> tuple[Path, str]:
    src = _mnist(tmp_path)
    f = src / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-5000])
    return src, "train-images-idx3-ubyte.gz"


def _corrupt_gzip(tmp_path: Path) -> tuple[Path, str]:
    src = _mnist(tmp_path)
    f = src / "train-labels-idx1-ubyte.gz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    return src, "train-labels-idx1-ubyte.gz"


def _bad_magic(tmp_path: Path) -> tuple[Path, str]:
    src = _mnist(tmp_path, gz=False)
    f = src / "t10k-labels-idx1-ubyte"
    f.write_bytes(b"\x01\x02" + f.read_bytes()[2:])
    return src, "t10k-labels-idx1-ubyte"


def _short_idx(tmp_path: Path) -> tuple[Path, str]:
    src = _mnist(tmp_path, gz=False)
    f = src / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    return src, "train-images-idx3-ubyte"


def _count_mismatch(tmp_path: Path) -> tuple[Path, str]:
    src = _mnist(tmp_path)
    write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(1999, np.uint8), gz=True)
    return src, "train-labels-idx1-ubyte.gz"


def _missing_labels(tmp_path: Path) -> tuple[Path, str]:
    src = _mnist(tmp_path)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    return src, "t10k-images-idx3-ubyte.gz"


def _missing_file(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "nowhere.npy", "nowhere.npy"


def _unknown_format(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "blob.dat").write_bytes(os.urandom(1000))
    return tmp_path / "blob.dat", "blob.dat"


def _object_dtype(tmp_path: Path) -> tuple[Path, str]:
    np.save(tmp_path / "objs.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return tmp_path / "objs.npy", "objs.npy"


def _datetime_dtype(tmp_path: Path) -> tuple[Path, str]:
    np.savez(tmp_path / "t.npz", when=np.arange(5).astype("datetime64[s]"), x=np.arange(5))
    return tmp_path / "t.npz", "when.npy"


def _mixed_shapes(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "parts").mkdir()
    for name, width in (("a", 3), ("b", 4)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10 * width)), width)
        pq.write_table(pa.table({"vec": vec}), tmp_path / "parts" / f"{name}.parquet")
    return tmp_path / "parts", "b.parquet"


def _truncated_npy(tmp_path: Path) -> tuple[Path, str]:
    np.save(tmp_path / "x.npy", np.zeros((100, 10)))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[:-80])
    return tmp_path / "x.npy", "x.npy"


def _bad_csv_value(tmp_path: Path) -> tuple[Path, str]:
    rows = "".join(f"{i},{i * 2}\n" for i in range(700_000))  # several blocks: types come from the first
    (tmp_path / "t.csv").write_text("a,b\n" + rows + "x,oops\n")
    return tmp_path / "t.csv", "t.csv"


BAD_INPUTS = {
    "truncated gzip": _truncated_gzip,
    "corrupt gzip": _corrupt_gzip,
    "bad IDX magic": _bad_magic,
    "short IDX data": _short_idx,
    "images/labels count mismatch": _count_mismatch,
    "missing labels file": _missing_labels,
    "missing source": _missing_file,
    "unknown format": _unknown_format,
    "object dtype": _object_dtype,
    "datetime dtype": _datetime_dtype,
    "mixed shapes in a fixed-shape field": _mixed_shapes,
    "truncated npy": _truncated_npy,
    "bad value late in a CSV": _bad_csv_value,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_with_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    src, culprit = BAD_INPUTS[case](tmp_path)
    dst = tmp_path / "store"
    code, out, err = ingest(capsys, str(src), str(dst))
    assert code == 2, err
    assert out == ""
    assert err.startswith("ingest: error: ") and err.count("\n") == 1, err
    assert culprit in err, err
    assert "Traceback" not in err
    assert not dst.exists()  # not even an empty directory is left behind


def test_bad_fields_and_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(10))
    np.save(tmp_path / "b.npy", np.zeros(11))
    dst = str(tmp_path / "store")
    cases = [
        (
            ["--field", f"a={tmp_path / 'a.npy'}", "--field", f"b={tmp_path / 'b.npy'}"],
            "different row counts",
        ),
        (["--field", f"a/b={tmp_path / 'a.npy'}"], "cannot be a field name"),
        ([str(tmp_path / "a.npy"), "--split", ".."], "cannot be a split name"),
        ([str(tmp_path / "a.npy"), "--chunk-bytes", "10"], "too small"),
        ([str(tmp_path / "a.npy"), "--codec", "zstd", "--level", "99"], "level"),
        ([str(tmp_path / "a.npy"), "--format", "idx"], "a.npy"),
    ]
    for args, message in cases:
        argv = [args[0], dst, *args[1:]] if not args[0].startswith("--") else [dst, *args]
        code, out, err = ingest(capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err, (args, err)
        assert not os.path.exists(dst)


def test_rows_mismatch_found_while_reading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(5000))
    (tmp_path / "y.csv").write_text("y\n" + "".join(f"{i}\n" for i in range(4999)))
    dst = tmp_path / "store"
    code, _, err = ingest(
        capsys, str(dst), "--field", f"x={tmp_path / 'x.npy'}", "--field", f"y={tmp_path / 'y.csv'}"
    )
    assert code == 2 and "y.csv" in err and "4999" in err and err.count("\n") == 1
    assert not dst.exists()


def test_split_does_not_apply_to_mnist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = _mnist(tmp_path)
    code, _, err = ingest(capsys, str(src), str(tmp_path / "store"), "--split", "x")
    assert code == 2 and "--split" in err


# -- usage, messages, layout -----------------------------------------------------------------------


def test_help_shows_the_real_usage_and_every_option_explains_itself(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "python -m tools.ingest [options] SRC DST\n" in text and "[SRC DST ...]" not in text
    assert "DST --field NAME=PATH" in text
    for option, default in [
        ("--chunk-bytes", "1MiB"),
        ("--shard-bytes", "64MiB"),
        ("--codec", "zstd"),
        ("--workers", "2"),
    ]:
        block = text[text.index(option) :].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(block.split()), block
    options = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    for option in options:
        block = " ".join(text[text.index(f"  {option}") :].split("\n  -", 1)[0].split())
        assert len(block.split()) > 2, f"{option} has no help: {block!r}"


def test_header_only_csv_names_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("a,b\n")
    code, out, err = ingest(capsys, str(tmp_path / "empty.csv"), str(tmp_path / "store"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "empty.csv" in err and "no rows" in err, err
    assert not (tmp_path / "store").exists()


def test_shard_index_is_capped_at_the_real_chunk_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A split smaller than one shard gets an index for its chunks, not for a 64 MiB shard's 4096."""
    x = np.arange(30_000, dtype=np.int64)  # 240 KB: 15 chunks of 16 KiB
    np.save(tmp_path / "x.npy", x)
    dst = str(tmp_path / "store")
    ok(capsys, str(tmp_path / "x.npy"), dst, "--chunk-bytes", "16K", "--shard-bytes", "64M")
    spec = hpstore.open(dst).split("train").spec
    assert spec.num_chunks == 15 and spec.chunks_per_shard == spec.num_chunks
    manifest = hpstore.open(dst).manifest
    (shard,) = [o for k, o in manifest.objects.items() if "/x/c/" in k]
    assert shard.size < x.nbytes + 16 * spec.num_chunks + 4 + 1  # not 65 KB of index
    np.testing.assert_array_equal(read_all(dst)["train"]["x"], x)
