"""Each model's shapes: input and output sizes taken from the data, parameter counts by hand."""

from __future__ import annotations

import pytest
import torch

from flwr_scaling.core.models import MODELS, build_model


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
    with pytest.raises(ValueError, match=f"unknown model 'resnet'; choose one of {', '.join(MODELS)}"):
        build_model("resnet", (64,), 10)
