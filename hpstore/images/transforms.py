"""Image transforms the loader runs on whole windows: decode, crop, resize, flip, into the batch buffer.

A transform is called by the loader's window builders (``hpstore.loading.batch``) once per window
with every row of its field, the rows' global sample indices, the loader's seed and the epoch, and
an uninitialised uint8 array ``out`` of shape ``(rows, *transform.output(values)[0])``. It fills
``out`` in place (no per-sample tensors, no collate) and returns the positions of rows it skipped.

Inputs: a ``binary`` Arrow column of encoded files (JPEG, PNG, ...; see ``hpstore.images.decode``)
or a fixed-shape uint8 array of decoded pixels ``(rows, H, W[, C])``, as ``tools.ingest
--image-decode`` stores them.

Work is split into blocks of ``BLOCK_ROWS`` rows run on the transform's own threads (``threads``);
decoding, resizing and copying release the GIL, so threads scale with cores. The random draws of
each sample are a pure function of ``(seed, epoch, sample index)`` (``hpstore.images.boxes``), so
the output does not depend on threads, workers or where an epoch was resumed.

Errors: a row that cannot be decoded raises ``CorruptImageError`` naming the field and the sample
(``on_error="raise"``, the default); with ``on_error="skip"`` it is counted in ``stats.skipped`` and
returned, and the loader fills its slot with another row of the same window (all fields alike).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from hpstore.counters import Counters
from hpstore.errors import InputError
from hpstore.images import boxes
from hpstore.images.boxes import Box
from hpstore.images.decode import CorruptImageError, decode, is_jpeg, probe

BLOCK_ROWS = 32
"""Rows per task on the transform's threads: small enough to balance, large enough to amortise."""

LAYOUTS = ("chw", "hwc")
MODES = ("RGB", "L")
ON_ERROR = ("raise", "skip")

Row = Callable[[int], np.ndarray | None]


@dataclass
class ImageStats(Counters):
    """What a transform did (cumulative over every loader that uses it)."""

    images: int = 0
    skipped: int = 0
    reduced: int = 0  # JPEGs decoded at 1/2, 1/4 or 1/8 size
    decoded_pixels: int = 0
    seconds: float = 0.0  # thread time spent in the transform, summed over its threads


