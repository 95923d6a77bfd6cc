"""The models: a small MLP, a small two-convolution CNN, a linear classifier and a small ResNet,
shaped by the Task.

Both take the stored input as it arrives (uint8 or float, on the device) and normalise it first, so
batches cross to the GPU in their compact stored dtype. Image layout: ``[H, W]`` is one channel,
``[C, H, W]`` is channels first, ``[H, W, C]`` with C in 1, 3, 4 is channels last.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hpstore.errors import InputError
from trainer.task import Task

CHANNEL_COUNTS = (1, 3, 4)


class Normalize(nn.Module):
    """``(x * scale - mean) / std`` in float32; optionally reorders ``[N, H, W, C]`` to ``[N, C, H, W]``."""

    scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, task: Task, *, image_layout: str | None) -> None:
        super().__init__()
        # Buffers, so the constants travel with the model's state_dict into checkpoints.
        self.register_buffer("scale", torch.tensor(task.scale, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(task.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(task.std, dtype=torch.float32))
        self.image_layout = image_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() * self.scale - self.mean) / self.std
        if self.image_layout == "hw":
            x = x.unsqueeze(1)
        elif self.image_layout == "hwc":
            x = x.permute(0, 3, 1, 2)
        return x


def image_layout(shape: tuple[int, ...]) -> tuple[str, int, int, int]:
    """(layout, channels, height, width) of a per-sample image shape; InputError if it is none."""
    if len(shape) == 2:
        return "hw", 1, shape[0], shape[1]
    if len(shape) == 3:
        if shape[-1] in CHANNEL_COUNTS and shape[0] not in CHANNEL_COUNTS:
            return "hwc", shape[2], shape[0], shape[1]
        return "chw", shape[0], shape[1], shape[2]
    raise InputError(
        f"--model cnn needs images of shape [H, W], [C, H, W] or [H, W, C], got {list(shape)}; try --model mlp"
    )


class Linear(nn.Module):
    """Logistic regression on the pixels: almost no compute per byte, the I/O-bound end."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.norm = Normalize(task, image_layout=None)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(task.input_shape), task.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))


class MLP(nn.Module):
    def __init__(self, task: Task, hidden: int = 256) -> None:
        super().__init__()
        self.norm = Normalize(task, image_layout=None)
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(task.input_shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, task.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))


class CNN(nn.Module):
    """conv3x3(32) → pool → conv3x3(64) → pool → [adaptive pool to ≤ 7×7] → fc(128) → classes."""

    def __init__(self, task: Task, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        layout, c, h, w = image_layout(task.input_shape)
        if h < 4 or w < 4:
            raise InputError(f"--model cnn needs images of at least 4x4 pixels, got {h}x{w}")
        self.norm = Normalize(task, image_layout=layout)
        oh, ow = min(h // 4, 7), min(w // 4, 7)
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((oh, ow)),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * oh * ow, hidden),
            nn.ReLU(),
            nn.Linear(hidden, task.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.norm(x)))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 32-128 px images: a 3x3 stem (stride 2 from 64 px up), then stages of
    width 32, 64, 128, 256 (one block each, stride 2 between), global average pool, linear head."""

    def __init__(self, task: Task, width: int = 32) -> None:
        super().__init__()
        layout, c, h, w = image_layout(task.input_shape)
        if h < 8 or w < 8:
            raise InputError(f"--model resnet needs images of at least 8x8 pixels, got {h}x{w}")
        self.norm = Normalize(task, image_layout=layout)
        stem_stride = 2 if min(h, w) >= 64 else 1
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages: list[nn.Module] = [
            nn.Conv2d(c, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        cin = width
        for i, cout in enumerate(widths):
            stages.append(ResidualBlock(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, task.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.norm(x)))


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "linear": Linear, "resnet": ResNet}


def build_model(name: str, task: Task) -> nn.Module:
    try:
        cls = MODELS[name]
    except KeyError:
        raise InputError(f"unknown model {name!r} (models: {', '.join(MODELS)})") from None
    return cls(task)
