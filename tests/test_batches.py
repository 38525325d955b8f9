"""SeededBatches yields the DataLoader's batches exactly, and leaves its generator where the DataLoader does."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flwr_scaling.data.batches import SeededBatches


def _tensors(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.arange(count * 3, dtype=torch.float32).reshape(count, 3)
    labels = torch.arange(count, dtype=torch.int64) % 4
    return features, labels


def _pair(count: int, batch_size: int, seed: int, shuffle: bool = True):
    features, labels = _tensors(count)
    loader = DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(seed))
    return loader, SeededBatches(features, labels, batch_size=batch_size, seed=seed, shuffle=shuffle)


def _assert_same(expected, got) -> None:
    assert len(expected) == len(got)
    for (x_expected, y_expected), (x_got, y_got) in zip(expected, got, strict=True):
        assert x_got.dtype == x_expected.dtype and y_got.dtype == y_expected.dtype
        assert torch.equal(x_got, x_expected) and torch.equal(y_got, y_expected)


@pytest.mark.parametrize(("count", "batch_size"), [(10, 3), (12, 4), (7, 32), (1, 1), (97, 8)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_batch_of_three_epochs_equals_the_dataloaders(count, batch_size, shuffle):
    loader, batches = _pair(count, batch_size, seed=5, shuffle=shuffle)
    assert len(batches) == len(loader)
    for _ in range(3):
        _assert_same(list(loader), list(batches))
    # The generators have drawn the same numbers: the next draw agrees.
    assert torch.equal(torch.randperm(50, generator=loader.generator), torch.randperm(50, generator=batches.generator))


def test_an_epoch_stopped_early_draws_what_the_dataloader_draws():
    """The warm-up reads a few batches of a loader; a later full epoch must still match."""
    loader, batches = _pair(20, 3, seed=11)
    _assert_same(list(itertools.islice(loader, 2)), list(itertools.islice(batches, 2)))
    iter(loader), iter(batches)  # an epoch started and never read draws its base seed only
    _assert_same(list(loader), list(batches))
    assert torch.equal(torch.randperm(9, generator=loader.generator), torch.randperm(9, generator=batches.generator))


def test_the_batch_order_depends_on_the_seed_and_changes_each_epoch():
    features, labels = _tensors(16)[0], torch.arange(16)  # distinct labels: the order itself is compared
    first = [y.tolist() for _, y in SeededBatches(features, labels, batch_size=16, seed=0)]
    again = [y.tolist() for _, y in SeededBatches(features, labels, batch_size=16, seed=0)]
    other = [y.tolist() for _, y in SeededBatches(features, labels, batch_size=16, seed=1)]
    assert first == again and first != other
    batches = SeededBatches(features, labels, batch_size=16, seed=0)
    epoch_one, epoch_two = next(iter(batches))[1], next(iter(batches))[1]
    assert sorted(epoch_one.tolist()) == list(range(16)) and not torch.equal(epoch_one, epoch_two)


def test_bad_arguments_are_refused_with_what_was_wrong():
    features, labels = _tensors(4)
    with pytest.raises(ValueError, match=r"^features and labels differ in length: 4 vs 3$"):
        SeededBatches(features, labels[:3], batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"^batch_size must be at least 1, got 0$"):
        SeededBatches(features, labels, batch_size=0, seed=0)
