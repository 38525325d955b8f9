"""Datasets, held-out test splits and partitions among clients (flwr-datasets).

Partitioners (``PartitionSpec.partitioner``), all from flwr-datasets:

- ``dirichlet``: ``DirichletPartitioner`` over the labels (``dirichlet_alpha``,
  at least MIN_PARTITION_SIZE examples per client);
- ``iid``: ``IidPartitioner`` on the training split in a seeded random order
  (sizes differ by at most 1);
- ``shard``: ``PathologicalPartitioner``: every client gets exactly
  ``shard_classes`` classes (deterministic class assignment over a seeded
  order of the classes, see ``_shard_order``).

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

from flwr_scaling.data.sources import BUNDLED, Source, load_source

TEST_FRACTION = 0.2
MIN_PARTITION_SIZE = 10
PARTITIONERS = ("dirichlet", "iid", "shard")


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
    partitioner: str = "dirichlet"  # one of PARTITIONERS
    shard_classes: int = 2  # classes per client with partitioner "shard"

    def describe(self) -> str:
        """A short human-readable name, e.g. ``dirichlet (alpha 0.5)`` or ``shard (2 classes per client)``."""
        if self.partitioner == "dirichlet":
            return f"dirichlet (alpha {self.dirichlet_alpha:g})"
        if self.partitioner == "shard":
            return f"shard ({self.shard_classes} class{'es' if self.shard_classes != 1 else ''} per client)"
        return self.partitioner


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
    """The flwr-datasets partitioner of ``spec``, with the training split assigned (checked first).

    It partitions an {"index", "label"} table: the partitioner only needs the
    labels, and the features stay in one NumPy array instead of being copied
    into Arrow. Raises ValueError (one line) for settings that cannot work.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if spec.partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner: unknown value {spec.partitioner!r}; choose one of {', '.join(PARTITIONERS)}")
    if spec.num_partitions < 1:
        raise ValueError(f"num-clients must be >= 1, got {spec.num_partitions}")
    data = load_federated_data(spec.data)
    labels = data.train.labels
    size, seed = len(labels), spec.data.seed
    columns = {"index": np.arange(size), "label": labels}
    if spec.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="label",
            alpha=spec.dirichlet_alpha,
            min_partition_size=MIN_PARTITION_SIZE,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif spec.partitioner == "iid":
        if spec.num_partitions > size:
            raise ValueError(
                f"an iid split of {size} training examples into {spec.num_partitions} clients leaves some client "
                f"without data; use at most {size} clients"
            )
        # IidPartitioner cuts contiguous shards: put the rows in a seeded random
        # order first (a source's own training file may be sorted by label).
        order = np.random.default_rng(seed).permutation(size)
        columns = {"index": order, "label": labels[order]}
        partitioner = IidPartitioner(num_partitions=spec.num_partitions)
    else:
        rank = _shard_order(labels, seed)
        _check_shard(spec, labels, rank)
        columns["shard_class"] = rank[labels]
        partitioner = PathologicalPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="shard_class",
            num_classes_per_partition=spec.shard_classes,
            class_assignment_mode="deterministic",
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = Dataset.from_dict(columns)
    return partitioner


def _shard_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """``rank[label]``: each class's place in a seeded random order of the classes.

    PathologicalPartitioner's ``deterministic`` mode gives client ``p`` the
    classes at places ``p, p+1, ..., p+shard_classes-1`` (mod the number of
    classes) of the sorted class ids: every client gets exactly
    ``shard_classes`` classes, the classes are shared as evenly as the numbers
    allow, and no class is left out when ``clients + shard_classes - 1 >=
    classes``. Its ``random`` mode, also seeded, draws each client's classes
    independently and so drops whole classes by chance (about one class in ten
    for 10 clients x 2 classes of 10). Sorting the classes by this seeded rank
    first keeps the deterministic mode's guarantees and makes which classes
    share a client depend on the seed.
    """
    classes = int(labels.max()) + 1
    rank = np.empty(classes, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(classes)] = np.arange(classes)
    return rank


def _shard_uses(num_partitions: int, shard_classes: int, num_classes: int) -> np.ndarray:
    """How many clients get each class place under the deterministic assignment.

    Client ``p`` takes places ``(p + i) % num_classes`` for ``i < shard_classes``;
    the counts only grow with either argument, so feasibility is monotone in both.
    """
    places = np.arange(num_classes)
    full, rest = divmod(num_partitions, num_classes)
    return sum(full + ((places - i) % num_classes < rest) for i in range(shard_classes)).astype(np.int64)


