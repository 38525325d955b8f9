"""The data-source and partitioner registries are the one place to extend the data layer.

A source and a partitioner defined here, in the test file, work end to end
through the public ``register_source`` / ``register_partitioner`` alone: the
configuration checks, the driver, the clients and the node-side loader all
ask the registries.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling.cli import main
from flwr_scaling.data.federated import DataSpec, PartitionSpec, load_federated_data, load_partition
from flwr_scaling.data.node_files import load_node_file
from flwr_scaling.data.partitioners import label_table, register_partitioner, unregister_partitioner
from flwr_scaling.data.source_types import Source, check_readable
from flwr_scaling.data.sources import check_spec, register_source, unregister_source
from flwr_scaling.errors import ConfigError, DataError
from flwr_scaling.run.config import RunConfig

CENTRES = np.array([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])  # 3 well-separated classes


def write_blobs(path: Path, per_class: int = 100, seed: int = 0) -> Path:
    """Three Gaussian blobs in 5 dimensions (unit spread around CENTRES), labels 0, 1, 2, as a .npz file."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CENTRES)), per_class)
    features = CENTRES[labels] + rng.normal(size=(len(labels), CENTRES.shape[1]))
    np.savez(path, features=features, labels=labels)
    return path


def load_npz(target: str, label_column: str, test_path: str) -> Source:
    """``npz:FILE``: arrays ``features`` (n, d) and ``labels`` (n,) holding class indices."""
    with np.load(target) as arrays:
        features, labels = arrays["features"].astype(np.float32), arrays["labels"].astype(np.int64)
    return Source(features, labels, (features.shape[1],), standardize=True)


def check_npz(target: str, test_path: str) -> None:
    check_readable(Path(target))
    if test_path:
        raise DataError("test-path is not used with npz: the server's test split is 20 % of the file")


@pytest.fixture
def npz_source():
    """The ``npz`` kind, registered for one test."""
    register_source("npz", load_npz, check=check_npz, image=False)
    yield
    unregister_source("npz")


def test_a_new_source_runs_end_to_end(npz_source, tmp_path):
    path = write_blobs(tmp_path / "blobs.npz")
    out = tmp_path / "run"
    main(["run", "--backend", "inprocess", "--dataset", f"npz:{path}", "--rounds", "2", "--num-clients", "3",
          "--strategy", "fedavg", "--out", str(out)])
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["round"] for row in rows] == ["1", "2"]
    # 60 test examples of 3 separable classes: chance is 1/3; two rounds of FedAvg (step 0.4) learn them.
    assert float(rows[-1]["test_accuracy"]) > 0.9
    assert float(rows[-1]["test_loss"]) < float(rows[0]["test_loss"])
    data = load_federated_data(DataSpec(dataset=f"npz:{path}"))
    assert (len(data.train), len(data.test), data.input_shape, data.num_classes) == (240, 60, (5,), 3)


def test_a_new_source_takes_its_default_model_and_checks_from_the_entry(npz_source, tmp_path):
    path = write_blobs(tmp_path / "blobs.npz")
    assert RunConfig(dataset=f"npz:{path}", num_clients=3).resolved().model == "logreg"  # image=False
    with pytest.raises(ConfigError, match="model 'cnn' needs image data"):
        RunConfig(dataset=f"npz:{path}", num_clients=3, model="cnn").validate()
    with pytest.raises(ConfigError, match=r"^test-path is not used with npz"):
        RunConfig(dataset=f"npz:{path}", test_path=str(path)).validate()
    with pytest.raises(DataError, match=r"missing\.npz does not exist or is not a file$"):
        check_spec(f"npz:{tmp_path / 'missing.npz'}")


