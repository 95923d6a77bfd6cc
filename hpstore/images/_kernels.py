"""The compiled loop behind ``hpstore.images.resample`` (imported only when numba is installed and
a block of stored pixels is resized; see that module for the sampling it implements)."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

COEF_BITS = 11
"""Weights in 1/2048ths (OpenCV's ``INTER_RESIZE_COEF_BITS``): two passes keep int32 headroom."""

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
    rows = np.empty((px.shape[1], channels, ow), np.int32)
    for j in range(n):
        if not todo[j]:
            continue
        top, left, ch, cw, flip = crops[j, 0], crops[j, 1], crops[j, 2], crops[j, 3], crops[j, 4]
        taps(0, ch, oh, y0, y1, wy)
        taps(left, cw, ow, x0, x1, wx)
        if flip:  # the mirror is the columns' taps in reverse order (no branch in the loops)
            x0[:] = x0[::-1].copy()
            x1[:] = x1[::-1].copy()
            wx[:] = wx[::-1].copy()
        for y in range(ch):  # horizontal pass over the crop's rows, one channel plane at a time
            src = px[j, top + y]
            for c in range(channels):
                r = rows[y, c]
                for ox in range(ow):
                    v = wx[ox]
                    r[ox] = np.int32(src[x0[ox], c]) * (ONE - v) + np.int32(src[x1[ox], c]) * v
        for c in range(channels):  # vertical pass, contiguous along each output row
            for oy in range(oh):
                ra = rows[y0[oy], c]
                rb = rows[y1[oy], c]
                w = wy[oy]
                w0 = ONE - w
                dst = out[j, c, oy]
                for ox in range(ow):
                    dst[ox] = (ra[ox] * w0 + rb[ox] * w + HALF) >> SHIFT
