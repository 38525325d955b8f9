"""Seeded mini-batches of a client's tensors, sliced in one step per batch.

``SeededBatches`` yields exactly the batches that ``torch.utils.data.DataLoader(
TensorDataset(features, labels), batch_size, shuffle=True, generator=Generator().manual_seed(seed))``
yields, epoch after epoch, drawing the same numbers from the same generator in the
same order, so every metric of a run is unchanged. It exists because the
DataLoader fetches a batch one example at a time (``dataset[i]`` for each index,
then ``torch.stack``): on a9a's logistic regression that was 45 % of a client's
round (benchmarks/profile_round.py), where one indexing call per batch costs a
few microseconds.

What the DataLoader draws (torch 2.x, ``dataloader.py`` and ``sampler.py``), and so what this draws:

1. when an epoch's iterator is created, one int64 "base seed" for worker processes
   (``torch.empty((), dtype=torch.int64).random_(generator=...)``), drawn even with no workers;
2. at the epoch's first batch, ``torch.randperm(n)`` (``RandomSampler``);
3. once the epoch is exhausted, one more ``torch.randperm(n)`` whose first ``0`` indices are
   used (``RandomSampler`` yields ``randperm(n)[:num_samples % n]`` after its full permutations).

An epoch that is stopped early (the warm-up reads a few batches) draws 1 and 2 only,
as the DataLoader does. ``tests/test_batches.py`` checks batch-by-batch equality
with the DataLoader, including partial epochs and the generator state afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class SeededBatches:
    """Re-iterable shuffled (or ordered) mini-batches of ``features`` and ``labels``.

    Parameters
    ----------
    features, labels : torch.Tensor
        The client's examples, first dimension the example.
    batch_size : int
        Examples per batch; the last batch of an epoch holds the rest.
    seed : int
        Seed of the batch order (a fresh ``torch.Generator``).
    shuffle : bool (default: True)
        Draw a new order every epoch; False keeps the stored order.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if len(features) != len(labels):
            raise ValueError(f"features and labels differ in length: {len(features)} vs {len(labels)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.features) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Drawn when the epoch starts, before any batch, as DataLoader's iterator does (step 1).
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._epoch()

    def _epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.features)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else None  # step 2
        for start in range(0, count, self.batch_size):
            if order is None:
                yield self.features[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                index = order[start:start + self.batch_size]
                yield self.features[index], self.labels[index]
        if self.shuffle:
            torch.randperm(count, generator=self.generator)  # step 3: drawn, none of it used


__all__ = ["SeededBatches"]