def _size(size: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise InputError(f"{what} must be a positive int or (height, width), got {size!r}")
    return pair[0], pair[1]


def rows_of(values: pa.Array | np.ndarray) -> tuple[int, Row]:
    """``(count, row)``: ``row(i)`` is row i's encoded bytes (a uint8 view, no copy) or decoded
    pixels, ``None`` for a null."""
    if isinstance(values, np.ndarray):
        arr = values
        return len(arr), lambda i: arr[i]
    t = values.type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise InputError(f"image transforms need a binary column of encoded images, got {t}")
    _, off_buf, data_buf = values.buffers()
    off_type = np.int64 if pa.types.is_large_binary(t) else np.int32
    off = np.frombuffer(off_buf, dtype=off_type)[values.offset : values.offset + len(values) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    valid = values.is_valid().to_numpy(zero_copy_only=False) if values.null_count else None

    def row(i: int) -> np.ndarray | None:
        if valid is not None and not valid[i]:
            return None
        return data[off[i] : off[i + 1]]

    return len(values), row


class ImageTransform:
    """The machinery every image transform shares; subclasses choose the crop box (``box``)."""

    draws = 0  # uniforms each sample needs from ``boxes.draws``

    def __init__(
        self,
        size: int | tuple[int, int] | None,
        *,
        layout: str = "chw",
        mode: str = "RGB",
        on_error: str = "raise",
        threads: int | None = None,
        reduce: bool = True,
    ) -> None:
        if layout not in LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if on_error not in ON_ERROR:
            raise InputError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if threads is not None and threads < 0:
            raise InputError(f"threads must be >= 0, got {threads}")
        self.size = _size(size, "size") if size is not None else None
        self.layout = layout
        self.mode = mode
        self.channels = 1 if mode == "L" else 3
        self.on_error = on_error
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        self.reduce = reduce
        self.stats = ImageStats()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    # -- what subclasses define -------------------------------------------------------------------

    def boxes(
        self, heights: np.ndarray, widths: np.ndarray, u: np.ndarray, size: tuple[int, int]
    ) -> np.ndarray:
        """``(n, 5)`` int64 crops ``(top, left, height, width, flip)`` in full-size pixels."""
        raise NotImplementedError

    # -- the loader's side of the contract ----------------------------------------------------------

    @property
    def row_bytes(self) -> int:
        """Output bytes per row (0 while unknown), for the loader's read-ahead budget."""
        return self.channels * self.size[0] * self.size[1] if self.size is not None else 0

    def output(self, values: pa.Array | np.ndarray) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """Per-row shape and dtype of what the transform writes."""
        h, w = self._out_size(values)
        shape = (self.channels, h, w) if self.layout == "chw" else (h, w, self.channels)
        return shape, np.dtype(np.uint8)

    def __call__(
        self,
        values: pa.Array | np.ndarray,
        out: np.ndarray,
        *,
        indices: np.ndarray,
        seed: int,
        epoch: int,
        field: str,
    ) -> np.ndarray:
        """Fill ``out`` (rows, *output shape) from ``values``; return the positions skipped."""
        n, row = rows_of(values)
        if isinstance(values, np.ndarray) and values.ndim not in (3, 4):
            raise InputError(f"field {field!r}: decoded images must be (rows, H, W[, C]), got {values.shape}")
        size = self._out_size(values)
        u = boxes.draws(seed, epoch, indices, self.draws) if self.draws else np.empty((n, 0))
        blocks = [(a, min(a + BLOCK_ROWS, n)) for a in range(0, n, BLOCK_ROWS)]

        def run(block: tuple[int, int]) -> list[int]:
            return self._block(block, row, u, out, size, indices, field)

        pool = self._executor() if len(blocks) > 1 else None
        results = list(pool.map(run, blocks)) if pool is not None else [run(b) for b in blocks]
        return np.array([i for bad in results for i in bad], dtype=np.int64)

    # -- internals -----------------------------------------------------------------------------------

    def _out_size(self, values: pa.Array | np.ndarray) -> tuple[int, int]:
        assert self.size is not None, "transforms without a size define _out_size"
        return self.size

    def _executor(self) -> ThreadPoolExecutor | None:
        if self.threads < 2:
            return None
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive fork
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hpstore-images")
                self._pool_pid = os.getpid()
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    def _block(
        self,
        block: tuple[int, int],
        row: Row,
        u: np.ndarray,
        out: np.ndarray,
        size: tuple[int, int],
        indices: np.ndarray,
        field: str,
    ) -> list[int]:
        t0 = time.thread_time()
        a, b = block
        failed: dict[int, BaseException] = {}
        datas: list[np.ndarray | None] = []
        shapes = np.ones((b - a, 2), dtype=np.int64)
        for j in range(b - a):  # headers first: the crop boxes of the block are drawn at once
            data = row(a + j)
            datas.append(data)
            try:
                if data is None:
                    raise ValueError("the value is null")
                shapes[j] = probe(data) if data.ndim == 1 else data.shape[:2]
                self._check(int(shapes[j, 0]), int(shapes[j, 1]), size)
            except (ValueError, OSError) as exc:
                failed[j] = exc
        crops = self.boxes(shapes[:, 0], shapes[:, 1], u[a:b], size).tolist()  # Python ints, once
        dims = shapes.tolist()
        reduced = pixels = 0
        for j, data in enumerate(datas):
            if j in failed or data is None:
                continue
            try:
                r, p = self._one(data, dims[j], crops[j], out[a + j], size)
                reduced += r
                pixels += p
            except (ValueError, OSError, cv2.error) as exc:
                failed[j] = exc
        bad: list[int] = []
        for j in sorted(failed):
            if self.on_error == "raise":
                raise CorruptImageError(field, int(indices[a + j]), _problem(failed[j])) from failed[j]
            bad.append(a + j)
        self.stats.add(
            images=b - a - len(bad),
            skipped=len(bad),
            reduced=reduced,
            decoded_pixels=pixels,
            seconds=time.thread_time() - t0,
        )
        return bad

    def _check(self, height: int, width: int, size: tuple[int, int]) -> None:
        """Refuse an image this transform cannot use (``ValueError``)."""

    def _one(
        self, data: np.ndarray, shape: list[int], crop: list[int], slot: np.ndarray, size: tuple[int, int]
    ) -> tuple[int, int]:
        """Decode, crop, resize and flip one sample into ``slot``; ``(reduced, decoded pixels)``.
        ``crop`` is ``(top, left, height, width, flip)`` in full-size pixels."""
        h, w = shape
        top, left, ch, cw, flip = crop
        encoded = data.ndim == 1
        d = 1
        if encoded:
            if self.reduce and is_jpeg(data):
                d = boxes.dct_factor(Box(top, left, ch, cw), size)
            img = decode(data, gray=self.mode == "L", factor=d, size=(h, w))
        else:
            img = _as_channels(data, self.channels)
        if d == 1:
            y0, x0, y1, x1 = top, left, top + ch, left + cw
        else:
            fy, fx = img.shape[0] / h, img.shape[1] / w
            y0, x0 = int(top * fy), int(left * fx)
            y1 = max(y0 + 1, min(img.shape[0], round((top + ch) * fy)))
            x1 = max(x0 + 1, min(img.shape[1], round((left + cw) * fx)))
        _resize_into(img[y0:y1, x0:x1], slot, size, bool(flip), self.layout)
        return int(d > 1), int(img.shape[0] * img.shape[1]) if encoded else 0


def _as_channels(px: np.ndarray, channels: int) -> np.ndarray:
    """Stored pixels ``(H, W)`` or ``(H, W, C)`` as ``(H, W, channels)``."""
    if px.ndim == 2:
        px = px[:, :, None]
    c = px.shape[2]
    if c == channels:
        return px
    if channels == 3 and c == 1:
        return np.repeat(px, 3, axis=2)
    if channels == 3 and c == 4:
        return px[:, :, :3]
    if channels == 1 and c in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(px[:, :, :3]), cv2.COLOR_RGB2GRAY)[:, :, None]
    raise ValueError(f"stored pixels have {c} channels; expected 1, 3 or 4")


def _resize_into(src: np.ndarray, slot: np.ndarray, size: tuple[int, int], flip: bool, layout: str) -> None:
    """Resize ``src`` (h, w, c) to ``size`` and write it, mirrored if ``flip``, into ``slot``."""
    oh, ow = size
    c = src.shape[2]
    if src.shape[0] == oh and src.shape[1] == ow:
        img = src
    else:
        # Bilinear when shrinking by at most 2x (DCT scaling sees to that for JPEG crops); area
        # averaging beyond, where bilinear would alias.
        shrink = max(src.shape[0] / oh, src.shape[1] / ow)
        interp = cv2.INTER_AREA if shrink > 2 else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(src) if c > 4 else src, (ow, oh), interpolation=interp)
        if img.ndim == 2:
            img = img[:, :, None]
    if flip:
        img = img[:, ::-1]
    if layout == "chw":
        np.copyto(slot, img.transpose(2, 0, 1))
    else:
        np.copyto(slot, img)


