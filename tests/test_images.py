"""hpstore.images: crop boxes (pure), decoding of every supported kind, the transforms on whole
windows, and the loader running them: determinism across workers and resume, corrupt images."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import hpstore
from hpstore.format.writer import Layout, StoreWriter
from hpstore.images import CenterCrop, CorruptImageError, Decode, RandomResizedCrop, boxes
from hpstore.images.decode import decode, probe
from hpstore.storage.local import LocalStorage
from tests.support.images import KINDS, encode, image_bytes, picture

LAYOUT = Layout(chunk_bytes=8192, shard_bytes=65536, workers=1, writers=1)


def write(path: Path, cols: dict[str, Any]) -> hpstore.Dataset:
    with StoreWriter(LocalStorage(str(path)), layout=LAYOUT) as w:
        sw = w.split("train")
        sw.append(cols)
        w.add_split(sw)
        w.commit()
    return hpstore.open(str(path)).split("train")


def run(
    t: Any, values: Any, indices: np.ndarray, *, seed: int = 0, epoch: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    shape, dtype = t.output(values)
    out = np.empty((len(indices), *shape), dtype)
    bad = t(values, out, indices=indices, seed=seed, epoch=epoch, field="image")
    return out, bad


# -- boxes: pure ------------------------------------------------------------------------------------


def test_draws_depend_only_on_seed_epoch_and_index() -> None:
    idx = np.array([5, 0, 999_999_999_999, 7])
    a = boxes.draws(1, 2, idx, 6)
    assert a.shape == (4, 6) and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(boxes.draws(1, 2, idx[::-1], 6), a[::-1])
    np.testing.assert_array_equal(boxes.draws(1, 2, idx[2:3], 6), a[2:3])
    assert not np.array_equal(boxes.draws(1, 3, idx, 6), a)
    assert not np.array_equal(boxes.draws(2, 2, idx, 6), a)
    many = boxes.draws(0, 0, np.arange(20000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03


@pytest.mark.parametrize("hw", [(300, 500), (37, 1000), (1000, 20), (1, 1)])
def test_random_resized_boxes_stay_inside_and_in_range(hw: tuple[int, int]) -> None:
    h, w = hw
    u = boxes.draws(3, 0, np.arange(2000), boxes.RANDOM_DRAWS)
    got = [boxes.random_resized_box(h, w, r, (0.08, 1.0), (3 / 4, 4 / 3), True) for r in u]
    for b in got:
        assert b.top >= 0 and b.top + b.height <= h and b.left >= 0 and b.left + b.width <= w
        assert b.height >= 1 and b.width >= 1
    flips = np.mean([b.flip for b in got])
    assert 0.45 < flips < 0.55
    if hw == (300, 500):  # the sampled boxes obey scale and ratio (up to rounding)
        areas = np.array([b.height * b.width / (h * w) for b in got])
        ratios = np.array([b.width / b.height for b in got])
        assert areas.min() >= 0.07 and areas.max() <= 1.0 and ratios.min() > 0.7 and ratios.max() < 1.4


def test_center_box_matches_resize_then_crop_and_dct_factor() -> None:
    assert boxes.center_box(400, 600, (224, 224), 256) == boxes.Box(25, 125, 350, 350, False)
    assert boxes.center_box(400, 600, (224, 224), None) == boxes.Box(0, 100, 400, 400, False)
    assert boxes.dct_factor(boxes.Box(0, 0, 400, 400), (224, 224)) == 1
    assert boxes.dct_factor(boxes.Box(0, 0, 400, 460), (64, 64)) == 4
    assert boxes.dct_factor(boxes.Box(0, 0, 4000, 4000), (32, 32)) == 8


# -- decoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_decodes_to_rgb_or_gray(kind: str) -> None:
    im = picture(7, 48, 80)
    data = np.frombuffer(encode(im, kind), np.uint8)
    assert probe(data) == (48, 80)
    rgb = decode(data, gray=False)
    gray = decode(data, gray=True)
    assert rgb.shape == (48, 80, 3) and gray.shape == (48, 80, 1) and rgb.dtype == np.uint8
    want = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB")).astype(int)
    tolerance = 40 if kind == "palette" else 4
    assert np.abs(rgb.astype(int) - want).mean() < tolerance


def test_reduced_decode_is_smaller_and_close() -> None:
    data = np.frombuffer(encode(picture(1, 400, 480), "jpeg"), np.uint8)
    quarter = decode(data, gray=False, factor=4)
    assert quarter.shape == (100, 120, 3)
    full = np.asarray(Image.fromarray(decode(data, gray=False)).resize((120, 100), Image.BOX)).astype(int)
    assert np.abs(quarter.astype(int) - full).mean() < 6


@pytest.mark.parametrize("blob", [b"not an image at all", b"\xff\xd8\xff\xe0garbage", b""])
def test_garbage_raises_value_or_os_error(blob: bytes) -> None:
    with pytest.raises((ValueError, OSError)):
        decode(np.frombuffer(blob, np.uint8), gray=False)


def test_truncated_jpeg_and_png_raise() -> None:
    for kind in ("jpeg", "png"):
        data = encode(picture(2, 64, 64), kind)
        with pytest.raises((ValueError, OSError)):
            decode(np.frombuffer(data[: len(data) // 2], np.uint8), gray=False)


# -- transforms on a window --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs() -> pa.Array:
    return pa.array(image_bytes(40, sizes=(60, 200), kinds=KINDS), pa.binary())


@pytest.mark.parametrize("layout", ["chw", "hwc"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_output_shape_layout_and_mode(blobs: pa.Array, layout: str, mode: str) -> None:
    t = RandomResizedCrop((24, 32), layout=layout, mode=mode, threads=2)
    out, bad = run(t, blobs, np.arange(len(blobs)))
    c = 1 if mode == "L" else 3
    assert out.shape == ((40, c, 24, 32) if layout == "chw" else (40, 24, 32, c)) and bad.size == 0
    assert t.stats.images == 40 and out.std() > 10


def test_pixels_are_a_function_of_seed_epoch_and_index(blobs: pa.Array) -> None:
    idx = np.arange(100, 140)
    a, _ = run(RandomResizedCrop(32, threads=4), blobs, idx, seed=5, epoch=1)
    b, _ = run(RandomResizedCrop(32, threads=0), blobs, idx, seed=5, epoch=1)
    np.testing.assert_array_equal(a, b)
    perm = np.random.default_rng(0).permutation(40)  # the same rows in another order, e.g. another rank
    c, _ = run(RandomResizedCrop(32, threads=2), blobs.take(pa.array(perm)), idx[perm], seed=5, epoch=1)
    np.testing.assert_array_equal(c, a[perm])
    d, _ = run(RandomResizedCrop(32), blobs, idx, seed=5, epoch=2)
    assert (d != a).any(axis=(1, 2, 3)).mean() > 0.9


def test_flip_mirrors_the_same_crop(blobs: pa.Array) -> None:
    idx = np.arange(40)
    flipped, _ = run(RandomResizedCrop(32, flip=True, threads=1), blobs, idx)
    plain, _ = run(RandomResizedCrop(32, flip=False, threads=1), blobs, idx)
    u = boxes.draws(0, 0, idx, boxes.RANDOM_DRAWS)
    for i in range(40):
        want = plain[i][:, :, ::-1] if u[i, -1] < 0.5 else plain[i]
        np.testing.assert_array_equal(flipped[i], want)


def test_center_crop_matches_a_pil_reference() -> None:
    im = picture(3, 300, 400)
    values = pa.array([encode(im, "png")], pa.binary())
    out, _ = run(CenterCrop(64, resize=73, layout="hwc"), values, np.arange(1))
    r = 73 / 300
    small = im.resize((round(400 * r), 73), Image.BILINEAR)
    left, top = (small.width - 64) // 2, (small.height - 64) // 2
    want = np.asarray(small.crop((left, top, left + 64, top + 64))).astype(int)
    assert np.abs(out[0].astype(int) - want).mean() < 12


def test_reduced_size_decoding_is_used_and_close_to_full(blobs: pa.Array) -> None:
    big = pa.array(image_bytes(12, sizes=(400, 500), seed=4), pa.binary())
    fast, slow = CenterCrop(48, threads=1), CenterCrop(48, threads=1, reduce=False)
    a, _ = run(fast, big, np.arange(12))
    b, _ = run(slow, big, np.arange(12))
    assert fast.stats.reduced == 12 and slow.stats.reduced == 0
    assert fast.stats.decoded_pixels * 20 < slow.stats.decoded_pixels
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 8


def test_decode_same_size_and_raw_pixels() -> None:
    ims = [picture(i, 20, 30) for i in range(6)]
    values = pa.array([encode(im, "png") for im in ims], pa.binary())
    out, _ = run(Decode(layout="hwc"), values, np.arange(6))
    np.testing.assert_array_equal(out, np.stack([np.asarray(im) for im in ims]))
    raw = np.stack([np.asarray(im) for im in ims])
    chw, _ = run(Decode(), raw, np.arange(6))
    np.testing.assert_array_equal(chw, raw.transpose(0, 3, 1, 2))
    odd = pa.array([encode(ims[0], "png"), encode(picture(9, 21, 30), "png")], pa.binary())
    with pytest.raises(CorruptImageError, match=r"sample 11: .*21x30, expected 20x30"):
        run(Decode(), odd, np.array([10, 11]))


def test_bad_rows_raise_naming_sample_or_are_skipped() -> None:
    good = image_bytes(4)
    values = pa.array([good[0], good[1][:50], good[2], None, good[3]], pa.binary())
    with pytest.raises(CorruptImageError, match=r"field 'image', sample 21") as info:
        run(RandomResizedCrop(16, threads=1), values, np.arange(20, 25))
    assert info.value.index == 21 and isinstance(info.value, ValueError)
    t = RandomResizedCrop(16, on_error="skip", threads=2)
    _, bad = run(t, values, np.arange(20, 25))
    assert bad.tolist() == [1, 3] and t.stats.skipped == 2 and t.stats.images == 3


def test_options_are_checked() -> None:
    for make in (
        lambda: RandomResizedCrop(0),
        lambda: RandomResizedCrop(32, scale=(0.5, 0.1)),
        lambda: RandomResizedCrop(32, layout="nhwc"),
        lambda: CenterCrop(32, resize=16),
        lambda: Decode(on_error="ignore"),
    ):
        with pytest.raises(hpstore.InputError):
            make()


# -- in the loader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_ds(tmp_path_factory: pytest.TempPathFactory) -> hpstore.Dataset:
    n = 150
    data = image_bytes(n, sizes=(40, 120), kinds=("jpeg", "jpeg", "jpeg", "png", "gray", "cmyk"), seed=2)
    cols = {"image": pa.array(data, pa.binary()), "label": np.arange(n, dtype=np.int64)}
    return write(tmp_path_factory.mktemp("images"), cols)


def epoch_batches(loader: hpstore.Loader) -> list[dict[str, Any]]:
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_loader_delivers_transformed_batches_equal_to_the_transform(image_ds: hpstore.Dataset) -> None:
    loader = hpstore.Loader(
        image_ds, 16, seed=3, with_index=True, transforms={"image": RandomResizedCrop(24)}, pin_memory=False
    )
    loader.set_epoch(1)
    batches = epoch_batches(loader)
    assert all(b["image"].shape[1:] == (3, 24, 24) and b["image"].dtype == torch.uint8 for b in batches)
    index = torch.cat([b["index"] for b in batches]).numpy()
    assert sorted(index.tolist()) == list(range(150))
    np.testing.assert_array_equal(torch.cat([b["label"] for b in batches]).numpy(), index)
    raw = image_ds.read(index, ["image"])["image"]
    want, _ = run(RandomResizedCrop(24), pa.array(list(raw), pa.binary()), index, seed=3, epoch=1)
    np.testing.assert_array_equal(torch.cat([b["image"] for b in batches]).numpy(), want)
    assert loader.stats["image_images"] >= 150


@pytest.mark.parametrize("workers", [0, 3])
def test_resumed_epoch_gives_identical_pixels(image_ds: hpstore.Dataset, workers: int) -> None:
    def make(w: int) -> hpstore.Loader:
        return hpstore.Loader(
            image_ds, 8, seed=9, num_workers=w, transforms={"image": RandomResizedCrop(20)}, pin_memory=False
        )

    full = epoch_batches(make(1))
    first = make(2)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    first.close()
    again = make(workers)
    again.load_state_dict(state)
    rest = epoch_batches(again)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_corrupt_image_in_a_store_fails_the_loader_or_is_skipped(tmp_path: Path) -> None:
    data = image_bytes(60, seed=5)
    data[37] = data[37][: len(data[37]) // 3]
    data[41] = b"GIF89a not really"
    cols = {"image": pa.array(data, pa.binary()), "label": np.arange(60, dtype=np.int64)}
    ds = write(tmp_path / "s", cols)
    loader = hpstore.Loader(
        ds, 10, num_workers=2, transforms={"image": RandomResizedCrop(16)}, pin_memory=False
    )
    with pytest.raises(CorruptImageError, match=r"field 'image', sample (37|41)"):
        for _ in loader:
            pass
    loader.close()
    t = RandomResizedCrop(16, on_error="skip")
    loader = hpstore.Loader(ds, 10, num_workers=2, with_index=True, transforms={"image": t}, pin_memory=False)
    batches = epoch_batches(loader)
    assert [len(b["label"]) for b in batches] == [10] * 6
    labels = torch.cat([b["label"] for b in batches])
    index = torch.cat([b["index"] for b in batches])
    assert torch.equal(labels, index)  # substituted rows stay aligned across fields
    assert not {37, 41} & set(labels.tolist()) and len(set(labels.tolist())) == 58
    assert loader.stats["image_skipped"] == 2


def test_raw_pixel_field_through_the_loader(tmp_path: Path) -> None:
    raw = np.stack([np.asarray(picture(i, 32, 32)) for i in range(50)])
    ds = write(tmp_path / "raw", {"image": raw, "label": np.arange(50, dtype=np.int64)})
    loader = hpstore.Loader(ds, 25, shuffle=False, transforms={"image": Decode()}, pin_memory=False)
    got = torch.cat([b["image"] for b in loader]).numpy()
    np.testing.assert_array_equal(got, raw.transpose(0, 3, 1, 2))
    crop = hpstore.Loader(ds, 25, transforms={"image": RandomResizedCrop(16, layout="hwc")}, pin_memory=False)
    assert next(iter(crop))["image"].shape == (25, 16, 16, 3)


def test_unknown_transform_field_is_refused(image_ds: hpstore.Dataset) -> None:
    with pytest.raises(hpstore.InputError, match="nope"):
        hpstore.Loader(image_ds, 8, transforms={"nope": RandomResizedCrop(8)})
    assert hpstore.images.RandomResizedCrop is RandomResizedCrop
