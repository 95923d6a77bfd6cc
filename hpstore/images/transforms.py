"""Image transforms the loader runs on whole windows: decode, crop, resize, flip, into the batch buffer.

A transform is called by the loader's window builders (``hpstore.loading.batch``) once per window
with every row of its field, the rows' global sample indices, the loader's seed and the epoch, and
an uninitialised uint8 array ``out`` of shape ``(rows, *transform.output(values)[0])``. It fills
``out`` in place (no per-sample tensors, no collate) and returns the positions of rows it skipped.

Inputs: a ``binary`` Arrow column of encoded files (JPEG, PNG, ...; see ``hpstore.images.decode``)
or a fixed-shape uint8 array of decoded pixels ``(rows, H, W[, C])``, as ``tools.ingest
--image-decode`` stores them.

First the whole window is planned in the calling thread: encoded images' headers are read and
every crop (and DCT scale) is drawn in one numpy call. Then the work is split into blocks run on
the transform's own threads (``threads``): ``BLOCK_ROWS`` rows of encoded images, one block per
thread of stored pixels (resized by one compiled call per block, ``hpstore.images.resample``);
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
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from hpstore.counters import Counters
from hpstore.errors import InputError
from hpstore.images import boxes, resample
from hpstore.images.decode import CorruptImageError, decode, decode_jpeg, is_jpeg, jpeg_size, probe

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


@dataclass(frozen=True)
class _Window:
    """What a window's blocks share: every crop ``(top, left, height, width, flip)``; for encoded
    images also the full sizes, which rows are JPEG, their DCT factors and decode minimums, and the
    rows whose header failed (position -> error)."""

    crops: np.ndarray
    shapes: np.ndarray | None = None
    jpeg: np.ndarray | None = None
    factors: np.ndarray | None = None
    mins: np.ndarray | None = None
    failed: dict[int, BaseException] = field(default_factory=dict)


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
        # Stored pixels cost the same per row: one block per thread (a compiled call and a task
        # hand-off per block; 32-row blocks measured ~25% more CPU a sample). Encoded images vary
        # a lot per row, so small blocks balance the threads.
        step = BLOCK_ROWS
        if isinstance(values, np.ndarray):
            step = max(BLOCK_ROWS, -(-n // max(1, self.threads)))
        blocks = [(a, min(a + step, n)) for a in range(0, n, step)]
        # Every crop of the window is drawn in one numpy call (per block, the fixed cost of the
        # vectorised draw was ~10 us a sample at 32 rows): stored pixels share one shape; encoded
        # images have their headers read first (~7 us each, in this thread).
        if isinstance(values, np.ndarray):
            h, w = values.shape[1], values.shape[2]
            window = _Window(self.boxes(np.full(n, h), np.full(n, w), u, size))
        else:
            window = self._plan(n, row, u, size)

        # OpenCV writes only into contiguous arrays (the loader's batch buffers are).
        target = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)

        def run(block: tuple[int, int]) -> list[int]:
            return self._block(block, row, window, target, size, indices, field, values)

        pool = self._executor() if len(blocks) > 1 else None
        results = list(pool.map(run, blocks)) if pool is not None else [run(b) for b in blocks]
        if target is not out:
            np.copyto(out, target)
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
        window: _Window,
        out: np.ndarray,
        size: tuple[int, int],
        indices: np.ndarray,
        field: str,
        values: pa.Array | np.ndarray,
    ) -> list[int]:
        t0 = time.thread_time()
        a, b = block
        if isinstance(values, np.ndarray):
            failed, reduced, pixels = self._raw(values[a:b], window.crops[a:b], out[a:b], size)
        else:
            failed, reduced, pixels = self._encoded(a, b, row, window, out, size)
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

    def _plan(self, n: int, row: Row, u: np.ndarray, size: tuple[int, int]) -> _Window:
        """Headers of the window's encoded images, then every crop and DCT scale at once."""
        t0 = time.thread_time()
        failed: dict[int, BaseException] = {}
        shapes = np.ones((n, 2), dtype=np.int64)
        jpeg = np.zeros(n, dtype=bool)
        for i in range(n):
            data = row(i)
            try:
                if data is None:
                    raise ValueError("the value is null")
                jpeg[i] = jp = is_jpeg(data)
                h, w = jpeg_size(data) if jp else probe(data)
                shapes[i] = h, w
                self._check(h, w, size)
            except (ValueError, OSError) as exc:
                failed[i] = exc
        crops = self.boxes(shapes[:, 0], shapes[:, 1], u, size)
        factors = boxes.dct_factors(crops[:, 2], crops[:, 3], size) if self.reduce else np.ones(n, np.int64)
        factors[~jpeg] = 1
        # libjpeg-turbo's 1/d scale: the smallest output that keeps ceil(side / d) pixels.
        mins = np.where(factors[:, None] > 1, -(-shapes // factors[:, None]), 0)
        self.stats.add(seconds=time.thread_time() - t0)
        return _Window(crops, shapes, jpeg, factors, mins, failed)

    def _encoded(
        self, a: int, b: int, row: Row, window: _Window, out: np.ndarray, size: tuple[int, int]
    ) -> tuple[dict[int, BaseException], int, int]:
        """Decode, crop, resize and flip rows ``a:b`` of encoded images into ``out[a:b]``."""
        failed = {i - a: exc for i, exc in window.failed.items() if a <= i < b}
        gray = self.mode == "L"
        chw = self.layout == "chw"
        # "chw": each sample is resized channels-last into one scratch image, then split into the
        # slot's planes (cv2.split: 14 us for 224 px against 57 us for numpy's transposed copy).
        scratch = np.empty((*size, self.channels), np.uint8) if chw else None
        reduced = pixels = 0
        assert window.shapes is not None and window.jpeg is not None
        assert window.factors is not None and window.mins is not None
        for j, ((h, w), (top, left, ch, cw, flip), d, jp, (mh, mw)) in enumerate(
            zip(
                window.shapes[a:b].tolist(),
                window.crops[a:b].tolist(),
                window.factors[a:b].tolist(),
                window.jpeg[a:b].tolist(),
                window.mins[a:b].tolist(),
                strict=True,
            )
        ):
            if j in failed:
                continue
            data = row(a + j)
            assert data is not None  # a null row failed in _plan
            try:
                img = (
                    decode_jpeg(data, gray=gray, min_height=mh, min_width=mw)
                    if jp
                    else decode(data, gray=gray)
                )
                ih, iw = img.shape[0], img.shape[1]
                if d == 1:
                    y0, x0, y1, x1 = top, left, top + ch, left + cw
                else:
                    fy, fx = ih / h, iw / w
                    y0, x0 = int(top * fy), int(left * fx)
                    y1 = max(y0 + 1, min(ih, round((top + ch) * fy)))
                    x1 = max(x0 + 1, min(iw, round((left + cw) * fx)))
                slot = out[a + j]
                hwc = slot if scratch is None else scratch
                _resize_into(img[y0:y1, x0:x1], hwc)
                if flip:
                    _flip(hwc)
                if scratch is not None:
                    _planes(scratch, slot)
                reduced += d > 1
                pixels += ih * iw
            except (ValueError, OSError, cv2.error) as exc:
                failed[j] = exc
        return failed, reduced, pixels

    def _raw(
        self, px: np.ndarray, crops: np.ndarray, out: np.ndarray, size: tuple[int, int]
    ) -> tuple[dict[int, BaseException], int, int]:
        """Crop, resize and flip a block of stored pixels ``(rows, H, W[, C])`` into ``out`` (the
        block's output slots, in the transform's layout). All samples share one shape, so the crops
        were drawn for the whole window and the channel conversion is done once per block. The
        resize is one compiled GIL-free call for the block (``hpstore.images.resample``; 256 crops
        of 32x32 on one thread: ~5 us a sample against ~10 for the per-sample OpenCV loop, which
        also holds the GIL for most of its time); without numba, OpenCV per sample."""
        n, h, w = px.shape[0], px.shape[1], px.shape[2]
        try:
            self._check(h, w, size)
            px = _as_channels(px, self.channels)
        except ValueError as exc:
            return dict.fromkeys(range(n), exc), 0, 0
        oh, ow = size
        chw = self.layout == "chw"
        whole = (crops[:, 0] == 0) & (crops[:, 1] == 0) & (crops[:, 2] == h) & (crops[:, 3] == w)
        flips = crops[:, 4].astype(bool)
        if (h, w) == size and whole.all():  # nothing to resize (Decode, or a crop of the full size)
            np.copyto(out, px.transpose(0, 3, 1, 2) if chw else px)
            if flips.any():  # mirror the width axis: last for "chw", before the channels for "hwc"
                out[flips] = out[flips][..., ::-1] if chw else out[flips][:, :, ::-1]
            return {}, 0, 0
        # Beyond LINEAR_SHRINK two taps would alias: those samples take the area path below.
        wide = np.maximum(crops[:, 2] / oh, crops[:, 3] / ow) > LINEAR_SHRINK
        compiled = resample.kernel()
        if compiled is not None:
            compiled(px, crops, out if chw else out.transpose(0, 3, 1, 2), ~wide)
            for j in np.flatnonzero(wide).tolist():
                self._raw_one(px[j], crops[j].tolist(), out[j], chw)
            return {}, 0, 0
        for j, box in enumerate(crops.tolist()):
            self._raw_one(px[j], box, out[j], chw)
        return {}, 0, 0

    def _raw_one(self, px: np.ndarray, box: list[int], slot: np.ndarray, chw: bool) -> None:
        """One sample of stored pixels through OpenCV (``_resize_into``), into its output slot."""
        top, left, ch, cw, flip = box
        hwc = np.empty((*slot.shape[1:], slot.shape[0]), np.uint8) if chw else slot
        _resize_into(px[top : top + ch, left : left + cw], hwc)
        if flip:
            _flip(hwc)
        if chw:
            _planes(hwc, slot)

    def _check(self, height: int, width: int, size: tuple[int, int]) -> None:
        """Refuse an image this transform cannot use (``ValueError``)."""


def _as_channels(px: np.ndarray, channels: int) -> np.ndarray:
    """A block of stored pixels ``(rows, H, W)`` or ``(rows, H, W, C)`` as ``(rows, H, W, channels)``."""
    if px.ndim == 3:
        px = px[..., None]
    c = px.shape[-1]
    if c == channels:
        return px
    if channels == 3 and c == 1:
        return np.repeat(px, 3, axis=-1)
    if channels == 3 and c == 4:
        return px[..., :3]
    if channels == 1 and c in (3, 4):
        rgb = np.ascontiguousarray(px[..., :3]).reshape(-1, px.shape[2], 3)
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).reshape(*px.shape[:3], 1)
    raise ValueError(f"stored pixels have {c} channels; expected 1, 3 or 4")


LINEAR_SHRINK = 3.0
"""Largest shrink resized bilinearly in one pass. Beyond it, 2x2 box averages halve the image
first (OpenCV's fast integer path) and only the rest is interpolated; a general area resize
(``INTER_AREA`` at a fractional ratio) is left for an axis that alone shrinks more than this.
Bilinear up to 3x reads 2 of every <= 3 source pixels: on the benchmark's photographs its output
differs from area averaging by 0.5 of 255 on average, and it costs a fifth (20 against 130 us
for a 64-px crop)."""


def _resize_into(src: np.ndarray, slot: np.ndarray) -> None:
    """Resize ``src`` (h, w, c) to ``slot``'s (oh, ow, c), written in place (no temporary)."""
    oh, ow = slot.shape[0], slot.shape[1]
    sh, sw = src.shape[0], src.shape[1]
    if sh == oh and sw == ow:
        np.copyto(slot, src.reshape(slot.shape))
        return
    while min(sh / oh, sw / ow) >= 2 and max(sh / oh, sw / ow) > LINEAR_SHRINK:
        sh, sw = sh // 2, sw // 2
        src = cv2.resize(src[: 2 * sh, : 2 * sw], (sw, sh), interpolation=cv2.INTER_AREA)
        if sh == oh and sw == ow:
            np.copyto(slot, src.reshape(slot.shape))
            return
    shrink = max(sh / oh, sw / ow)
    interp = cv2.INTER_AREA if shrink > LINEAR_SHRINK else cv2.INTER_LINEAR
    # OpenCV writes into ``dst`` when its shape and type fit (always here), else it returns a new array.
    target = slot if slot.shape[2] > 1 else slot[:, :, 0]
    got = cv2.resize(src, (ow, oh), dst=target, interpolation=interp)
    if got is not target:
        np.copyto(slot, got.reshape(slot.shape))


def _flip(img: np.ndarray) -> None:
    """Mirror one (h, w, c) image in place."""
    view = img if img.shape[2] > 1 else img[:, :, 0]
    got = cv2.flip(view, 1, dst=view)
    if got is not view:
        np.copyto(img, got.reshape(img.shape))


def _planes(img: np.ndarray, slot: np.ndarray) -> None:
    """Write one (h, w, c) image channels-first into ``slot`` (c, h, w)."""
    if img.shape[2] == 1:
        np.copyto(slot[0], img[:, :, 0])
        return
    planes = [slot[k] for k in range(slot.shape[0])]
    if cv2.split(img, planes)[0] is not planes[0]:  # OpenCV wrote elsewhere (a non-contiguous slot)
        np.copyto(slot, img.transpose(2, 0, 1))


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
        return boxes.center_boxes(heights, widths, size, self.resize)

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
