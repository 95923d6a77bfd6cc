"""The fast paths of hpstore.images: stored pixels handled a window at once (against a per-sample
reference built from the same draws), channels-first output equal to channels-last, the resize
policy against area averaging, the same pixels on any number of loader workers, and Normalize on
CPU tensors against a float64 reference."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import hpstore
from hpstore.images import Normalize, RandomResizedCrop, boxes, resample
from hpstore.images.decode import PNG_MAGIC, decode
from hpstore.images.transforms import _resize_into
from tests.support.images import KINDS, encode, image_bytes, picture
from tests.test_images import run, write


def raw_pixels(n: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.stack([np.asarray(picture(i, h, w)) for i in range(n)])


def exact_crops(raw: np.ndarray, size: int, idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One sample at a time, in float64: the crop from the draws, bilinear with OpenCV's geometry
    (``s = (o + 0.5) * crop / out - 0.5`` clamped into the crop), then the mirror. Not rounded."""
    u = boxes.draws(seed, epoch, idx, boxes.RANDOM_DRAWS)
    raw = raw if raw.ndim == 4 else raw[..., None]
    out = []
    for j in range(len(raw)):
        b = boxes.random_resized_box(raw.shape[1], raw.shape[2], u[j], (0.08, 1.0), (3 / 4, 4 / 3), True)
        y0, y1, wy = _axis(b.top, b.height, size)
        x0, x1, wx = _axis(b.left, b.width, size)
        f = raw[j].astype(np.float64)
        rows = f[y0] * (1 - wy)[:, None, None] + f[y1] * wy[:, None, None]
        img = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
        out.append(img[:, ::-1] if b.flip else img)
    return np.stack(out)


