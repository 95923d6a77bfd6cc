"""The images benchmark's own parts on synthesised files: the baseline datasets produce what the
loader produces (shapes, dtype), the decode limit runs, the crop helper keeps inside the image."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

import hpstore
from benchmarks.images import (
    PILArray,
    PILFolder,
    baseline_cpu_us,
    concurrent_decode_ms,
    decode_limit,
    decode_plans,
    folder_files,
    other_decode_seconds,
    rrc_params,
    tile_store,
)
from tests.support.images import image_folder


def test_baselines_and_limit_on_a_small_folder(tmp_path: Path) -> None:
    root = Path(
        image_folder(str(tmp_path / "src"), classes=2, per_class=4, sizes=(60, 120), kinds=("jpeg", "png"))
    )
    files = folder_files(root)
    assert len(files) == 8 and {label for _, label in files} == {0, 1}
    for draft in (False, True):
        x, label = PILFolder(files, 32, draft)[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and label == files[3][1]
    x, _ = PILArray(np.zeros((2, 32, 32, 3), np.uint8), 32)[1]
    assert x.shape == (3, 32, 32)
    assert baseline_cpu_us(PILArray(np.zeros((300, 32, 32, 3), np.uint8), 32), 300) > 0
    blobs = [Path(p).read_bytes() for p, _ in files]
    assert decode_limit(blobs, None) > 0 and decode_limit(blobs, 16) > 0
    # The other-files limit decodes the folder's PNGs (the JPEGs are in decode_limit's).
    assert any(b[:2] != b"\xff\xd8" for b in blobs)
    other_decode_seconds(blobs)


def test_rrc_params_stay_inside() -> None:
    rng = random.Random(0)
    for h, w in [(300, 500), (20, 1000), (7, 7)]:
        for _ in range(200):
            top, left, ch, cw = rrc_params(h, w, rng)
            assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w and ch > 0 and cw > 0


def test_tile_store_cuts_real_tiles_and_the_concurrent_limit_runs(tmp_path: Path) -> None:
    root = Path(image_folder(str(tmp_path / "src"), classes=2, per_class=3, sizes=(60, 120), kinds=("jpeg",)))
    store = tile_store(root, tmp_path / "tiles", 100, side=8)
    ds = hpstore.open(str(store)).split("train")
    px = ds.read(np.arange(len(ds)), ["image", "label"])
    assert px["image"].shape == (100, 8, 8, 3) and px["image"].dtype == np.uint8
    assert px["label"].tolist() == (np.arange(100) // 49 % 10).tolist()
    assert len({px["image"][i].tobytes() for i in range(100)}) > 90  # tiles of pictures, not blank
    assert tile_store(root, tmp_path / "tiles", 100, side=8) == store  # kept, not rewritten
    blobs = [Path(p).read_bytes() for p, _ in folder_files(root)]
    plans = decode_plans(blobs, 16)
    assert len(plans) == 6 and all(mh >= 0 and mw >= 0 for _, mh, mw in plans)
    assert concurrent_decode_ms(blobs, 16, 2) > 0
