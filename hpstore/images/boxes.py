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


def random_resized_box(
    height: int,
    width: int,
    u: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: bool,
) -> Box:
    """The crop of an ``height`` x ``width`` image for one sample's ``RANDOM_DRAWS`` uniforms ``u``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    flipped = bool(flip and u[-1] < 0.5)
    for t in range(ATTEMPTS):
        ua, ur, uy, ux = u[t * DRAWS_PER_ATTEMPT : (t + 1) * DRAWS_PER_ATTEMPT]
        target = area * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(uy * (height - h + 1)), height - h)
            left = min(int(ux * (width - w + 1)), width - w)
            return Box(top, left, h, w, flipped)
    # Fallback: the whole image, or its centre with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return Box((height - h) // 2, (width - w) // 2, h, w, flipped)


def center_box(height: int, width: int, size: tuple[int, int], resize: int | None) -> Box:
    """The crop that ``Resize(resize)`` (shorter side to ``resize``; ``None``: to the crop's shorter
    side) then ``CenterCrop(size)`` takes, expressed in the full-size image's pixels."""
    out_h, out_w = size
    shorter = resize if resize is not None else min(out_h, out_w)
    r = shorter / min(height, width)  # resize factor
    h = max(1, min(height, round(out_h / r)))
    w = max(1, min(width, round(out_w / r)))
    return Box((height - h) // 2, (width - w) // 2, h, w, False)


def dct_factor(box: Box, size: tuple[int, int], limit: int = 8) -> int:
    """The largest power-of-two reduction (1, 2, 4 or 8) that keeps the crop at least as large as
    the output: libjpeg-turbo then decodes 1/factor of each side, skipping most of the IDCT work."""
    room = min(box.height / size[0], box.width / size[1])
    d = 1
    while d * 2 <= limit and d * 2 <= room:
        d *= 2
    return d