def _axis(start: int, length: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.clip((np.arange(n_out) + 0.5) * length / n_out - 0.5, 0, length - 1)
    i0 = np.floor(s).astype(np.int64)
    return start + i0, start + np.minimum(i0 + 1, length - 1), s - i0


def assert_within_one(got: np.ndarray, exact: np.ndarray) -> None:
    """Every pixel within 1 of the exact value, and most of them its rounding."""
    diff = np.abs(got.astype(np.float64) - exact)
    assert diff.max() <= 1.0, diff.max()
    assert (got == np.round(exact)).mean() > 0.8


@pytest.fixture(params=["compiled", "opencv"])
def resize_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways stored pixels are resized: the compiled block loop and OpenCV per sample."""
    if request.param == "compiled":
        assert resample.kernel() is not None, "numba is a test dependency"
    else:
        monkeypatch.setattr(resample, "kernel", lambda: None)
    return str(request.param)


@pytest.mark.parametrize("threads", [0, 3])
def test_stored_pixels_match_a_float64_reference(threads: int, resize_path: str) -> None:
    raw = raw_pixels(70)
    idx = np.arange(500, 570)
    want = exact_crops(raw, 32, idx, seed=4, epoch=2)
    hwc, bad = run(RandomResizedCrop(32, layout="hwc", threads=threads), raw, idx, seed=4, epoch=2)
    assert bad.size == 0
    assert_within_one(hwc, want)
    chw, _ = run(RandomResizedCrop(32, threads=threads), raw, idx, seed=4, epoch=2)
    np.testing.assert_array_equal(chw, hwc.transpose(0, 3, 1, 2))
    assert np.mean([(w != w[:, ::-1]).any() for w in want]) > 0.3  # real crops, not blank


@pytest.mark.parametrize(("shape", "size"), [((32, 32), 32), ((40, 24, 1), 16), ((20, 30, 3), 56)])
def test_compiled_resize_matches_the_reference_on_other_shapes(
    shape: tuple[int, ...], size: int, resize_path: str
) -> None:
    """Greyscale, non-square, upscaling: within 1 of float64 on both paths."""
    rgb = raw_pixels(40, shape[0], shape[1])
    raw = rgb[..., 0] if len(shape) == 2 else rgb[..., : shape[2]]
    mode = "RGB" if len(shape) == 3 and shape[2] == 3 else "L"
    idx = np.arange(40)
    got, _ = run(RandomResizedCrop(size, mode=mode, layout="hwc", threads=2), raw, idx, seed=9, epoch=1)
    assert_within_one(got, exact_crops(raw, size, idx, seed=9, epoch=1))


def test_compiled_resize_keeps_area_averaging_for_large_shrinks() -> None:
    """Crops shrunk more than LINEAR_SHRINK go through the area path, also on the compiled path."""
    raw = raw_pixels(12, 128, 128)
    idx = np.arange(12)
    t = RandomResizedCrop(8, scale=(0.9, 1.0), layout="hwc", threads=1)
    got, _ = run(t, raw, idx, seed=2)
    u = boxes.draws(2, 0, idx, boxes.RANDOM_DRAWS)
    for j in range(12):
        b = boxes.random_resized_box(128, 128, u[j], (0.9, 1.0), (3 / 4, 4 / 3), True)
        want = np.empty((8, 8, 3), np.uint8)
        _resize_into(raw[j, b.top : b.top + b.height, b.left : b.left + b.width], want)
        np.testing.assert_array_equal(got[j], want[:, ::-1] if b.flip else want)


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_whole_image_crops_are_copied_and_mirrored_along_the_width(layout: str) -> None:
    """Crops of the whole image at the output size skip the resize: copied, mirrored where drawn."""
    raw = raw_pixels(40)
    idx = np.arange(40)
    got, _ = run(RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), layout="hwc"), raw, idx, seed=5)
    u = boxes.draws(5, 0, idx, boxes.RANDOM_DRAWS)
    flips = u[:, -1] < 0.5
    assert 0 < flips.sum() < 40
    want = np.where(flips[:, None, None, None], raw[:, :, ::-1], raw)
    np.testing.assert_array_equal(got, want)
    chw, _ = run(RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), layout=layout), raw, idx, seed=5)
    np.testing.assert_array_equal(chw, want.transpose(0, 3, 1, 2) if layout == "chw" else want)


def test_stored_pixels_do_not_depend_on_how_the_window_is_cut() -> None:
    raw = raw_pixels(64)
    idx = np.arange(1000, 1064)
    whole, _ = run(RandomResizedCrop(24, threads=2), raw, idx, seed=1, epoch=7)
    parts = [
        run(RandomResizedCrop(24, threads=1), raw[a : a + 9], idx[a : a + 9], seed=1, epoch=7)[0]
        for a in range(0, 64, 9)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    perm = np.random.default_rng(3).permutation(64)
    shuffled, _ = run(RandomResizedCrop(24, threads=2), raw[perm], idx[perm], seed=1, epoch=7)
    np.testing.assert_array_equal(shuffled, whole[perm])


@pytest.mark.parametrize(
    ("stored", "mode"), [((32, 32), "RGB"), ((32, 32), "L"), ((32, 32, 3), "L"), ((32, 32, 4), "RGB")]
)
def test_stored_pixels_channel_conversion(stored: tuple[int, ...], mode: str) -> None:
    rgb = raw_pixels(10)
    raw = (
        {2: rgb[..., 0], 3: rgb}[len(stored)]
        if stored[-1] != 4
        else np.concatenate([rgb, rgb[..., :1]], axis=3)
    )
    out, _ = run(RandomResizedCrop(16, mode=mode, layout="hwc", threads=1), raw, np.arange(10))
    assert out.shape == (10, 16, 16, 1 if mode == "L" else 3)
    if mode == "L" and raw.ndim == 4:  # greyscale of the same crops as the RGB output
        rgb_out, _ = run(RandomResizedCrop(16, layout="hwc", threads=1), raw, np.arange(10))
        gray = np.stack([cv2.cvtColor(np.ascontiguousarray(o), cv2.COLOR_RGB2GRAY) for o in rgb_out])
        assert (
            np.abs(gray.astype(int) - out[..., 0]).max() <= 2
        )  # resize and conversion commute up to rounding


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_channels_first_equals_channels_last_for_encoded_images(mode: str) -> None:
    values = pa.array(image_bytes(30, sizes=(60, 200), kinds=KINDS), pa.binary())
    idx = np.arange(30)
    hwc, _ = run(RandomResizedCrop((20, 28), layout="hwc", mode=mode, threads=2), values, idx, seed=2)
    chw, _ = run(RandomResizedCrop((20, 28), layout="chw", mode=mode, threads=2), values, idx, seed=2)
    np.testing.assert_array_equal(chw, hwc.transpose(0, 3, 1, 2))


def test_resize_policy_stays_close_to_area_averaging() -> None:
    img = np.asarray(picture(5, 400, 500))
    for src in (img, img[:, :260], img[:150, :400]):  # both axes shrink a lot; one axis only; mild
        slot = np.empty((48, 48, 3), np.uint8)
        _resize_into(src, slot)
        area = cv2.resize(src, (48, 48), interpolation=cv2.INTER_AREA)
        assert np.abs(slot.astype(int) - area.astype(int)).mean() < 3
    same = np.empty((400, 500, 3), np.uint8)
    _resize_into(img, same)
    np.testing.assert_array_equal(same, img)


def test_dct_factors_match_the_single_crop_rule() -> None:
    rng = np.random.default_rng(0)
    hs, ws = rng.integers(1, 2000, 300), rng.integers(1, 2000, 300)
    for size, limit in [((64, 64), 8), ((224, 160), 8), ((32, 32), 4)]:
        got = boxes.dct_factors(hs, ws, size, limit)
        want = [
            boxes.dct_factor(boxes.Box(0, 0, int(h), int(w)), size, limit)
            for h, w in zip(hs, ws, strict=True)
        ]
        assert got.tolist() == want


@pytest.mark.parametrize("workers", [0, 3])
def test_stored_pixels_through_the_loader_on_any_number_of_workers(tmp_path: Path, workers: int) -> None:
    raw = raw_pixels(90)
    ds = write(tmp_path / "raw", {"image": raw, "label": np.arange(90, dtype=np.int64)})

    def epoch(w: int) -> tuple[np.ndarray, np.ndarray]:
        t = RandomResizedCrop(20)
        loader = hpstore.Loader(
            ds, 16, seed=6, num_workers=w, with_index=True, transforms={"image": t}, pin_memory=False
        )
        loader.set_epoch(3)
        batches = [(b["image"].numpy().copy(), b["index"].numpy().copy()) for b in loader]
        loader.close()
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    one, index = epoch(1)
    other, index2 = epoch(workers)
    np.testing.assert_array_equal(index, index2)
    np.testing.assert_array_equal(one, other)
    want = exact_crops(raw[index], 20, index, seed=6, epoch=3)
    assert_within_one(one, want.transpose(0, 3, 1, 2))


# -- Normalize -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_normalize_matches_a_float64_reference(layout: str) -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 8, 6), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64
    )[:, None, None]
    given = x if layout == "chw" else x.permute(0, 2, 3, 1).contiguous()
    got = Normalize(mean, std, layout=layout)(given)
    assert got.dtype == torch.float32 and got.shape == (4, 3, 8, 6)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    kept = Normalize(mean, std, layout=layout, to_chw=False)(given)
    assert kept.shape == given.shape


def test_normalize_scalar_constants_and_errors() -> None:
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).reshape(2, 1, 3, 3)
    got = Normalize(0.5, 0.25)(x)
    torch.testing.assert_close(got, (x.float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-5)
    torch.testing.assert_close(Normalize(10.0, 2.0, scale=1.0)(x.float()), (x.float() - 10) / 2)
    with pytest.raises(hpstore.InputError, match="layout"):
        Normalize(0.5, 0.5, layout="nchw")
    with pytest.raises(hpstore.InputError, match="std must not be 0"):
        Normalize(0.5, 0.0)
    with pytest.raises(hpstore.InputError, match="as many"):
        Normalize((0.1, 0.2), (0.1, 0.2, 0.3))
    with pytest.raises(hpstore.InputError, match="3 channel constants, the batch 1"):
        Normalize((0.1, 0.2, 0.3), 0.2)(x)
    with pytest.raises(hpstore.InputError, match="batch of images"):
        Normalize(0.5, 0.5)(torch.zeros(3, 4))


# -- PNG through OpenCV ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["png", "rgba", "palette"])
def test_png_decodes_to_the_same_pixels_as_pillow(kind: str) -> None:
    data = np.frombuffer(encode(picture(3, 40, 70), kind), np.uint8)
    assert data[:8].tobytes() == PNG_MAGIC
    want = Image.open(io.BytesIO(data.tobytes()))
    np.testing.assert_array_equal(decode(data, gray=False), np.asarray(want.convert("RGB")))
    gray = decode(data, gray=True)
    assert gray.shape == (40, 70, 1)
    assert np.abs(gray[:, :, 0].astype(int) - np.asarray(want.convert("L")).astype(int)).max() <= 1


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    px = decode(np.frombuffer(buf.getvalue(), np.uint8), gray=False)
    np.testing.assert_array_equal(px[:, :, 0], (ramp >> 8).astype(np.uint8))
    assert (px[:, :, 0] == px[:, :, 2]).all() and px.std() > 20


def test_center_boxes_match_the_single_image_rule() -> None:
    rng = np.random.default_rng(1)
    hs, ws = rng.integers(1, 900, 400), rng.integers(1, 900, 400)
    for size, resize in [((64, 64), None), ((64, 64), 73), ((24, 40), 48), ((7, 5), None)]:
        got = boxes.center_boxes(hs, ws, size, resize)
        for (h, w), row in zip(zip(hs.tolist(), ws.tolist(), strict=True), got.tolist(), strict=True):
            b = boxes.center_box(h, w, size, resize)
            assert row == [b.top, b.left, b.height, b.width, 0]


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_a_non_contiguous_output_gets_the_same_pixels(layout: str) -> None:
    encoded = pa.array(image_bytes(12, sizes=(60, 200), kinds=KINDS), pa.binary())
    for values in (encoded, raw_pixels(12)):
        t = RandomResizedCrop(16, layout=layout, threads=1)
        want, _ = run(t, values, np.arange(12))
        wide = np.zeros((*want.shape[:-1], 2 * want.shape[-1]), np.uint8)
        t(values, wide[..., ::2], indices=np.arange(12), seed=0, epoch=0, field="image")
        np.testing.assert_array_equal(wide[..., ::2], want)
