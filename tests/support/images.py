"""Small image data for tests, synthesised with Pillow: photo-like gradients with noise and shapes,
saved as JPEG, PNG (RGB, RGBA, palette), greyscale JPEG and CMYK JPEG, plus corrupt files."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("jpeg", "png", "gray", "cmyk", "rgba", "palette")


def picture(seed: int, height: int, width: int) -> Image.Image:
    """An RGB image with smooth colour gradients, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / (width / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            127 + 100 * np.cos(y / (height / rng.uniform(1, 4)) + rng.uniform(0, 6)),
            127 + 100 * np.sin((x + y) / (width / rng.uniform(1, 3))),
        ],
        axis=-1,
    )
    base += rng.normal(0, 8, base.shape)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        x1, y1 = x0 + int(rng.integers(4, width // 2 + 5)), y0 + int(rng.integers(4, height // 2 + 5))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def encode(im: Image.Image, kind: str, quality: int = 90) -> bytes:
    b = io.BytesIO()
    if kind == "jpeg":
        im.save(b, "JPEG", quality=quality)
    elif kind == "gray":
        im.convert("L").save(b, "JPEG", quality=quality)
    elif kind == "cmyk":
        im.convert("CMYK").save(b, "JPEG", quality=quality)
    elif kind == "png":
        im.save(b, "PNG")
    elif kind == "rgba":
        im.convert("RGBA").save(b, "PNG")
    elif kind == "palette":
        im.convert("P").save(b, "PNG")
    else:
        raise ValueError(kind)
    return b.getvalue()


def image_bytes(
    n: int, *, sizes: tuple[int, int] = (40, 90), kinds: tuple[str, ...] = ("jpeg",), seed: int = 0
) -> list[bytes]:
    """``n`` encoded images of random sizes within ``sizes``, cycling through ``kinds``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        out.append(encode(picture(seed * 100_003 + i, h, w), kinds[i % len(kinds)]))
    return out


def image_folder(
    root: str,
    *,
    classes: int = 3,
    per_class: int = 8,
    sizes: tuple[int, int] = (40, 90),
    kinds: tuple[str, ...] = ("jpeg",),
    seed: int = 0,
) -> str:
    """``root/class{k}/img{i}.{jpg,png}``; returns ``root``."""
    data = image_bytes(classes * per_class, sizes=sizes, kinds=kinds, seed=seed)
    for k in range(classes):
        os.makedirs(os.path.join(root, f"class{k}"), exist_ok=True)
        for i in range(per_class):
            blob = data[k * per_class + i]
            ext = "jpg" if blob[:2] == b"\xff\xd8" else "png"
            with open(os.path.join(root, f"class{k}", f"img{i:03d}.{ext}"), "wb") as f:
                f.write(blob)
    return root
