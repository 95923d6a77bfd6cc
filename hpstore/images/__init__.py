"""Image decoding and augmentation inside the loader: ``hpstore.Loader(ds, 256, transforms={"image":
hpstore.images.RandomResizedCrop(224)})``. See README.md in this folder.

``Normalize`` loads on first use: it needs torch, and an ingest that checks or re-encodes images
(``tools.prepare``) should not pay torch's import (~3 s) on every run."""

from typing import Any

from hpstore.images.decode import CorruptImageError
from hpstore.images.transforms import CenterCrop, Decode, ImageStats, ImageTransform, RandomResizedCrop

__all__ = [
    "CenterCrop",
    "CorruptImageError",
    "Decode",
    "ImageStats",
    "ImageTransform",
    "Normalize",
    "RandomResizedCrop",
]


def __getattr__(name: str) -> Any:
    if name == "Normalize":
        from hpstore.images.normalize import Normalize

        return Normalize
    raise AttributeError(f"module 'hpstore.images' has no attribute {name!r}")
