"""Ingest of images: checks and --skip-bad, re-encoding, decoded pixels, Parquet columns of image
bytes, and --holdout on any source; each run through the real CLI entry point."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import hpstore
from hpstore.images import RandomResizedCrop
from tests.support.images import encode, image_bytes, image_folder, picture
from tools.ingest import ingest as run_ingest
from tools.ingest import main, parse_args
from tools.sources.holdout import row_hash, threshold


def ingest(*args: str) -> int:
    return main([*args, "--no-progress"])


def test_image_folder_of_every_kind_ingests_and_loads(tmp_path: Path) -> None:
    src = image_folder(str(tmp_path / "src"), kinds=("jpeg", "png", "gray", "cmyk", "rgba", "palette"))
    assert ingest(src, str(tmp_path / "st")) == 0
    ds = hpstore.open(str(tmp_path / "st")).split("train")
    assert len(ds) == 24 and ds.fields["label"].attrs["class_names"] == ["class0", "class1", "class2"]
    loader = hpstore.Loader(ds, 8, transforms={"image": RandomResizedCrop(16)}, pin_memory=False)
    assert sum(len(b["image"]) for b in loader) == 24


def test_bad_file_fails_with_one_line_and_writes_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    src = image_folder(str(tmp_path / "src"))
    bad = os.path.join(src, "class1", "img003.jpg")
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated JPEG
    with open(os.path.join(src, "class2", "notes.png"), "w") as f:
        f.write("not an image")
    assert ingest(src, str(tmp_path / "st")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img003.jpg" in err[0] and "--skip-bad" in err[0]
    assert not os.path.exists(tmp_path / "st")
    buf = io.StringIO()
    run_ingest(parse_args([src, str(tmp_path / "st"), "--skip-bad", "--no-progress"]), stream=buf)
    err = buf.getvalue()
    assert "skipped 2 unreadable image(s)" in err and "img003.jpg" in err and "notes.png" in err
    ds = hpstore.open(str(tmp_path / "st")).split("train")
    assert len(ds) == 23  # 24 good files, one truncated left out; labels stay with their images
    labels = ds.read(np.arange(len(ds)), ["label"])["label"]
    assert np.bincount(labels).tolist() == [8, 7, 8]


def test_max_side_and_quality_reencode(tmp_path: Path) -> None:
    src = image_folder(str(tmp_path / "src"), sizes=(100, 300), kinds=("jpeg", "png"))
    assert ingest(src, str(tmp_path / "st"), "--image-max-side", "64", "--image-quality", "60") == 0
    ds = hpstore.open(str(tmp_path / "st")).split("train")
    for blob in ds.read(np.arange(len(ds)), ["image"])["image"]:
        im = Image.open(io.BytesIO(blob))
        assert im.format == "JPEG" and max(im.size) <= 64
    record = hpstore.open(str(tmp_path / "st")).manifest.source["options"]
    assert record["image_max_side"] == 64 and record["image_quality"] == 60


def test_decode_stores_fixed_shape_pixels(tmp_path: Path) -> None:
    src = image_folder(str(tmp_path / "src"), sizes=(32, 32), kinds=("png",))
    assert ingest(src, str(tmp_path / "st"), "--image-decode") == 0
    ds = hpstore.open(str(tmp_path / "st")).split("train")
    f = ds.fields["image"]
    assert not f.variable and tuple(f.shape) == (32, 32, 3) and f.dtype == "uint8"
    want = np.asarray(Image.open(os.path.join(src, "class0", "img000.png")).convert("RGB"))
    np.testing.assert_array_equal(ds.read(np.array([0]), ["image"])["image"][0], want)
    mixed = image_folder(str(tmp_path / "mixed"), sizes=(30, 40))
    assert ingest(mixed, str(tmp_path / "st2"), "--image-decode") == 2
    assert not os.path.exists(tmp_path / "st2")


def test_parquet_column_of_image_bytes(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    blobs = image_bytes(20, sizes=(50, 90))
    blobs[7] = b"garbage"
    table = pa.table({"img": pa.array(blobs, pa.binary()), "y": np.arange(20)})
    pq.write_table(table, tmp_path / "t.parquet")
    assert ingest(str(tmp_path / "t.parquet"), str(tmp_path / "st"), "--image-field", "img") == 2
    assert "t.parquet: row 7" in capfd.readouterr().err
    assert (
        ingest(str(tmp_path / "t.parquet"), str(tmp_path / "st"), "--image-field", "img", "--skip-bad") == 0
    )
    ds = hpstore.open(str(tmp_path / "st")).split("train")
    assert 7 not in ds.read(np.arange(len(ds)), ["y"])["y"].tolist() and len(ds) == 19
    assert ingest(str(tmp_path / "t.parquet"), str(tmp_path / "x"), "--image-max-side", "32") == 2
    assert "no field 'image'" in capfd.readouterr().err


def test_holdout_is_seeded_exact_and_works_for_any_source(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(1000, dtype=np.int64))
    assert (
        ingest(str(tmp_path / "x.npy"), str(tmp_path / "st"), "--holdout", "0.1", "--holdout-seed", "4") == 0
    )
    store = hpstore.open(str(tmp_path / "st"))
    train = store.split("train").read(np.arange(900), ["x"])["x"]
    test = store.split("test").read(np.arange(100), ["x"])["x"]
    assert len(store.split("train")) == 900 and len(store.split("test")) == 100
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(1000))
    cut = threshold(0.1, 4, 1000)
    np.testing.assert_array_equal(np.flatnonzero(row_hash(4, np.arange(1000)) < cut), test)
    assert (
        ingest(str(tmp_path / "x.npy"), str(tmp_path / "st2"), "--holdout", "0.1", "--holdout-seed", "4") == 0
    )
    again = hpstore.open(str(tmp_path / "st2")).split("test").read(np.arange(100), ["x"])["x"]
    np.testing.assert_array_equal(again, test)
    assert ingest(str(tmp_path / "x.npy"), str(tmp_path / "st3"), "--holdout", "1.5") == 2


def test_photo_helpers_make_distinct_images() -> None:
    a, b = picture(0, 30, 40), picture(1, 30, 40)
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b)).mean() > 10
    assert encode(a, "cmyk")[:2] == b"\xff\xd8"
