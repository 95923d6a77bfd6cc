"""Options that reshape the rows of any source before they are written: image checks and
re-encoding (``tools.sources.images``) and a held-out ``test`` split (``tools.sources.holdout``).

``add_arguments`` puts the flags on the ingest parser, ``from_args`` reads them into a
``PrepareOptions``, and ``prepare`` wraps the opened splits. Image checks apply to every source with
an image field (an image folder's files, a binary column), whether or not a flag is given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from hpstore.errors import InputError
from tools.sources.base import Split
from tools.sources.holdout import with_holdout
from tools.sources.images import ImageOptions, skipped, with_images


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    images: ImageOptions = field(default_factory=ImageOptions)
    holdout: float | None = None
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        if self.holdout is not None and not 0 < self.holdout < 1:
            raise InputError(f"--holdout must be a fraction between 0 and 1, got {self.holdout}")

    @property
    def active(self) -> bool:
        """Whether any flag was given (the image checks of an image folder need none)."""
        return self.holdout is not None or self.images.given or self.images.skip_bad

    def record(self) -> dict[str, Any]:
        return {**self.images.record(), "holdout": self.holdout, "holdout_seed": self.holdout_seed}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images and splits")
    g.add_argument("--image-field", help="the field of encoded images (default: image)")
    g.add_argument(
        "--image-max-side", type=int, metavar="N", help="shrink images so the longer side is at most N"
    )
    g.add_argument("--image-quality", type=int, metavar="Q", help="re-encode images as JPEG at quality Q")
    g.add_argument(
        "--image-decode", action="store_true", help="store decoded pixels (all images must share one shape)"
    )
    g.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and list them")
    g.add_argument(
        "--holdout", type=float, metavar="F", help="move a seeded fraction F of rows to a 'test' split"
    )
    g.add_argument("--holdout-seed", type=int, default=0, help="seed of --holdout (default 0)")


def from_args(a: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(
        images=ImageOptions(
            field=a.image_field or "image",
            field_given=a.image_field is not None,
            max_side=a.image_max_side,
            quality=a.image_quality,
            decode=a.image_decode,
            skip_bad=a.skip_bad,
        ),
        holdout=a.holdout,
        holdout_seed=a.holdout_seed,
    )


def prepare(splits: list[Split], options: PrepareOptions) -> list[Split]:
    if options.holdout is not None:
        splits = with_holdout(splits, options.holdout, options.holdout_seed)
    return with_images(splits, options.images)


def report(splits: list[Split]) -> list[str]:
    """Lines for stderr after a run: what ``--skip-bad`` left out."""
    lines = skipped(splits)
    return (
        [f"ingest: skipped {len(lines)} unreadable image(s):", *(f"  {line}" for line in lines)]
        if lines
        else []
    )
