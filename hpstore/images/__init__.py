"""Image decoding and augmentation inside the loader: ``hpstore.Loader(ds, 256, transforms={"image":
hpstore.images.RandomResizedCrop(224)})``. See README.md in this folder."""

from hpstore.images.decode import CorruptImageError
from hpstore.images.normalize import Normalize
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
