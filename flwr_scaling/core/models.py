"""Models, with input and output sizes taken from the data."""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS = ("cnn", "mlp", "logreg")
IMAGE_MODELS = ("cnn",)  # models that need (channels, height, width) input
CNN_MIN_SIDE = 4  # the CNN's two 2x2 max-pools need images of at least 4x4


def input_problem(name: str, input_shape: tuple[int, ...]) -> str | None:
    """Why model ``name`` cannot take inputs of ``input_shape`` (one line), or None when it can.

    Asked before training, so that too small or flat inputs fail at the
    checks instead of inside the first forward pass.
    """
    shape = "x".join(str(size) for size in input_shape)
    if name in IMAGE_MODELS and len(input_shape) != 3:
        return (f"model {name!r} needs images (channels x height x width), but the data has shape {shape}; "
                f"give --input-shape (e.g. 1x8x8) or use --model mlp or logreg")
    if name == "cnn" and min(input_shape[1:]) < CNN_MIN_SIDE:
        return (f"model 'cnn' needs images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE} (two 2x2 max-pools), "
                f"but the data's images are {input_shape[1]}x{input_shape[2]} (shape {shape}); use --model mlp or logreg")
    return None


class SmallCNN(nn.Module):
    """conv 16 3x3 -> ReLU -> maxpool 2 -> conv 32 3x3 -> ReLU -> maxpool 2 -> linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image input (channels, height, width), got shape {input_shape}")
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build ``cnn``, ``mlp`` (one hidden layer of 64) or ``logreg`` for the data's sizes."""
    flat = math.prod(input_shape)
    problem = input_problem(name, tuple(input_shape)) if name in MODELS else None
    if problem:
        raise ValueError(problem)
    if name == "cnn":
        return SmallCNN(input_shape, num_classes)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes))
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
