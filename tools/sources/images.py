"""Images at ingest: check every encoded image, optionally shrink and re-encode it, or decode it.

``with_images(splits, options)`` wraps each split whose source has the image field (``image`` by
default: an image folder's files, or a binary column of Parquet/Arrow/...) in an ``ImageSource``
(image folders always; other sources when an image option, ``--image-field`` or ``--skip-bad`` is
given):

- every image is checked by decoding it (JPEGs at 1/8 scale, which still reads every coded block,
  so a truncated file is caught); a row that is no image, or a corrupt one, fails the ingest with
  one line naming its file (or source row), or with ``skip_bad`` is left out (all its fields) and
  listed in ``ImageSource.skipped``;
- ``max_side``: images whose longer side exceeds it are shrunk to it (Pillow's DCT draft, then
  bicubic) and re-encoded as JPEG at ``quality`` (default 90); ``quality`` alone re-encodes every
  image at that quality. Smaller images keep their original bytes;
- ``decode``: the field is stored decoded, as a fixed-shape uint8 ``(H, W, 3)`` array (after any
  ``max_side``), which the loader reads with no decoding at all. Every image must then share one
  shape; the first that does not fails the ingest naming it.

Work runs on a thread pool per batch (Pillow and libjpeg-turbo release the GIL).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from hpstore.errors import InputError
from hpstore.images.decode import decode, is_jpeg
from tools.sources.base import Batch, Source, Split
from tools.sources.holdout import numbered, row_name, select

DEFAULT_QUALITY = 90
THREADS = os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    """How the image field is checked and transformed at ingest; validated here."""

    field: str = "image"
    field_given: bool = False  # --image-field named it: the column is meant to hold images
    max_side: int | None = None
    quality: int | None = None
    decode: bool = False
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise InputError(f"--image-max-side must be at least 8, got {self.max_side}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise InputError(f"--image-quality must be between 1 and 100, got {self.quality}")
        if self.decode and self.quality is not None:
            raise InputError("--image-quality does not apply with --image-decode (pixels are stored raw)")

    @property
    def given(self) -> bool:
        """Whether any image option was asked for (then the field must exist)."""
        return self.field_given or self.max_side is not None or self.quality is not None or self.decode

    def record(self) -> dict[str, Any]:
        return {
            "image_field": self.field,
            "image_max_side": self.max_side,
            "image_quality": self.quality,
            "image_decode": self.decode,
            "skip_bad": self.skip_bad,
        }


class ImageSource(Source):
    """``base`` with its image field checked and prepared as ``options`` say."""

    def __init__(self, base: Source, options: ImageOptions) -> None:
        self.base = base
        self.options = options
        self.path = base.path
        self.fields = base.fields
        self.num_rows = None if options.skip_bad else base.num_rows
        self.attrs = dict(base.attrs)
        if options.decode:
            self.attrs[options.field] = {**self.attrs.get(options.field, {}), "layout": "hwc"}
        self.skipped: list[str] = []
        self.shape: tuple[int, ...] | None = None

    def batches(self) -> Iterator[Batch]:
        name = self.options.field
        with ThreadPoolExecutor(THREADS, thread_name_prefix="hpstore-ingest-images") as pool:
            for rows, batch in numbered(self.base):
                col = batch[name]
                if not isinstance(col, pa.Array) or not (
                    pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
                ):
                    if self.options.given:
                        raise InputError(
                            f"{self.path}: field {name!r} is not a column of encoded images (binary)"
                        )
                    yield batch  # e.g. MNIST's fixed-shape "image": nothing to check
                    continue
                blobs = col.to_pylist()
                results = list(pool.map(self._prepare, blobs))
                reasons = {i: r for i, r in enumerate(results) if isinstance(r, str)}
                bad = list(reasons)
                for i, reason in reasons.items():
                    where = row_name(self.base, int(rows[i]))
                    if not self.options.skip_bad:
                        raise InputError(
                            f"{where}: not a readable image ({reason}); --skip-bad leaves such files out"
                        )
                    self.skipped.append(f"{where}: {reason}")
                if bad:
                    keep = np.ones(len(blobs), dtype=bool)
                    keep[bad] = False
                    batch, rows = select(batch, keep), rows[keep]
                    results = [r for r in results if not isinstance(r, str)]
                yield {**batch, name: self._column(results, rows)}

    def _column(self, results: Sequence[Any], rows: np.ndarray) -> Any:
        if not self.options.decode:
            return pa.array(results, pa.binary())
        for i, px in enumerate(results):
            if self.shape is None:
                self.shape = px.shape
            elif px.shape != self.shape:
                raise InputError(
                    f"{row_name(self.base, int(rows[i]))}: image is {px.shape[0]}x{px.shape[1]} but earlier "
                    f"ones are {self.shape[0]}x{self.shape[1]}; --image-decode needs one shape "
                    "(add --image-max-side, or drop --image-decode)"
                )
        if not results:
            return np.empty((0, *(self.shape or (0, 0, 3))), np.uint8)
        return np.stack(results)

    def _prepare(self, blob: bytes | None) -> bytes | np.ndarray | str:
        """The row's stored value, or the reason it cannot be used (a str)."""
        if blob is None:
            return "no value (null)"
        o = self.options
        try:
            data = np.frombuffer(blob, np.uint8)
            if o.max_side is None and o.quality is None:
                if o.decode:
                    return decode(data, gray=False)
                decode(data, gray=False, factor=8)  # a check: reads every block, decodes few pixels
                return blob
            return self._recode(blob, data)
        except UnidentifiedImageError:
            return "not a format Pillow or libjpeg-turbo reads"
        except (ValueError, OSError, Image.DecompressionBombError) as exc:
            return " ".join((str(exc).strip() or type(exc).__name__).split())

    def _recode(self, blob: bytes, data: np.ndarray) -> bytes | np.ndarray:
        o = self.options
        with Image.open(io.BytesIO(blob)) as im:
            w, h = im.size
            side = max(w, h)
            small = o.max_side is None or side <= o.max_side
            if small and o.quality is None and not o.decode:
                decode(data, gray=False, factor=8 if is_jpeg(data) else 1)  # check it, keep it
                return blob
            if not small:
                assert o.max_side is not None
                size = (max(1, round(w * o.max_side / side)), max(1, round(h * o.max_side / side)))
                im.draft("RGB", size)
                out = im.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
            else:
                out = im.convert("RGB")
        if o.decode:
            return np.asarray(out)
        b = io.BytesIO()
        out.save(b, "JPEG", quality=o.quality or DEFAULT_QUALITY)
        return b.getvalue()


def with_images(splits: list[Split], options: ImageOptions) -> list[Split]:
    """Wrap the splits whose sources hold ``options.field``; image options on a source without it
    are an error."""
    out = []
    found = False
    for s in splits:
        if options.field in s.source.fields and (
            options.given or options.skip_bad or s.format == "imagefolder"
        ):
            found = True
            out.append(Split(name=s.name, source=ImageSource(s.source, options), format=s.format))
        else:
            out.append(s)
    if not found and (options.given or options.skip_bad):
        names = sorted({f for s in splits for f in s.source.fields})
        raise InputError(
            f"image options given but no field {options.field!r} (fields: {', '.join(names)}); see --image-field"
        )
    return out


def skipped(splits: Sequence[Split]) -> list[str]:
    """What ``--skip-bad`` left out, one entry per row: ``<file>: <reason>``."""
    return [line for s in splits if isinstance(s.source, ImageSource) for line in s.source.skipped]
