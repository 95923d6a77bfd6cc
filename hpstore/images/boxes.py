"""Crop boxes: where each sample's crop lies in its image, as pure functions of the sample's draws.

Randomness is counter-based: ``draws(seed, epoch, indices, n)`` hashes (seed, epoch, global sample
index, k) with splitmix64, so a sample's crop and flip depend on nothing else: not on the worker
that decodes it, the window it falls in, or how many samples came before. A resumed epoch, or the
same epoch on any number of ranks and workers, therefore produces the very same pixels.

``random_resized_box`` follows torchvision's ``RandomResizedCrop.get_params`` (ten tries at a box of
random area and aspect ratio, then a centred box with the ratio clamped), with draws taken from the
hash instead of a global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ATTEMPTS = 10
DRAWS_PER_ATTEMPT = 4  # area, log-ratio, top, left
RANDOM_DRAWS = ATTEMPTS * DRAWS_PER_ATTEMPT + 1  # + the flip

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Box:
    """A crop in pixel coordinates of the full-size image: rows ``top:top+height``, columns
    ``left:left+width``; ``flip`` mirrors the output horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose outputs pass BigCrush as a counter hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draws(seed: int, epoch: int, indices: np.ndarray, n: int) -> np.ndarray:
    """``(len(indices), n)`` uniforms in [0, 1), a pure function of (seed, epoch, index, column)."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64) * _GOLDEN + np.uint64(1))
        key = _mix(key ^ (np.uint64(epoch & (2**64 - 1)) * _GOLDEN + np.uint64(2)))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        base = _mix(key ^ _mix(idx * _GOLDEN + np.uint64(3)))
        x = _mix(base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    u: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
) -> np.ndarray:
    """``(n, 5)`` int64 rows ``(top, left, height, width, flip)``: each sample's crop of its
    ``height x width`` image from its ``RANDOM_DRAWS`` uniforms ``u[i]``, for a whole window at once
    (no per-sample Python: this is most of the per-sample cost for small images)."""
    n = len(u)
    hh = np.asarray(heights, dtype=np.float64).reshape(n, 1)
    ww = np.asarray(widths, dtype=np.float64).reshape(n, 1)
    tries = u[:, : ATTEMPTS * DRAWS_PER_ATTEMPT].reshape(n, ATTEMPTS, DRAWS_PER_ATTEMPT)
    ua, ur, uy, ux = (tries[:, :, k] for k in range(DRAWS_PER_ATTEMPT))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = hh * ww * (scale[0] + (scale[1] - scale[0]) * ua)
    aspect = np.exp(log_lo + (log_hi - log_lo) * ur)
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    h1, w1 = h[rows, first], w[rows, first]
    H, W = hh[:, 0], ww[:, 0]
    top = np.minimum(np.floor(uy[rows, first] * (H - h1 + 1)), H - h1)
    left = np.minimum(np.floor(ux[rows, first] * (W - w1 + 1)), W - w1)
    # No try fitted: the whole image, or its centre with the ratio clamped into range.
    in_ratio = W / H
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
    fh, fw = np.clip(fh, 1, H), np.clip(fw, 1, W)
    missed = ~ok.any(axis=1)
    h1, w1 = np.where(missed, fh, h1), np.where(missed, fw, w1)
    top = np.where(missed, (H - h1) // 2, top)
    left = np.where(missed, (W - w1) // 2, left)
    flips = (u[:, -1] < 0.5) if flip else np.zeros(n, dtype=bool)
    return np.stack([top, left, h1, w1, flips], axis=1).astype(np.int64)


def random_resized_box(
    height: int,
    width: int,
    u: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
) -> Box:
    """The crop of one ``height`` x ``width`` image for its ``RANDOM_DRAWS`` uniforms ``u``."""
    row = random_resized_boxes(np.array([height]), np.array([width]), u[None, :], scale, ratio, flip)[0]
    return Box(int(row[0]), int(row[1]), int(row[2]), int(row[3]), bool(row[4]))


def center_box(height: int, width: int, size: tuple[int, int], resize: int | None) -> Box:
    """The crop that ``Resize(resize)`` (shorter side to ``resize``; ``None``: to the crop's shorter
    side) then ``CenterCrop(size)`` takes, expressed in the full-size image's pixels."""
    out_h, out_w = size
    shorter = resize if resize is not None else min(out_h, out_w)
    r = shorter / min(height, width)  # resize factor
    h = max(1, min(height, round(out_h / r)))
    w = max(1, min(width, round(out_w / r)))
    return Box((height - h) // 2, (width - w) // 2, h, w, False)


def center_boxes(
    heights: np.ndarray, widths: np.ndarray, size: tuple[int, int], resize: int | None
) -> np.ndarray:
    """``center_box`` of many images at once: ``(n, 5)`` int64 rows ``(top, left, height, width, 0)``."""
    hh = np.asarray(heights, dtype=np.int64)
    ww = np.asarray(widths, dtype=np.int64)
    out_h, out_w = size
    shorter = resize if resize is not None else min(out_h, out_w)
    r = shorter / np.minimum(hh, ww)  # resize factors, float64 as in center_box
    h = np.maximum(1, np.minimum(hh, np.round(out_h / r).astype(np.int64)))
    w = np.maximum(1, np.minimum(ww, np.round(out_w / r).astype(np.int64)))
    return np.stack([(hh - h) // 2, (ww - w) // 2, h, w, np.zeros_like(h)], axis=1)


def dct_factor(box: Box, size: tuple[int, int], limit: int = 8) -> int:
    """The largest power-of-two reduction (1, 2, 4 or 8) that keeps the crop at least as large as
    the output: libjpeg-turbo then decodes 1/factor of each side, skipping most of the IDCT work."""
    room = min(box.height / size[0], box.width / size[1])
    d = 1
    while d * 2 <= limit and d * 2 <= room:
        d *= 2
    return d


def dct_factors(heights: np.ndarray, widths: np.ndarray, size: tuple[int, int], limit: int = 8) -> np.ndarray:
    """``dct_factor`` of many crops (``heights``, ``widths``) at once, as int64."""
    room = np.minimum(np.asarray(heights) / size[0], np.asarray(widths) / size[1])
    d = np.ones(len(room), dtype=np.int64)
    for f in (2, 4, 8):
        if f <= limit:
            d[room >= f] = f
    return d
