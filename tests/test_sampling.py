"""Devices that come and go: the sampler waits for a missing node once, not every round;
a node that comes back is sampled again; every node gets a distinct rank.

The sampler's clock and sleep are a fake clock here, so "how long a round waited"
is counted exactly (no timed assertions).
"""

from __future__ import annotations

import random

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from flwr_scaling.run.config import RunConfig
from flwr_scaling.server_app import describe_nodes, make_strategy
from flwr_scaling.strategies.sampling import NodeSampler, assign_ranks

try:
    from .fakes import FakeGrid
except ImportError:
    from fakes import FakeGrid

A, B, C, D = 11, 12, 13, 14
WAIT_S = 30.0


class FakeClock:
    """``monotonic`` and ``sleep`` for the sampler: sleeping moves the time on, and may run ``on_sleep``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0
        self.on_sleep = None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def sampler(clock: FakeClock, **kwargs) -> NodeSampler:
    options = dict(seed=5, node_order={A: 0, B: 1, C: 2}, wait_s=WAIT_S, clock=clock.monotonic, sleep=clock.sleep)
    return NodeSampler(**{**options, **kwargs})


def round_of(nodes: NodeSampler, grid: FakeGrid, clock: FakeClock, *, expected: int = 3, per_round: int = 3):
    """One round's sample (sorted) and the seconds it waited."""
    before = clock.slept
    chosen = nodes.sample(grid, fraction=per_round / expected, minimum=per_round, min_available=expected,
                          min_successful=1)
    return sorted(chosen), clock.slept - before


def test_a_missing_node_costs_one_wait_and_a_returning_node_is_sampled_again():
    clock = FakeClock()
    grid = FakeGrid((A, B, C))
    nodes = sampler(clock)
    assert round_of(nodes, grid, clock) == ([A, B, C], 0.0)
    grid.node_ids.remove(C)  # the device dropped out
    assert round_of(nodes, grid, clock) == ([A, B], WAIT_S)  # the first round without it waits, once
    assert round_of(nodes, grid, clock) == ([A, B], 0.0)  # later rounds do not wait again
    assert round_of(nodes, grid, clock) == ([A, B], 0.0)
    grid.node_ids.append(C)  # it came back
    assert round_of(nodes, grid, clock) == ([A, B, C], 0.0)
    grid.node_ids.remove(B)  # a new departure waits once more
    assert round_of(nodes, grid, clock) == ([A, C], WAIT_S)
    assert round_of(nodes, grid, clock) == ([A, C], 0.0)


def test_a_second_node_leaving_waits_once_for_it():
    clock = FakeClock()
    grid = FakeGrid((A, B, C))
    nodes = sampler(clock)
    grid.node_ids.remove(C)
    assert round_of(nodes, grid, clock) == ([A, B], WAIT_S)
    grid.node_ids.remove(B)  # one more missing than was waited for
    assert round_of(nodes, grid, clock) == ([A], WAIT_S)
    assert round_of(nodes, grid, clock) == ([A], 0.0)


def test_a_node_that_returns_during_the_wait_is_used_in_that_round():
    clock = FakeClock()
    grid = FakeGrid((A, B))
    nodes = sampler(clock)
    clock.on_sleep = lambda: grid.node_ids.append(C) if clock.slept >= 3 and C not in grid.node_ids else None
    assert round_of(nodes, grid, clock) == ([A, B, C], 3.0)


def test_fewer_than_min_available_clients_waits_past_the_timeout_until_enough_connect():
    clock = FakeClock()
    grid = FakeGrid((A,))
    nodes = sampler(clock, min_available=2)
    clock.on_sleep = lambda: grid.node_ids.append(B) if clock.slept >= 2 * WAIT_S and B not in grid.node_ids else None
    assert round_of(nodes, grid, clock) == ([A, B], 2 * WAIT_S)
    # B came only after wait-for-nodes-s had passed: the round gave up on C then, and later rounds do not wait for it
    assert nodes.tolerated_missing == 1
    assert round_of(nodes, grid, clock) == ([A, B], 0.0)


