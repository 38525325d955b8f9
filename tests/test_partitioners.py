"""The three partitioners (flwr-datasets) on digits: sizes, classes, seeds, impossible settings, the plot."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flwr_scaling.data import federated as data_module
from flwr_scaling.data.federated import DataSpec, PartitionSpec, check_partition, load_federated_data, load_partition
from flwr_scaling.data.partition_plot import plot_partitions

DIGITS = DataSpec()
TRAIN = len(load_federated_data(DIGITS).train)  # 1437


def parts(spec: PartitionSpec) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [load_partition(spec, i) for i in range(spec.num_partitions)]


def label_counts(spec: PartitionSpec) -> np.ndarray:
    classes = load_federated_data(spec.data).num_classes
    return np.stack([np.bincount(p.labels, minlength=classes) for p in parts(spec)])


def fresh(spec: PartitionSpec) -> np.ndarray:
    """The partition cut again from scratch (no cached partitioner)."""
    data_module.partitioner_for.cache_clear()
    return label_counts(spec)


def test_existing_call_keeps_dirichlet():
    spec = PartitionSpec(DIGITS, 10, 0.5)
    assert spec.partitioner == "dirichlet" and spec.shard_classes == 2


def test_dirichlet_unchanged():
    """The same flwr-datasets DirichletPartitioner call as before this change."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    spec = PartitionSpec(DIGITS, 10, 0.5)
    train = load_federated_data(DIGITS).train
    reference = DirichletPartitioner(
        num_partitions=10, partition_by="label", alpha=0.5, min_partition_size=10,
        self_balancing=False, shuffle=True, seed=0,
    )
    reference.dataset = Dataset.from_dict({"index": np.arange(len(train)), "label": train.labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, part in enumerate(parts(spec)):
            expected = np.asarray(reference.load_partition(i)["index"])
            np.testing.assert_array_equal(part.labels, train.labels[expected])
            np.testing.assert_array_equal(part.features, train.features[expected])
    assert sum(len(p) for p in parts(spec)) == TRAIN


def test_iid_sizes_even_and_cover_the_training_split():
    spec = PartitionSpec(DIGITS, 7, 0.5, "iid")
    sizes = [len(p) for p in parts(spec)]
    assert sum(sizes) == TRAIN and max(sizes) - min(sizes) <= 1
    # Every training example exactly once: the pooled features are a permutation of the training split.
    pooled = np.concatenate([p.features.reshape(len(p), -1) for p in parts(spec)])
    train = load_federated_data(DIGITS).train.features.reshape(TRAIN, -1)
    assert np.array_equal(np.unique(pooled, axis=0), np.unique(train, axis=0)) and len(pooled) == TRAIN
    # Shuffled: every client sees (nearly) every class.
    assert (label_counts(spec) > 0).sum(axis=1).min() >= 9


@pytest.mark.parametrize("clients, classes", [(10, 2), (10, 1), (4, 7), (23, 3), (10, 10)])
def test_shard_gives_every_client_exactly_shard_classes(clients, classes):
    spec = PartitionSpec(DIGITS, clients, 0.5, "shard", classes)
    counts = label_counts(spec)
    assert ((counts > 0).sum(axis=1) == classes).all()
    assert counts.sum(axis=1).min() >= 1
    assert counts.sum() == TRAIN  # clients + classes - 1 >= 10: no class is left out


def test_shard_with_too_few_slots_warns_and_leaves_classes_out():
    spec = PartitionSpec(DIGITS, 3, 0.5, "shard", 3)
    data_module.partitioner_for.cache_clear()
    with pytest.warns(UserWarning, match="leave 5 of the 10 classes to no client"):
        load_partition(spec, 0)
    counts = label_counts(spec)
    assert ((counts > 0).sum(axis=1) == 3).all() and (counts.sum(axis=0) > 0).sum() == 5


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid", "shard"])
def test_reproducible_from_the_seed_and_different_for_another(partitioner):
    spec = PartitionSpec(DIGITS, 10, 0.5, partitioner, 2)
    first = fresh(spec)
    np.testing.assert_array_equal(first, fresh(spec))
    other = fresh(PartitionSpec(DataSpec(seed=1), 10, 0.5, partitioner, 2))
    assert not np.array_equal(first, other)


def test_shard_class_pairs_depend_on_the_seed():
    def pairs(seed: int) -> set:
        counts = label_counts(PartitionSpec(DataSpec(seed=seed), 10, 0.5, "shard", 2))
        return {tuple(np.flatnonzero(row)) for row in counts}

    assert pairs(0) == pairs(0) and pairs(0) != pairs(1)


@pytest.mark.parametrize(
    "spec, message",
    [
        (PartitionSpec(DIGITS, 10, 0.5, "shard", 11),
         "shard-classes 11 is impossible: the training split has 10 classes; use shard-classes between 1 and 10"),
        (PartitionSpec(DIGITS, 143, 0.5, "shard", 10),
         "so some client would get no example of it; use at most 139 clients or shard-classes at most 9"),
        (PartitionSpec(DIGITS, 1500, 0.5, "iid"),
         "an iid split of 1437 training examples into 1500 clients leaves some client without data; use at most 1437 clients"),
        (PartitionSpec(DIGITS, 200, 0.01), "cannot give every client 10 examples; use at most 9 clients (checked) "
                                           "or a larger dirichlet-alpha"),
        (PartitionSpec(DIGITS, 10, 0.5, "pathological"), "partitioner: unknown value 'pathological'"),
    ],
    ids=["shard-too-many-classes", "shard-too-many-clients", "iid-too-many-clients", "dirichlet", "unknown"],
)
@pytest.mark.parametrize("check", [lambda spec: load_partition(spec, 0), check_partition], ids=["cut", "check"])
def test_impossible_settings_give_one_line(spec, message, check):
    """Cutting a partition and the run's preflight check (``check_partition``) say the same."""
    with pytest.raises(ValueError) as error:
        check(spec)
    assert "\n" not in str(error.value) and message in str(error.value)


def test_dirichlet_suggestion_works():
    """The client count an impossible Dirichlet split suggests (9, above) is one that splits."""
    assert all(len(p) >= 10 for p in parts(PartitionSpec(DIGITS, 9, 0.01)))


def test_shard_feasibility_is_exact():
    """The bound in the message is tight: its client count works, one more does not."""
    ok = PartitionSpec(DIGITS, 139, 0.5, "shard", 10)
    assert all(len(p) >= 1 for p in parts(ok))
    with pytest.raises(ValueError, match="at most 139 clients"):
        load_partition(PartitionSpec(DIGITS, 140, 0.5, "shard", 10), 0)
    check_partition(ok)  # the preflight's check, on the labels alone, draws the same line
    with pytest.raises(ValueError, match="at most 139 clients"):
        check_partition(PartitionSpec(DIGITS, 140, 0.5, "shard", 10))


def test_iid_check_is_exact():
    check_partition(PartitionSpec(DIGITS, TRAIN, 0.5, "iid"))  # one example each
    assert min(len(p) for p in parts(PartitionSpec(DIGITS, TRAIN, 0.5, "iid"))) == 1
    with pytest.raises(ValueError, match=f"use at most {TRAIN} clients"):
        check_partition(PartitionSpec(DIGITS, TRAIN + 1, 0.5, "iid"))


def test_check_says_the_shard_caveat():
    with pytest.warns(UserWarning, match="leave 5 of the 10 classes to no client"):
        check_partition(PartitionSpec(DIGITS, 3, 0.5, "shard", 3))


@pytest.mark.parametrize("partitioner, imported", [("iid", False), ("shard", False), ("dirichlet", True)])
def test_check_builds_no_flwr_datasets_partitioner_for_iid_and_shard(partitioner, imported):
    """Importing flwr-datasets (and datasets, seaborn, scipy with it) is 2 s of a simulation's start-up: the
    preflight check of an iid or shard split does without it; a Dirichlet split must be cut to be judged."""
    import subprocess
    import sys

    code = ("import sys; from flwr_scaling.data.federated import DataSpec, PartitionSpec, check_partition; "
            f"check_partition(PartitionSpec(DataSpec(), 10, 0.5, {partitioner!r})); "
            "print(sorted(m for m in ('flwr_datasets', 'datasets') if m in sys.modules))")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == ("['datasets', 'flwr_datasets']" if imported else "[]")


@pytest.mark.parametrize("partitioner", ["dirichlet", "shard"])
def test_plot_is_a_png(tmp_path, partitioner):
    path = plot_partitions(PartitionSpec(DIGITS, 10, 0.5, partitioner, 2), tmp_path / "plots" / "partition.png")
    assert path == tmp_path / "plots" / "partition.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["partition.png"]  # no temporary file left


def test_plot_of_impossible_settings_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="shard-classes 11 is impossible"):
        plot_partitions(PartitionSpec(DIGITS, 10, 0.5, "shard", 11), tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_plot_of_many_clients_draws_the_first_hundred_and_says_so(tmp_path):
    from flwr_scaling.data.partition_plot import plot_title

    many = PartitionSpec(DIGITS, 120, 0.5, "iid", 2)
    assert plot_title(many) == "digits: first 100 of 120 clients, iid, seed 0"
    assert plot_title(PartitionSpec(DIGITS, 100, 0.5, "iid", 2)) == "digits: 100 clients, iid, seed 0"
    assert plot_partitions(many, tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
