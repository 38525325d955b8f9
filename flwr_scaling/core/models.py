"""Models, with input and output sizes taken from the data."""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS = ("cnn", "resnet", "mlp", "logreg")
IMAGE_MODELS = ("cnn", "resnet")  # models that need (channels, height, width) input
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


RESNET_WIDTHS = (16, 32, 64)  # channels of the three stages; the 2nd and 3rd halve the image side
RESNET_BLOCKS = 3  # basic blocks per stage: with the stem and the classifier, ResNet-20's 20 layers
NORM_GROUPS = 8  # GroupNorm groups: every width is a multiple of 8


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: it keeps no running statistics (buffers), so a model
    # is its parameters alone and the server's weighted average of them is the whole model.
    return nn.GroupNorm(NORM_GROUPS, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut: ``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 convolution and a norm where the
    block changes the width or (``stride`` 2) halves the image side.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          _norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-20-shaped network for CIFAR-10-sized images (3x32x32; any image size works).

    stem conv 16 3x3 -> norm -> ReLU, then 3 stages of ``RESNET_BLOCKS``
    basic blocks of widths 16, 32, 64 (the 2nd and 3rd start with stride 2),
    global average pooling and a linear classifier: about 0.27M parameters
    for 10 classes, no buffers (GroupNorm).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs image input (channels, height, width), got shape {input_shape}")
        width = RESNET_WIDTHS[0]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False), _norm(width), nn.ReLU())
        stages = []
        for index, out_width in enumerate(RESNET_WIDTHS):
            blocks = []
            for block in range(RESNET_BLOCKS):
                blocks.append(BasicBlock(width, out_width, stride=2 if index > 0 and block == 0 else 1))
                width = out_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.classifier(features.mean(dim=(2, 3)))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build ``cnn``, ``resnet``, ``mlp`` (one hidden layer of 64) or ``logreg`` for the data's sizes."""
    flat = math.prod(input_shape)
    problem = input_problem(name, tuple(input_shape)) if name in MODELS else None
    if problem:
        raise ValueError(problem)
    if name == "cnn":
        return SmallCNN(input_shape, num_classes)
    if name == "resnet":
        return SmallResNet(input_shape, num_classes)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes))
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