def _problem(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


class RandomResizedCrop(ImageTransform):
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` plus a horizontal flip with
    probability 1/2 (``flip=True``): a box of random area fraction in ``scale`` and aspect ratio in
    ``ratio``, resized to ``size``. JPEGs decode at the smallest DCT scale that keeps the box at
    least ``size``."""

    draws = boxes.RANDOM_DRAWS

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(size, **options)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise InputError(f"scale must satisfy 0 < low <= high <= 1, got {scale!r}")
        if not (0 < ratio[0] <= ratio[1]):
            raise InputError(f"ratio must satisfy 0 < low <= high, got {ratio!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = bool(flip)

    def boxes(
        self, heights: np.ndarray, widths: np.ndarray, u: np.ndarray, size: tuple[int, int]
    ) -> np.ndarray:
        return boxes.random_resized_boxes(heights, widths, u, self.scale, self.ratio, self.flip)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


class CenterCrop(ImageTransform):
    """Evaluation crop: resize the shorter side to ``resize`` (``None``: to the crop's shorter side),
    then take the central ``size``; no randomness."""

    def __init__(self, size: int | tuple[int, int], resize: int | None = None, **options: Any) -> None:
        super().__init__(size, **options)
        if resize is not None and (not isinstance(resize, int) or resize < 1):
            raise InputError(f"resize must be a positive int or None, got {resize!r}")
        if resize is not None and self.size is not None and resize < min(self.size):
            raise InputError(f"resize {resize} is smaller than the crop {self.size}")
        self.resize = resize

    def boxes(
        self, heights: np.ndarray, widths: np.ndarray, u: np.ndarray, size: tuple[int, int]
    ) -> np.ndarray:
        out = np.zeros((len(heights), 5), dtype=np.int64)
        for j, (h, w) in enumerate(zip(heights.tolist(), widths.tolist(), strict=True)):
            b = boxes.center_box(h, w, size, self.resize)
            out[j, :4] = (b.top, b.left, b.height, b.width)
        return out

    def __repr__(self) -> str:
        return f"CenterCrop({self.size}, resize={self.resize})"


class Decode(ImageTransform):
    """Full-size decode of images that all share one shape (``size``; ``None``: the first image's).
    An image of another shape counts as a bad row (error, or skipped with ``on_error="skip"``)."""

    def __init__(self, size: int | tuple[int, int] | None = None, **options: Any) -> None:
        options.setdefault("reduce", False)
        super().__init__(size, **options)

    def boxes(
        self, heights: np.ndarray, widths: np.ndarray, u: np.ndarray, size: tuple[int, int]
    ) -> np.ndarray:
        n = len(heights)
        return np.stack([np.zeros(n), np.zeros(n), heights, widths, np.zeros(n)], axis=1).astype(np.int64)

    def _out_size(self, values: pa.Array | np.ndarray) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        if isinstance(values, np.ndarray):
            return int(values.shape[1]), int(values.shape[2])
        n, row = rows_of(values)
        for i in range(n):
            data = row(i)
            if data is None:
                continue
            try:
                return probe(data)
            except (ValueError, OSError):
                continue
        raise InputError("Decode(): no readable image to take the output size from; give size=")

    def _check(self, height: int, width: int, size: tuple[int, int]) -> None:
        if (height, width) != size:
            raise ValueError(
                f"image is {height}x{width}, expected {size[0]}x{size[1]} (Decode needs one size)"
            )

    def __repr__(self) -> str:
        return f"Decode({self.size})"