def test_a_node_reads_its_own_file_of_a_new_kind(npz_source, tmp_path):
    path = write_blobs(tmp_path / "node.npz", per_class=4, seed=1)
    split = load_node_file(f"npz:{path}", "label", (5,), 3, False)
    with np.load(path) as arrays:
        np.testing.assert_allclose(split.features, arrays["features"].astype(np.float32))
        assert split.labels.tolist() == arrays["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_an_unregistered_kind_is_unknown_again(tmp_path):
    path = write_blobs(tmp_path / "blobs.npz")
    register_source("npz", load_npz)
    with pytest.raises(ValueError, match="data source 'npz' is already registered"):
        register_source("npz", load_npz)
    unregister_source("npz")
    with pytest.raises(ConfigError, match="unknown file kind 'npz'"):
        RunConfig(dataset=f"npz:{path}").validate()


def test_a_named_source_bounds_the_clients_by_its_size():
    register_source("blobs", lambda target, label_column, test_path: None, takes_path=False, image=False,
                    num_examples=50)
    try:
        # 50 examples: 40 for training, so at most 4 clients of MIN_PARTITION_SIZE 10.
        with pytest.raises(ConfigError, match="use at most 4 clients"):
            RunConfig(dataset="blobs", num_clients=5).validate()
        RunConfig(dataset="blobs", num_clients=4).validate()
    finally:
        unregister_source("blobs")


def _build_sorted(spec: PartitionSpec, labels: np.ndarray):
    """Contiguous blocks of the training rows sorted by label: the most skewed split there is."""
    from flwr_datasets.partitioner import IidPartitioner

    order = np.argsort(labels, kind="stable")
    return IidPartitioner(num_partitions=spec.num_partitions), {**label_table(labels[order]), "index": order}


def _at_most_ten(spec: PartitionSpec) -> None:
    if spec.num_partitions > 10:
        raise ValueError(f"a sorted split takes at most 10 clients, got {spec.num_partitions}")


@pytest.fixture
def sorted_partitioner():
    register_partitioner("sorted", _build_sorted, check=_at_most_ten, describe=lambda spec: "sorted by label")
    yield
    unregister_partitioner("sorted")


def test_a_registered_partitioner_is_usable(sorted_partitioner):
    spec = PartitionSpec(DataSpec(), 5, 0.5, "sorted")
    parts = [load_partition(spec, i) for i in range(5)]
    train = load_federated_data(DataSpec()).train
    assert [len(p) for p in parts] == [288, 288, 287, 287, 287]  # 1437 rows, sizes differ by at most 1
    for left, right in zip(parts, parts[1:]):
        assert left.labels.max() <= right.labels.min()  # every client holds the next labels in order
    assert sorted(np.concatenate([p.labels for p in parts]).tolist()) == sorted(train.labels.tolist())
    assert spec.describe() == "sorted by label"
    RunConfig(partitioner="sorted", num_clients=5).validate()  # the configuration knows it too


def test_a_registered_partitioner_checks_its_settings_up_front(sorted_partitioner):
    with pytest.raises(ValueError, match="^a sorted split takes at most 10 clients, got 11$"):
        load_partition(PartitionSpec(DataSpec(dataset="no-such-dataset"), 11, 0.5, "sorted"), 0)  # before loading


def test_built_in_partitioners_check_their_settings_up_front():
    unloadable = DataSpec(dataset="no-such-dataset")  # loading it would fail: the checks come first
    with pytest.raises(ValueError, match="^dirichlet-alpha must be a finite number > 0, got 0.0$"):
        load_partition(PartitionSpec(unloadable, 3, 0.0, "dirichlet"), 0)
    with pytest.raises(ValueError, match="^shard-classes must be an integer >= 1, got 0$"):
        load_partition(PartitionSpec(unloadable, 3, 0.5, "shard", 0), 0)
    with pytest.raises(ValueError, match="^partitioner: unknown value 'sorted'; choose one of dirichlet, iid, shard$"):
        load_partition(PartitionSpec(unloadable, 3, 0.5, "sorted"), 0)


def test_a_registered_precheck_judges_the_split_without_building_it():
    """With ``precheck`` a run's preflight decides on the labels and never builds the partitioner; without
    it partition 0 is cut (the sorted entry above is checked that way)."""
    from flwr_scaling.data.federated import check_partition

    seen = []

    def build_nothing(spec: PartitionSpec, labels: np.ndarray):
        raise AssertionError("the preflight check built the partitioner")

    def at_most_classes(spec: PartitionSpec, labels: np.ndarray) -> None:
        seen.append(len(labels))
        if spec.num_partitions > len(np.unique(labels)):
            raise ValueError(f"one class per client: use at most {len(np.unique(labels))} clients")

    register_partitioner("by-class", build_nothing, precheck=at_most_classes)
    try:
        check_partition(PartitionSpec(DataSpec(), 10, 0.5, "by-class"))
        with pytest.raises(ValueError, match="^one class per client: use at most 10 clients$"):
            check_partition(PartitionSpec(DataSpec(), 11, 0.5, "by-class"))
        assert seen == [1437, 1437]  # digits' training labels, both times
    finally:
        unregister_partitioner("by-class")


def test_a_partitioner_without_precheck_is_checked_by_cutting(sorted_partitioner, monkeypatch):
    from flwr_scaling.data import federated

    cut = []
    original = federated.cut_partition
    monkeypatch.setattr(federated, "cut_partition", lambda spec, pid: cut.append(pid) or original(spec, pid))
    federated.check_partition(PartitionSpec(DataSpec(), 5, 0.5, "sorted"))
    assert cut == [0]
    with pytest.raises(ValueError, match="^a sorted split takes at most 10 clients, got 11$"):
        federated.check_partition(PartitionSpec(DataSpec(), 11, 0.5, "sorted"))
