"""Task: what a store asks the model to do, read from its manifest and a cheap look at the data.

The input field gives the per-sample shape and dtype, the label field gives the number of classes
(its ``class_names`` attribute when the ingest recorded one, else the largest label + 1 from a scan
of the label column, which is tiny next to the images), and the first samples of the training split
give the normalisation constants. Every rank computes the same Task from the same store, so a bad
store fails on every rank alike instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpstore.dataset import Dataset, FieldInfo, Store
from hpstore.errors import InputError
from trainer import images

LABEL_SCAN_ROWS = 1 << 20
"""Rows read per request while scanning the label column."""

STATS_ROWS = 2048
"""Samples from the start of the training split used for the input mean and standard deviation."""


@dataclass(frozen=True, kw_only=True)
class Task:
    input_field: str
    target_field: str
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    class_names: tuple[str, ...] | None
    scale: float  # applied first: 1/255 for uint8 images, 1 otherwise
    mean: float  # of the scaled input
    std: float

    def describe(self) -> str:
        return (
            f"{self.input_field}: {self.input_dtype}{list(self.input_shape)} -> "
            f"{self.num_classes} classes from {self.target_field!r}"
        )


def check_split(store: Store, name: str, fields: Sequence[str]) -> Dataset:
    """The split ``name`` of ``store``, which must hold every field in ``fields``."""
    ds = store.split(name)
    missing = [f for f in fields if f not in ds.fields]
    if missing:
        raise InputError(
            f"{store.url}: split {name!r} has no field {missing[0]!r} (fields: {', '.join(ds.fields)})"
        )
    if len(ds) == 0:
        raise InputError(f"{store.url}: split {name!r} is empty")
    return ds


def build_task(
    train: Dataset,
    evals: Sequence[Dataset],
    input_field: str,
    target_field: str,
    image_size: int | None = None,
) -> Task:
    """Check the input and label fields of the splits used and derive the model's task. Encoded
    images (``trainer.images``) become ``3 x image_size x image_size`` uint8 crops."""
    where = f"{train.store.url}: split {train.name!r}"
    encoded = images.is_encoded(train.fields[input_field])
    x = train.fields[input_field] if encoded else _input_info(train.fields[input_field], where)
    _label_info(train.fields[target_field], where)
    for ds in evals:
        other = ds.fields[input_field]
        if other.shape != x.shape or other.dtype != x.dtype:
            raise InputError(
                f"{train.store.url}: field {input_field!r} is {x.dtype}{list(x.shape or ())} in split "
                f"{train.name!r} but {other.dtype}{list(other.shape or ())} in split {ds.name!r}"
            )
        _label_info(ds.fields[target_field], f"{train.store.url}: split {ds.name!r}")
    names = train.fields[target_field].attrs.get("class_names")
    largest = max(_label_max(ds, target_field) for ds in (train, *evals))
    if names:
        if largest >= len(names):
            raise InputError(f"{where}: label {largest} but only {len(names)} class_names")
        num_classes = len(names)
    else:
        num_classes = largest + 1
    if num_classes < 2:
        raise InputError(f"{where}: field {target_field!r} has fewer than 2 classes")
    if encoded:
        shape, mean, std = images.input_stats(train, input_field, image_size)
        scale, dtype = 1 / 255, "uint8"
    else:
        scale, mean, std = _input_stats(train, input_field)
        shape, dtype = tuple(x.shape or ()), x.dtype
    return Task(
        input_field=input_field,
        target_field=target_field,
        input_shape=shape,
        input_dtype=dtype,
        num_classes=num_classes,
        class_names=tuple(str(n) for n in names) if names else None,
        scale=scale,
        mean=mean,
        std=std,
    )


def _input_info(f: FieldInfo, where: str) -> FieldInfo:
    if f.variable:
        raise InputError(
            f"{where}: input field {f.name!r} has variable length; the models need a fixed shape"
        )
    kind = np.dtype(f.dtype).kind
    if kind not in "uif" or not f.shape:
        raise InputError(
            f"{where}: input field {f.name!r} is {f.dtype}{list(f.shape or ())}; expected a numeric array per sample"
        )
    return f


def _label_info(f: FieldInfo, where: str) -> None:
    if f.variable or np.dtype(f.dtype).kind not in "iu" or f.shape not in ((), (1,)):
        shape = "variable" if f.variable else f"{f.dtype}{list(f.shape or ())}"
        raise InputError(f"{where}: label field {f.name!r} is {shape}; expected one integer per sample")


def _label_max(ds: Dataset, field: str) -> int:
    """Largest label in the split; negative labels are an error."""
    lo, hi = 0, 0
    for start in range(0, len(ds), LABEL_SCAN_ROWS):
        y = ds.read(np.arange(start, min(start + LABEL_SCAN_ROWS, len(ds))), [field])[field]
        lo, hi = min(lo, int(y.min())), max(hi, int(y.max()))
    if lo < 0:
        raise InputError(
            f"{ds.store.url}: split {ds.name!r}: label field {field!r} holds negative label {lo}"
        )
    return hi


def _input_stats(ds: Dataset, field: str) -> tuple[float, float, float]:
    x = ds.read(np.arange(min(len(ds), STATS_ROWS)), [field])[field]
    scale = 1 / 255 if x.dtype == np.uint8 else 1.0
    xs = x.astype(np.float64) * scale
    mean, std = float(xs.mean()), float(xs.std())
    if not np.isfinite(mean) or not np.isfinite(std):
        raise InputError(
            f"{ds.store.url}: split {ds.name!r}: input field {field!r} holds NaN or infinite values"
        )
    return scale, mean, std if std > 1e-12 else 1.0
