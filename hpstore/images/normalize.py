"""Normalisation of a uint8 image batch on the device it was copied to: ``(x * scale - mean) / std``.

The loader delivers compact uint8 batches; converting them to float on the host would quadruple
what crosses to the GPU. So the batch is copied as uint8 (``non_blocking`` from pinned memory) and
this runs on the GPU afterwards: one float conversion and one fused multiply-add per element
(``x * (scale / std) + (-mean / std)``), with the per-channel constants cached per device. Torch
ops only, so it runs the same on a CPU tensor (and is tested there).

    norm = hpstore.images.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for batch in loader:
        x = norm(batch["image"].to("cuda", non_blocking=True))  # float32 (N, C, H, W)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpstore.errors import InputError

LAYOUTS = ("chw", "hwc")


def _constants(values: float | Sequence[float], what: str) -> tuple[float, ...]:
    seq = (values,) if isinstance(values, int | float) else tuple(values)
    if not seq or not all(isinstance(v, int | float) for v in seq):
        raise InputError(f"{what} must be a number or a sequence of numbers, got {values!r}")
    return tuple(float(v) for v in seq)


class Normalize:
    """``(x * scale - mean) / std`` per channel (one value: every channel), as float32 on ``x``'s
    device. ``layout`` says where the channels of a batch are: ``"chw"`` (N, C, H, W) or ``"hwc"``
    (N, H, W, C); with ``to_chw`` an "hwc" batch comes back as an (N, C, H, W) view (channels-last
    in memory, which convolutions on the GPU prefer)."""

    def __init__(
        self,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        *,
        scale: float = 1 / 255,
        layout: str = "chw",
        to_chw: bool = True,
    ) -> None:
        if layout not in LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.mean = _constants(mean, "mean")
        self.std = _constants(std, "std")
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise InputError(
                f"mean has {len(self.mean)} values and std {len(self.std)}; give as many of each"
            )
        if any(s == 0 for s in self.std):
            raise InputError(f"std must not be 0, got {self.std!r}")
        self.scale = float(scale)
        self.layout = layout
        self.to_chw = to_chw
        channels = max(len(self.mean), len(self.std))
        mean_t = torch.tensor(self.mean, dtype=torch.float64).expand(channels)
        std_t = torch.tensor(self.std, dtype=torch.float64).expand(channels)
        # Folded in float64 once, so the per-element work is one multiply and one add.
        self._mul = (self.scale / std_t).to(torch.float32)
        self._add = (-mean_t / std_t).to(torch.float32)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device, channel_dim: int, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._cache.get(device)
        if pair is None:
            pair = (self._mul.to(device), self._add.to(device))
            self._cache[device] = pair
        shape = [1] * ndim
        shape[channel_dim] = -1
        return pair[0].view(shape), pair[1].view(shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise InputError(
                f"Normalize needs a batch of images (N, C, H, W) or (N, H, W, C), got {tuple(x.shape)}"
            )
        channel_dim = x.ndim - 3 if self.layout == "chw" else x.ndim - 1
        c = x.shape[channel_dim]
        if self._mul.numel() not in (1, c):
            raise InputError(f"Normalize has {self._mul.numel()} channel constants, the batch {c} channels")
        mul, add = self._on(x.device, channel_dim, x.ndim)
        y = torch.addcmul(add, x.to(torch.float32), mul)
        if self.layout == "hwc" and self.to_chw:
            y = y.movedim(-1, -3)
        return y

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, scale={self.scale}, layout={self.layout!r})"
