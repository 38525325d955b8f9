"""The driver's view of a dataset: its training and test splits, and each client's partition.

``load_federated_data`` loads a dataset through the source registry
(:mod:`flwr_scaling.data.sources`) and splits it into train and test;
``load_partition`` cuts a client's part of the training split with a
partitioner from the partitioner registry (:mod:`flwr_scaling.data.partitioners`).
Both are cached per process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from flwr_scaling.data.batches import SeededBatches
from flwr_scaling.data.bundled import load_bundled
from flwr_scaling.data.partitioners import (
    MIN_PARTITION_SIZE,
    PARTITIONERS,
    PartitionSpec,
    partitioner_kind,
)
from flwr_scaling.data.source_types import Source, model_for_shape
from flwr_scaling.data.sources import find_source, load_source, source_default_model
from flwr_scaling.errors import DataError
from flwr_scaling.data.specs import EVAL_SPLITS, DataSpec

TEST_FRACTION = 0.2


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
    label_names: tuple[str, ...] = ()  # text labels: class i is label_names[i]; () for numeric labels


def default_model(spec: DataSpec) -> str:
    """The model a run on ``spec`` uses when none is given: the source entry's, or else
    (sources that hold images or tables, e.g. ``hf:``) the loaded data's: the CNN for images."""
    if spec.input_shape:
        return model_for_shape(spec.input_shape)
    return source_default_model(spec.dataset) or load_federated_data(spec).default_model


def data_label_names(spec: DataSpec) -> tuple[str, ...]:
    """The class names of a source with text labels (sorted), () for numbers; loads only sources that may have text."""
    if find_source(spec.dataset)[0].text_labels is False:
        return ()
    return load_federated_data(spec).label_names


def reshaped(source: Source, input_shape: tuple[int, ...], dataset: str) -> Source:
    """``source`` with every example reshaped to ``input_shape`` (its size checked), default model from the new shape."""
    size = int(np.prod(source.features.shape[1:]))
    if int(np.prod(input_shape)) != size:
        shape = "x".join(str(n) for n in input_shape)
        raise DataError(f"input-shape {shape} holds {int(np.prod(input_shape))} values but dataset {dataset!r} "
                        f"has {size} features per example; give a shape whose product is {size}")
    test = source.test
    if test is not None:
        test = (test[0].reshape(len(test[0]), *input_shape), test[1])
    return replace(source, features=source.features.reshape(len(source.features), *input_shape),
                   input_shape=tuple(input_shape), default_model=model_for_shape(input_shape), test=test)


@lru_cache(maxsize=4)
def load_federated_data(spec: DataSpec) -> FederatedData:
    """Load ``spec.dataset`` (see ``flwr_scaling.data.sources``) and split it into train and test.

    The test split is the source's own (a separate file) or else 20 % of the
    data, stratified and seeded. Tabular features are standardised with the
    training split's mean and standard deviation.

    With ``eval_split="validation"`` the test split is set aside unused and the
    server evaluates on 20 % of the training split instead (the clients train
    on the other 80 %): the split to choose step sizes on.
    """
    seed = spec.seed
    source = load_source(spec.dataset, spec.label_column, spec.test_path)
    if spec.input_shape:
        source = reshaped(source, spec.input_shape, spec.dataset)
    if source.test is None or spec.eval_split == "validation":
        # Imported only for a split: scikit-learn takes 1-2 s to import, a simulation's start-up waits on it.
        from sklearn.model_selection import train_test_split
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
        label_names=source.label_names,
    )


@lru_cache(maxsize=4)
def partitioner_for(spec: PartitionSpec):
    """The flwr-datasets partitioner of ``spec``, with the training split assigned (checked first).

    It partitions the table its registry entry builds from the labels: the
    features stay in one NumPy array instead of being copied into Arrow.
    Raises ValueError (one line) for settings that cannot work; the settings
    that cannot work for any data are refused before the data is loaded.
    """
    from datasets import Dataset

    kind = partitioner_kind(spec)
    data = load_federated_data(spec.data)
    partitioner, columns = kind.build(spec, data.train.labels)
    partitioner.dataset = Dataset.from_dict(columns)
    return partitioner


def load_partition(spec: PartitionSpec, partition_id: int) -> Split:
    """Client ``partition_id``'s part of the training split (see the module docstring).

    Lazy: only this partition's rows are copied out of the training split. The
    partitioner itself is built once per process (Dirichlet and shard splits
    assign every row when the first partition is asked for: index arithmetic,
    no features), and each partition's row indices are kept with it, so a
    client that trains in many rounds pays the lookup once.
    """
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{spec.num_partitions - 1}")
    indices = partition_indices(spec, partition_id)  # checks the settings first, then loads the data
    data = load_federated_data(spec.data)
    if len(indices) == 0:  # the checks above should make this impossible; never train on nothing
        raise ValueError(f"{spec.describe()} split: client {partition_id} got no training examples; use fewer clients")
    return Split(data.train.features[indices], data.train.labels[indices])


PARTITION_INDICES_ATTR = "_flwr_scaling_indices"  # {partition id: row indices}, kept on the partitioner object


