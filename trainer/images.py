"""Stores of encoded images in the trainer: the loader transforms and the task's input for them.

When the input field holds encoded images (a variable-length binary field, as an image folder
ingests), the model sees ``3 x S x S`` uint8 crops, ``S = --image-size`` (default 64):
training batches go through ``RandomResizedCrop(S)`` with a flip, evaluation through
``CenterCrop(S, resize=round(S * 8 / 7))`` (the 224-from-256 convention). Normalisation constants
come from centre crops of the first samples. Stores of decoded pixels (fixed shape) are used as
they are.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hpstore.dataset import Dataset, FieldInfo
from hpstore.images import CenterCrop, RandomResizedCrop
from hpstore.images.transforms import ImageTransform

DEFAULT_IMAGE_SIZE = 64
STATS_ROWS = 512


def is_encoded(f: FieldInfo) -> bool:
    """Whether a field holds encoded image files (binary values)."""
    return bool(f.variable and f.dtype in ("binary", "large_binary"))


def transforms(ds: Dataset, field: str, size: int | None, *, train: bool) -> dict[str, ImageTransform] | None:
    """The loader's transforms for ``field`` of ``ds``, or ``None`` when it is not encoded images."""
    if not is_encoded(ds.fields[field]):
        return None
    s = size or DEFAULT_IMAGE_SIZE
    t: ImageTransform = RandomResizedCrop(s) if train else CenterCrop(s, resize=round(s * 8 / 7))
    return {field: t}


def input_stats(ds: Dataset, field: str, size: int | None) -> tuple[tuple[int, ...], float, float]:
    """``(shape, mean, std)`` of the scaled (1/255) centre crops of the first samples."""
    s = size or DEFAULT_IMAGE_SIZE
    n = min(len(ds), STATS_ROWS)
    blobs = ds.read(np.arange(n), [field])[field]
    t = CenterCrop(s, resize=round(s * 8 / 7), threads=1)
    values = pa.array(list(blobs), pa.binary())
    shape, dtype = t.output(values)
    out = np.empty((n, *shape), dtype)
    t(values, out, indices=np.arange(n), seed=0, epoch=0, field=field)
    x = out.astype(np.float64) / 255
    return shape, float(x.mean()), float(x.std()) or 1.0
