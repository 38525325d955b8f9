"""Each model's shapes: input and output sizes taken from the data, parameter counts by hand."""

from __future__ import annotations

import pytest
import torch

from flwr_scaling.core.models import MODELS, build_model


def _basic_block(width_in: int, width_out: int) -> int:
    """Two 3x3 convolutions and two GroupNorms; a 1x1 convolution and a GroupNorm on the shortcut when the width changes."""
    convs = width_in * width_out * 9 + width_out * width_out * 9
    shortcut = width_in * width_out + 2 * width_out if width_in != width_out else 0
    return convs + 2 * 2 * width_out + shortcut


# stem 3 -> 16 (3x3) and its norm; stages of 3 blocks at widths 16, 32, 64; linear 64 -> 10.
RESNET_PARAMETERS = (
    (3 * 16 * 9 + 2 * 16)
    + 3 * _basic_block(16, 16)
    + _basic_block(16, 32) + 2 * _basic_block(32, 32)
    + _basic_block(32, 64) + 2 * _basic_block(64, 64)
    + (64 * 10 + 10)
)


def test_resnet_hand_count_and_no_buffers():
    # The same figure written out: 464 + 3 * 4,672 + (14,528 + 2 * 18,560) + (57,728 + 2 * 73,984) + 650.
    assert RESNET_PARAMETERS == 272_474
    model = build_model("resnet", (3, 32, 32), 10)
    # No running statistics: the state dict (what is averaged and sent) is the parameters, nothing else.
    assert list(model.buffers()) == []
    assert list(model.state_dict()) == [name for name, _ in model.named_parameters()]
    # Any image size and channel count: the pooling is global.
    assert build_model("resnet", (1, 8, 8), 4)(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    "name, input_shape, classes, parameters",
    [
        # logreg: one Linear layer, 64 * 10 weights + 10 biases (digits as a flat vector).
        ("logreg", (64,), 10, 64 * 10 + 10),
        ("logreg", (123,), 2, 123 * 2 + 2),  # a9a
        # mlp: 64 -> 64 -> 10.
        ("mlp", (64,), 10, (64 * 64 + 64) + (64 * 10 + 10)),
        # cnn on 1x8x8 digits: conv 1->16 (3x3), conv 16->32 (3x3), two 2x2 pools leave 2x2, linear 128 -> 10.
        ("cnn", (1, 8, 8), 10, (16 * 9 + 16) + (32 * 16 * 9 + 32) + (32 * 2 * 2 * 10 + 10)),
        # cnn on 1x28x28 MNIST: the pools leave 7x7, linear 1568 -> 10.
        ("cnn", (1, 28, 28), 10, (16 * 9 + 16) + (32 * 16 * 9 + 32) + (32 * 7 * 7 * 10 + 10)),
        # resnet on 3x32x32 (CIFAR-10): bias-free convs, GroupNorm weight + bias (2 per channel), counted in RESNET_PARAMETERS.
        ("resnet", (3, 32, 32), 10, RESNET_PARAMETERS),
    ],
)
def test_output_shape_and_parameter_count(name, input_shape, classes, parameters):
    model = build_model(name, input_shape, classes)
    assert model(torch.zeros(5, *input_shape)).shape == (5, classes)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_cnn_needs_images_and_unknown_models_are_named():
    with pytest.raises(ValueError) as error:
        build_model("cnn", (64,), 10)
    assert str(error.value) == ("model 'cnn' needs images (channels x height x width), but the data has shape 64; "
                                "give --input-shape (e.g. 1x8x8) or use --model mlp or logreg")
    with pytest.raises(ValueError) as error:
        build_model("cnn", (1, 2, 2), 10)
    assert str(error.value) == ("model 'cnn' needs images of at least 4x4 (two 2x2 max-pools), "
                                "but the data's images are 2x2 (shape 1x2x2); use --model mlp or logreg")
    with pytest.raises(ValueError) as error:
        build_model("resnet", (3072,), 10)
    assert str(error.value) == ("model 'resnet' needs images (channels x height x width), but the data has shape 3072; "
                                "give --input-shape (e.g. 1x8x8) or use --model mlp or logreg")
    with pytest.raises(ValueError, match=f"unknown model 'vgg'; choose one of {', '.join(MODELS)}"):
        build_model("vgg", (3, 32, 32), 10)
