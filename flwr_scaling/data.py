"""Datasets, held-out test splits and Dirichlet partitions (flwr-datasets).

The bundled scikit-learn datasets need no network and no file outside the
installed packages, so the default run works on any machine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

TEST_FRACTION = 0.2
MIN_PARTITION_SIZE = 10


@dataclass(frozen=True)
class Split:
    """Features and labels of one split, as arrays."""

    features: np.ndarray  # float32, shape (n, *input_shape)
    labels: np.ndarray  # int64, shape (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.features), torch.from_numpy(self.labels)


@dataclass(frozen=True)
class FederatedData:
    """The pooled training split, the server's test split and the data's sizes."""

    train: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    default_model: str


def _load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], str]:
    from sklearn import datasets as skdatasets

    if name == "digits":
        bunch = skdatasets.load_digits()
        # Pixels are 0..16; scale to [0, 1] and keep the 8x8 image shape for the CNN.
        return (bunch.data / 16.0).reshape(-1, 1, 8, 8), bunch.target, (1, 8, 8), "cnn"
    loader = {"breast_cancer": skdatasets.load_breast_cancer, "wine": skdatasets.load_wine}[name]
    bunch = loader()
    features = bunch.data
    # Standardise tabular features: their raw scales differ by orders of magnitude.
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-12)
    return features, bunch.target, (features.shape[1],), "logreg"


DATASETS = ("digits", "breast_cancer", "wine")


EVAL_SPLITS = ("test", "validation")


@lru_cache(maxsize=4)
def load_federated_data(dataset: str, seed: int, eval_split: str = "test") -> FederatedData:
    """Load ``dataset`` and split it 80/20 (stratified, seeded) into train and test.

    With ``eval_split="validation"`` the test split is set aside unused and the
    server evaluates on 20 % of the training split instead (the clients train
    on the other 80 %): the split to choose step sizes on.
    """
    from sklearn.model_selection import train_test_split

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    features, labels, input_shape, default_model = _load_sklearn(dataset)
    features = features.astype(np.float32)
    labels = labels.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    if eval_split == "validation":
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=TEST_FRACTION, stratify=y_train, random_state=seed
        )
    return FederatedData(
        train=Split(x_train, y_train),
        test=Split(x_test, y_test),
        input_shape=input_shape,
        num_classes=int(labels.max()) + 1,
        default_model=default_model,
    )


@lru_cache(maxsize=4)
def _partitioner(dataset: str, seed: int, eval_split: str, num_partitions: int, dirichlet_alpha: float):
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    data = load_federated_data(dataset, seed, eval_split)
    # Partition an index column: the partitioner only needs the labels, and the
    # features stay in one NumPy array instead of being copied into Arrow.
    table = Dataset.from_dict({"index": np.arange(len(data.train)), "label": data.train.labels})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=dirichlet_alpha,
        min_partition_size=MIN_PARTITION_SIZE,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = table
    return partitioner


def load_partition(
    dataset: str, seed: int, eval_split: str, num_partitions: int, dirichlet_alpha: float, partition_id: int
) -> Split:
    """Client ``partition_id``'s part of the training split (Dirichlet over labels)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    data = load_federated_data(dataset, seed, eval_split)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns at every retry; the error below says it once.
            warnings.simplefilter("ignore", UserWarning)
            part = _partitioner(dataset, seed, eval_split, num_partitions, dirichlet_alpha).load_partition(partition_id)
    except ValueError as error:
        if "max number of attempts" not in str(error):
            raise
        raise ValueError(
            f"a Dirichlet split of {len(data.train)} examples into {num_partitions} clients "
            f"with dirichlet-alpha {dirichlet_alpha} cannot give every client "
            f"{MIN_PARTITION_SIZE} examples; use fewer clients (at most {len(data.train) // MIN_PARTITION_SIZE}, "
            f"fewer still at small alpha) or a larger dirichlet-alpha"
        ) from None
    indices = np.asarray(part["index"], dtype=np.int64)
    return Split(data.train.features[indices], data.train.labels[indices])


def make_loader(split: Split, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A seeded DataLoader: the batch order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = split.tensors()
    return DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=shuffle, generator=generator)
