"""The compiled loop behind ``hpstore.images.resample`` (imported only when numba is installed and
a block of stored pixels is resized; see that module for the sampling it implements)."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from hpstore.images.resample import COEF_BITS

ONE = 1 << COEF_BITS
HALF = 1 << (2 * COEF_BITS - 1)
SHIFT = 2 * COEF_BITS


@numba.njit(nogil=True, cache=True, boundscheck=False)
def taps(start: int, length: int, n_out: int, i0: Any, i1: Any, w1: Any) -> None:
    """Source positions ``i0``, ``i1`` (offset by ``start``) and the second one's weight, per output."""
    scale = length / n_out
    for o in range(n_out):
        s = (o + 0.5) * scale - 0.5
        if s < 0.0:
            s = 0.0
        k = int(s)
        if k >= length - 1:
            i0[o] = start + length - 1
            i1[o] = start + length - 1
            w1[o] = 0
        else:
            i0[o] = start + k
            i1[o] = start + k + 1
            w1[o] = int((s - k) * ONE + 0.5)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def resized_crops(px: Any, crops: Any, out: Any, todo: Any) -> None:
    """``out[j]`` (C, oh, ow) = crop ``crops[j]`` of ``px[j]`` (H, W, C), resized, for ``todo[j]``."""
    n = px.shape[0]
    channels, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    y0 = np.empty(oh, np.int64)
    y1 = np.empty(oh, np.int64)
    wy = np.empty(oh, np.int32)
    x0 = np.empty(ow, np.int64)
    x1 = np.empty(ow, np.int64)
    wx = np.empty(ow, np.int32)
    rows = np.empty((channels, px.shape[1], ow), np.int32)
    for j in range(n):
        if not todo[j]:
            continue
        top, left, ch, cw, flip = crops[j, 0], crops[j, 1], crops[j, 2], crops[j, 3], crops[j, 4]
        taps(0, ch, oh, y0, y1, wy)
        taps(left, cw, ow, x0, x1, wx)
        for y in range(ch):  # horizontal pass over the crop's rows, mirrored when flip
            src = px[j, top + y]
            for ox in range(ow):
                tx = ow - 1 - ox if flip else ox
                p = x0[ox]
                q = x1[ox]
                v = wx[ox]
                for c in range(channels):
                    rows[c, y, tx] = np.int32(src[p, c]) * (ONE - v) + np.int32(src[q, c]) * v
        for c in range(channels):  # vertical pass, contiguous along each output row
            for oy in range(oh):
                ra = rows[c, y0[oy]]
                rb = rows[c, y1[oy]]
                w = wy[oy]
                w0 = ONE - w
                dst = out[j, c, oy]
                for ox in range(ow):
                    dst[ox] = (ra[ox] * w0 + rb[ox] * w + HALF) >> SHIFT
