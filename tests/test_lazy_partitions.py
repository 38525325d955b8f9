"""Partitions are cut lazily and looked up once per process (in-process, no Ray)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from flwr_scaling.data import federated as data_module
from flwr_scaling.data.federated import DataSpec, PartitionSpec, load_federated_data, load_partition, partition_indices

DIGITS = DataSpec()


@pytest.fixture
def calls(monkeypatch):
    """The partition ids that reach flwr-datasets' ``load_partition``, in order (fresh partitioners)."""
    data_module.partitioner_for.cache_clear()
    seen: list[int] = []
    build = data_module.partitioner_for.__wrapped__

    def counting_build(spec):
        partitioner = build(spec)
        original = partitioner.load_partition

        def load(partition_id):
            seen.append(partition_id)
            return original(partition_id)

        partitioner.load_partition = load
        return partitioner

    monkeypatch.setattr(data_module, "partitioner_for", functools.lru_cache(maxsize=4)(counting_build))
    yield seen
    data_module.partitioner_for.cache_clear()


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_one_partition_of_many_touches_only_its_own_rows(calls, partitioner):
    clients = 1000 if partitioner == "iid" else 100  # digits: 1437 training rows, Dirichlet needs 10 per client
    spec = PartitionSpec(DIGITS, clients, 0.5 if partitioner == "iid" else 100.0, partitioner)
    part = load_partition(spec, 7)
    assert calls == [7]  # nobody else's partition was asked for
    indices = partition_indices(spec, 7)
    assert len(part) == len(indices) < 0.05 * len(load_federated_data(DIGITS).train)
    cache = getattr(data_module.partitioner_for(spec), data_module.PARTITION_INDICES_ATTR)
    assert list(cache) == [7]  # the process keeps the rows of the partitions it used, nothing else
    again = load_partition(spec, 7)
    assert calls == [7]  # the second load is a lookup
    np.testing.assert_array_equal(again.features, part.features)
    assert again.features is not part.features  # callers get their own copy of the rows


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid", "shard"])
def test_cached_lookup_gives_the_same_rows_as_flwr_datasets(partitioner):
    spec = PartitionSpec(DIGITS, 10, 0.5, partitioner, 2)
    data_module.partitioner_for.cache_clear()
    train = load_federated_data(DIGITS).train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for pid in (3, 0, 9, 3):
            expected = np.asarray(data_module.partitioner_for(spec).load_partition(pid)["index"], dtype=np.int64)
            np.testing.assert_array_equal(partition_indices(spec, pid), expected)
            np.testing.assert_array_equal(load_partition(spec, pid).labels, train.labels[expected])


def test_indices_are_read_only_and_dropped_with_the_partitioner():
    spec = PartitionSpec(DIGITS, 10, 0.5, "iid")
    indices = partition_indices(spec, 2)
    with pytest.raises(ValueError):
        indices[0] = 0
    data_module.partitioner_for.cache_clear()
    assert getattr(data_module.partitioner_for(spec), data_module.PARTITION_INDICES_ATTR, None) is None
    np.testing.assert_array_equal(partition_indices(spec, 2), indices)


@pytest.mark.parametrize("partitioner, cut", [("dirichlet", [0]), ("iid", []), ("shard", [])])
def test_preflight_cuts_at_most_one_partition_of_many(calls, partitioner, cut):
    """The pre-Ray check of a 100-client run asks flwr-datasets for partition 0 of a Dirichlet split and for
    none of an iid or shard split (judged on the labels: ``check_partition``)."""
    from flwr_scaling.run.config import RunConfig
    from flwr_scaling.run.simulation import preflight

    preflight(RunConfig(num_clients=100, partitioner=partitioner, dirichlet_alpha=5.0).resolved())
    assert calls == cut
