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

from .sources import BUNDLED, Source, load_source

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


def load_bundled(name: str) -> Source:
    """scikit-learn's bundled datasets: no network, no file outside the installed packages."""
    from sklearn import datasets as skdatasets

    if name == "digits":
        bunch = skdatasets.load_digits()
        # Pixels are 0..16; scale to [0, 1] and keep the 8x8 image shape for the CNN.
        features = (bunch.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
        return Source(features, bunch.target.astype(np.int64), (1, 8, 8), "cnn")
    loader = {"breast_cancer": skdatasets.load_breast_cancer, "wine": skdatasets.load_wine}[name]
    bunch = loader()
    features = bunch.data.astype(np.float32)
    return Source(features, bunch.target.astype(np.int64), (features.shape[1],), "logreg", standardize=True)


DATASETS = BUNDLED
EVAL_SPLITS = ("test", "validation")
@dataclass(frozen=True)
class DataSpec:
    """Which data, split how: everything ``load_federated_data`` depends on (and its cache key)."""

    dataset: str = "digits"
    seed: int = 0
    eval_split: str = "test"
    label_column: str = "label"
    test_path: str = ""


@dataclass(frozen=True)
class PartitionSpec:
    """How the training split is divided among clients."""

    data: DataSpec
    num_partitions: int
    dirichlet_alpha: float


@lru_cache(maxsize=4)
def load_federated_data(spec: DataSpec) -> FederatedData:
    """Load ``spec.dataset`` (see ``flwr_scaling.sources``) and split it into train and test.

    The test split is the source's own (a separate file) or else 20 % of the
    data, stratified and seeded. Tabular features are standardised with the
    training split's mean and standard deviation.

    With ``eval_split="validation"`` the test split is set aside unused and the
    server evaluates on 20 % of the training split instead (the clients train
    on the other 80 %): the split to choose step sizes on.
    """
    from sklearn.model_selection import train_test_split

    seed = spec.seed
    source = load_source(spec.dataset, spec.label_column, spec.test_path)
    if source.test is not None:
        x_train, y_train = source.features, source.labels
        x_test, y_test = source.test
    else:
        x_train, x_test, y_train, y_test = train_test_split(
            source.features, source.labels, test_size=TEST_FRACTION, stratify=source.labels, random_state=seed
        )
    if spec.eval_split == "validation":
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=TEST_FRACTION, stratify=y_train, random_state=seed
        )
    if source.standardize:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-12
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return FederatedData(
        train=Split(x_train.astype(np.float32), y_train),
        test=Split(x_test.astype(np.float32), y_test),
        input_shape=tuple(source.input_shape),
        num_classes=num_classes,
        default_model=source.default_model,
    )


@lru_cache(maxsize=4)
def _partitioner(spec: PartitionSpec):
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    data = load_federated_data(spec.data)
    # Partition an index column: the partitioner only needs the labels, and the
    # features stay in one NumPy array instead of being copied into Arrow.
    table = Dataset.from_dict({"index": np.arange(len(data.train)), "label": data.train.labels})
    partitioner = DirichletPartitioner(
        num_partitions=spec.num_partitions,
        partition_by="label",
        alpha=spec.dirichlet_alpha,
        min_partition_size=MIN_PARTITION_SIZE,
        self_balancing=False,
        shuffle=True,
        seed=spec.data.seed,
    )
    partitioner.dataset = table
    return partitioner


def load_partition(spec: PartitionSpec, partition_id: int) -> Split:
    """Client ``partition_id``'s part of the training split (Dirichlet over labels)."""
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{spec.num_partitions - 1}")
    data = load_federated_data(spec.data)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns at every retry; the error below says it once.
            warnings.simplefilter("ignore", UserWarning)
            part = _partitioner(spec).load_partition(partition_id)
    except ValueError as error:
        if "max number of attempts" not in str(error):
            raise
        raise ValueError(
            f"a Dirichlet split of {len(data.train)} examples into {spec.num_partitions} clients "
            f"with dirichlet-alpha {spec.dirichlet_alpha} cannot give every client "
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
