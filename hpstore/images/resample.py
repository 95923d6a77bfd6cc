"""Bilinear resized crops of a block of stored pixels in one compiled, GIL-free call.

``kernel()(px, crops, out, todo)`` writes, for every sample ``j`` with ``todo[j]``, the crop
``crops[j] = (top, left, height, width, flip)`` of ``px[j]`` (``(H, W, C)`` uint8) resized to
``out[j]``'s ``(oh, ow)``, mirrored when ``flip``. ``out`` is given channels-first ``(n, C, oh, ow)``:
a channels-last batch is passed as its transposed view, which the loop writes through its strides.

Why compiled: for CIFAR-sized pixels the resize itself is ~1 us a sample, and a per-sample OpenCV
call from Python costs 5-10 us, most of it in Python holding the GIL, so the transform's threads
queue on the GIL instead of using the cores (measured: two threads ran no faster than one). One
numba call per block runs without the GIL and without per-sample Python.

Sampling (OpenCV's ``INTER_LINEAR`` geometry): output pixel ``o`` reads the crop at
``s = (o + 0.5) * crop / out - 0.5``, clamped to ``[0, crop - 1]``; each pass's two weights are
quantised to 1/2048 as OpenCV's are; rows are resampled horizontally into int32 (the mirror is
applied there), then vertically, and rounded once. The result is within 1 of the exact float64
bilinear value (the tests check this) and, being integer arithmetic, the same on every machine,
thread count and block split. Without numba the caller falls back to OpenCV per sample (also
within 1 of the float64 value, not bit-identical to this loop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Kernel = Callable[..., None]

_kernel: Kernel | None = None
_missing = False
_lock = threading.Lock()


def kernel() -> Kernel | None:
    """The compiled ``resized_crops(px, crops, out, todo)``, or ``None`` without numba. Imported on
    first use (numba then compiles the loop, or loads it from its cache: ~3 s, ~0.2 s cached)."""
    global _kernel, _missing
    if _kernel is not None or _missing:
        return _kernel
    with _lock:
        if _kernel is None and not _missing:
            try:
                from hpstore.images import _kernels
            except ImportError:
                _missing = True
                return None
            _kernel = _kernels.resized_crops
        return _kernel