def partition_indices(spec: PartitionSpec, partition_id: int) -> np.ndarray:
    """The training-split rows of partition ``partition_id`` (int64, read-only), computed once per partitioner.

    The cache lives on the cached partitioner, so it is dropped with it
    (``partitioner_for.cache_clear()`` starts everything afresh) and holds only
    the partitions this process asked for: at most one int64 per training row.
    """
    partitioner = partitioner_for(spec)
    cache = getattr(partitioner, PARTITION_INDICES_ATTR, None)
    if cache is None:
        cache = {}
        setattr(partitioner, PARTITION_INDICES_ATTR, cache)
    indices = cache.get(partition_id)
    if indices is None:
        part = cut_partition(spec, partition_id)
        # One Arrow read of the whole column; ``part["index"]`` (datasets 4.x: a lazy
        # Column) goes through one Python object per row, 20 times slower.
        indices = np.asarray(part.with_format("arrow")[:]["index"].to_numpy(), dtype=np.int64).copy()
        indices.setflags(write=False)
        cache[partition_id] = indices
    return indices


def cut_partition(spec: PartitionSpec, partition_id: int):
    """Partition ``partition_id`` as flwr-datasets cuts it (a ``datasets.Dataset`` of the entry's table).

    Checks the settings first, with one-line errors; the entry's caveat (e.g. a
    shard split that leaves classes out) is said when partition 0 is cut.
    """
    kind = partitioner_kind(spec)  # settings that cannot work for any data fail before the data is loaded
    data = load_federated_data(spec.data)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns at every Dirichlet retry (the error below says it
            # once) and about shard classes no client gets (said once below).
            warnings.simplefilter("ignore", UserWarning)
            partitioner = partitioner_for(spec)
            part = partitioner.load_partition(partition_id)
    except ValueError as error:
        if "max number of attempts" not in str(error):
            raise
        workable = largest_workable(spec, data.train.labels)
        fix = f"use at most {workable} clients (checked) or" if workable >= 1 else "use"
        raise ValueError(
            f"a Dirichlet split of {len(data.train)} examples into {spec.num_partitions} clients "
            f"with dirichlet-alpha {spec.dirichlet_alpha} cannot give every client "
            f"{MIN_PARTITION_SIZE} examples; {fix} a larger dirichlet-alpha"
        ) from None
    if partition_id == 0:
        _say_caveat(kind, spec, data.train.labels)
    return part


def _say_caveat(kind, spec: PartitionSpec, labels: np.ndarray) -> None:
    caveat = kind.warning(spec, labels) if kind.warning is not None else None
    if caveat:
        warnings.warn(caveat, stacklevel=4)


def check_partition(spec: PartitionSpec) -> None:
    """One-line ValueError unless ``spec`` gives every client data, as ``cut_partition`` checks it; the
    entry's caveat is said.

    Entries with a ``precheck`` (iid, shard) are judged on the labels without
    building the flwr-datasets partitioner; the others (Dirichlet, which assigns
    every row at the first request and fails unless every client gets
    MIN_PARTITION_SIZE) by cutting partition 0.
    """
    kind = partitioner_kind(spec)
    if kind.precheck is None:
        cut_partition(spec, 0)
        return
    labels = load_federated_data(spec.data).train.labels
    kind.precheck(spec, labels)
    _say_caveat(kind, spec, labels)


def largest_workable(spec: PartitionSpec, labels: np.ndarray) -> int:
    """The most clients below ``spec.num_partitions`` whose split (same seed and settings) succeeds, 0 if none.

    Found by bisection and every candidate is actually split, so the count
    suggested to the user is one that works (the success of a Dirichlet split
    is not strictly monotone in the client count; the answer is a working
    count, not always the largest).
    """
    kind = partitioner_kind(spec)
    columns_cache = {}

    def works(clients: int) -> bool:
        partitioner, columns = kind.build(replace(spec, num_partitions=clients), labels)
        if "table" not in columns_cache:
            from datasets import Dataset

            columns_cache["table"] = Dataset.from_dict(columns)
        partitioner.dataset = columns_cache["table"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                partitioner.load_partition(0)
        except ValueError:
            return False
        return True

    low, high = 1, min(spec.num_partitions - 1, len(labels) // MIN_PARTITION_SIZE)
    if high < low or not works(low):
        return 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if works(middle) else (low, middle - 1)
    return low


def make_loader(split: Split, batch_size: int, seed: int, shuffle: bool = True) -> SeededBatches:
    """Seeded mini-batches: the batch order depends only on ``seed``; the same batches as a DataLoader with
    a generator seeded so (see data/batches.py), sliced one batch at a time."""
    features, labels = split.tensors()
    return SeededBatches(features, labels, batch_size=batch_size, seed=seed, shuffle=shuffle)


__all__ = [
    "EVAL_SPLITS", "MIN_PARTITION_SIZE", "PARTITIONERS", "PARTITION_INDICES_ATTR", "TEST_FRACTION", "DataSpec",
    "FederatedData", "PartitionSpec", "Split", "check_partition", "cut_partition", "data_label_names", "default_model", "load_bundled",
    "load_federated_data", "load_partition", "make_loader", "partition_indices", "partitioner_for",
]
