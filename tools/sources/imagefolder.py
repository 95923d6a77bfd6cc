"""ImageFolder trees, as torchvision reads them: ``root/<class>/**/<file>``.

Fields: ``image`` (variable-length ``binary``: the encoded file bytes, not decoded here, so the
store keeps exactly what the source held) and ``label`` (int64, the index of the class in sorted
class names, as ``torchvision.datasets.ImageFolder`` numbers them). The class names are recorded in
the manifest as the ``label`` field's ``class_names`` attribute.

Files are those with an image extension (torchvision's list, any case), found recursively under
each class directory, in sorted order; hidden files and directories are skipped. Files are read in
batches of about ``BATCH_BYTES`` by a few threads (cheap on local disks, a large gain on network
file systems).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from hpstore.errors import InputError
from tools.sources.base import BATCH_BYTES, Batch, Source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
READ_THREADS = 8


def _images_under(class_dir: str) -> list[tuple[str, int]]:
    """``(path, size)`` of image files below ``class_dir``, sorted, hidden entries skipped."""
    found = []
    for dirpath, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(dirpath, name)
                found.append((path, os.path.getsize(path)))
    return found


def is_imagefolder(path: str) -> bool:
    """A directory whose (non-hidden) subdirectories hold image files."""
    try:
        subdirs = [e for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return False
    return bool(subdirs) and any(_images_under(d.path) for d in subdirs[:4])


class ImageFolderSource(Source):
    """Encoded image bytes and integer labels from a class-per-directory tree."""

    def __init__(self, root: str) -> None:
        try:
            entries = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        except OSError as exc:
            raise InputError(f"{root}: cannot list: {exc.strerror or exc}") from None
        if not entries:
            raise InputError(f"{root}: no class directories (expected root/<class>/<image files>)")
        self.path = root
        self.class_names = entries
        self.files: list[tuple[str, int, int]] = []  # (path, size, label)
        for label, name in enumerate(entries):
            images = _images_under(os.path.join(root, name))
            if not images:
                raise InputError(
                    f"{os.path.join(root, name)}: class directory holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            self.files.extend((p, size, label) for p, size in images)
        self.fields = ("image", "label")
        self.num_rows = len(self.files)
        self.attrs: dict[str, dict[str, Any]] = {"label": {"class_names": list(entries)}}

    def _groups(self) -> Iterator[list[tuple[str, int, int]]]:
        group: list[tuple[str, int, int]] = []
        size = 0
        for item in self.files:
            group.append(item)
            size += item[1]
            if size >= BATCH_BYTES or len(group) >= 4096:
                yield group
                group, size = [], 0
        if group:
            yield group

    def batches(self) -> Iterator[Batch]:
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="hpstore-imageread") as pool:
            for group in self._groups():
                data = list(pool.map(_read_file, [p for p, _, _ in group]))
                labels = np.fromiter((label for _, _, label in group), dtype=np.int64, count=len(group))
                yield {"image": pa.array(data, type=pa.binary()), "label": labels}


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def open_imagefolder(path: str) -> ImageFolderSource:
    return ImageFolderSource(path)