def test_samples_among_the_connected_nodes_with_the_configured_share():
    clock = FakeClock()
    everyone = [A, B, C, D, 15, 16, 17, 18, 19, 20]
    grid = FakeGrid(everyone)
    nodes = sampler(clock, node_order={node: rank for rank, node in enumerate(everyone)})
    chosen, _ = round_of(nodes, grid, clock, expected=10, per_round=3)
    assert len(chosen) == 3
    for node in (A, B, C, D):
        grid.node_ids.remove(node)
    chosen, waited = round_of(nodes, grid, clock, expected=10, per_round=3)
    assert waited == WAIT_S and len(chosen) == 3 and set(chosen) <= set(grid.node_ids)
    assert len(round_of(nodes, grid, clock, expected=10, per_round=6)[0]) == 6  # max(int(6 · 0.6), 6), all it has


def test_with_every_node_connected_the_sample_is_the_seeded_one():
    # The draw a run with all its nodes has always made: random.Random(seed).sample of the ranked nodes.
    clock = FakeClock()
    grid = FakeGrid((C, A, D, B))
    nodes = sampler(clock, node_order={A: 3, B: 2, C: 1, D: 0})
    reference = random.Random(5)
    for _ in range(4):
        assert nodes.sample(grid, fraction=0.5, minimum=2, min_available=4, min_successful=1) == \
            reference.sample([D, C, B, A], 2)


def test_a_node_first_seen_later_gets_the_next_free_rank_and_keeps_it():
    clock = FakeClock()
    grid = FakeGrid((A, B, C))
    nodes = sampler(clock)
    grid.node_ids.remove(C)
    grid.node_ids.append(D)  # e.g. the SuperNode restarted under a new node id
    assert nodes.ordered(grid) == [A, B, D]
    assert nodes.node_order == {A: 0, B: 1, C: 2, D: 3}
    grid.node_ids.append(C)
    assert nodes.ordered(grid) == [A, B, C, D]


def test_colliding_partition_ids_get_distinct_ranks_and_are_logged(flower_warnings):
    ranks = assign_ranks({A: 0, B: 0, C: None, D: 1})
    assert ranks == {A: 0, D: 1, B: 2, C: 3}
    assert flower_warnings() == [
        f"Nodes {A} and {B} both report partition-id 0; node {B} gets a rank of its own "
        "(start every SuperNode with a distinct partition-id)"
    ]
    assert assign_ranks({D: 0}, taken={A: 0, B: 1}) == {A: 0, B: 1, D: 2}  # ranks already given are kept


def test_describe_nodes_ranks_nodes_with_the_same_or_no_partition_id_apart(task_identity):
    def answers(partition):
        def answer(query: Message) -> Message:
            metrics = MetricRecord({} if partition is None else {"partition-id": partition})
            return Message(RecordDict({"metrics": metrics}), reply_to=query)
        return answer

    # two devices started with the same partition-id, one with none (its own data)
    grid = FakeGrid((A, B, C), {A: answers(1), B: answers(1), C: answers(None)})
    assert describe_nodes(grid, {}, timeout_s=5.0) == {A: 1, B: 2, C: 3}


def test_make_strategy_samples_with_min_available_clients_and_the_wait():
    cfg = RunConfig(num_clients=4, min_available_clients=2, wait_for_nodes_s=7.0).resolved()
    strategy = make_strategy(cfg, node_order={A: 0, B: 1})
    assert (strategy.sampler.min_available, strategy.sampler.wait_s) == (2, 7.0)
    assert strategy.sampler.node_order == {A: 0, B: 1}


@pytest.mark.parametrize("value, fragment", [(0, "min-available-clients must be"),
                                             (5, "min-available-clients (5) cannot exceed num-clients (4)")])
def test_min_available_clients_is_checked(value, fragment):
    from flwr_scaling.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        RunConfig(num_clients=4, min_available_clients=value).validate()
    assert fragment in str(error.value)