def _largest(low: int, high: int, ok) -> int:
    """The largest x in [low, high] with ok(x) (ok monotone: true up to some x), or low - 1 if none."""
    if high < low or not ok(low):
        return low - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if ok(middle) else (low, middle - 1)
    return low


def _check_shard(spec: PartitionSpec, labels: np.ndarray, rank: np.ndarray) -> None:
    """One-line ValueError unless every client can get ``shard_classes`` classes and >= 1 example of each."""
    present = np.unique(labels)
    num_classes, k, n = len(present), spec.shard_classes, spec.num_partitions
    if k < 1 or k > num_classes:
        raise ValueError(
            f"shard-classes {k} is impossible: the training split has {num_classes} classes; "
            f"use shard-classes between 1 and {num_classes}"
        )
    # Examples per class place (rank order; classes absent from the split count 0 but are not places).
    counts = np.bincount(rank[labels], minlength=len(rank))[np.sort(rank[present])]

    def feasible(clients: int, per_client: int) -> bool:
        return bool((_shard_uses(clients, per_client, num_classes) <= counts).all())

    if feasible(n, k):
        return
    uses = _shard_uses(n, k, num_classes)
    place = int(np.argmax(uses > counts))
    cls = int(present[np.argsort(rank[present])][place])
    most_clients = _largest(1, n - 1, lambda c: feasible(c, k))
    most_classes = _largest(1, k - 1, lambda c: feasible(n, c))
    options = [f"at most {most_clients} clients"] if most_clients else []
    if most_classes:
        options.append(f"shard-classes at most {most_classes}")
    raise ValueError(
        f"a shard split with shard-classes {k} gives class {cls} ({int(counts[place])} training examples) to "
        f"{int(uses[place])} of the {n} clients, so some client would get no example of it; use "
        + " or ".join(options or ["fewer clients"])
    )


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
    data = load_federated_data(spec.data)
    indices = partition_indices(spec, partition_id)
    if len(indices) == 0:  # the checks above should make this impossible; never train on nothing
        raise ValueError(f"{spec.describe()} split: client {partition_id} got no training examples; use fewer clients")
    return Split(data.train.features[indices], data.train.labels[indices])


_INDICES_ATTR = "_flwr_scaling_indices"  # {partition id: row indices}, kept on the partitioner object


def partition_indices(spec: PartitionSpec, partition_id: int) -> np.ndarray:
    """The training-split rows of partition ``partition_id`` (int64, read-only), computed once per partitioner.

    The cache lives on the cached partitioner, so it is dropped with it
    (``_partitioner.cache_clear()`` starts everything afresh) and holds only
    the partitions this process asked for: at most one int64 per training row.
    """
    partitioner = _partitioner(spec)
    cache = getattr(partitioner, _INDICES_ATTR, None)
    if cache is None:
        cache = {}
        setattr(partitioner, _INDICES_ATTR, cache)
    indices = cache.get(partition_id)
    if indices is None:
        part = _load_part(spec, partition_id)
        # One Arrow read of the whole column; ``part["index"]`` (datasets 4.x: a lazy
        # Column) goes through one Python object per row, 20 times slower.
        indices = np.asarray(part.with_format("arrow")[:]["index"].to_numpy(), dtype=np.int64).copy()
        indices.setflags(write=False)
        cache[partition_id] = indices
    return indices


def _load_part(spec: PartitionSpec, partition_id: int):
    data = load_federated_data(spec.data)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns at every Dirichlet retry (the error below says it
            # once) and about shard classes no client gets (said once below).
            warnings.simplefilter("ignore", UserWarning)
            partitioner = _partitioner(spec)
            part = partitioner.load_partition(partition_id)
    except ValueError as error:
        if "max number of attempts" not in str(error):
            raise
        raise ValueError(
            f"a Dirichlet split of {len(data.train)} examples into {spec.num_partitions} clients "
            f"with dirichlet-alpha {spec.dirichlet_alpha} cannot give every client "
            f"{MIN_PARTITION_SIZE} examples; use fewer clients (at most {len(data.train) // MIN_PARTITION_SIZE}, "
            f"fewer still at small alpha) or a larger dirichlet-alpha"
        ) from None
    if spec.partitioner == "shard" and partition_id == 0:
        classes = len(np.unique(data.train.labels))
        if spec.num_partitions + spec.shard_classes - 1 < classes:
            unused = classes - (spec.num_partitions + spec.shard_classes - 1)
            warnings.warn(
                f"shard split: {spec.num_partitions} clients x {spec.shard_classes} classes leave {unused} of the "
                f"{classes} classes to no client (their examples are not used for training)",
                stacklevel=3,
            )
    return part


def make_loader(split: Split, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A seeded DataLoader: the batch order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = split.tensors()
    return DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=shuffle, generator=generator)
