"""Start-up in simulation: ``describe_nodes`` ranks nodes from the runtime's node -> partition map and sends
no query per node; without a complete map it asks every node (deployment, or a node the map lacks)."""

from __future__ import annotations

from flwr.app import Message, MetricRecord, RecordDict

from flwr_scaling.server_app import NODE_INFO_MESSAGE_TYPE, describe_nodes

try:
    from .fakes import FakeGrid
except ImportError:  # tests run as top-level modules
    from fakes import FakeGrid

NODES = (101, 202, 303)


class MappedGrid(FakeGrid):
    """A grid that knows each node's partition id, as the simulation's grid does (``run/simulation.py``)."""

    def __init__(self, node_ids, partitions, answers=None) -> None:
        super().__init__(node_ids, answers)
        self.partitions = partitions
        self.asked_with: list[float] = []

    def node_partitions(self, timeout: float) -> dict[int, int] | None:
        self.asked_with.append(timeout)
        return dict(self.partitions)


def answer(partition: int):
    def reply(query: Message) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition})}), reply_to=query)
    return reply


def test_with_the_map_no_message_goes_to_any_node():
    grid = MappedGrid(NODES, {101: 2, 202: 0, 303: 1})  # no answers: a query would raise KeyError
    assert describe_nodes(grid, {}, timeout_s=7.0) == {101: 2, 202: 0, 303: 1}
    assert grid.sent == [] and grid.asked_with == [7.0]


def test_a_thousand_nodes_take_no_message():
    nodes = range(1, 1001)
    grid = MappedGrid(nodes, {node: 1000 - node for node in nodes})
    ranks = describe_nodes(grid, {}, timeout_s=1.0)
    assert grid.sent == [] and ranks[1] == 999 and ranks[1000] == 0 and len(ranks) == 1000


def test_a_node_missing_from_the_map_makes_the_server_ask_every_node(task_identity):
    grid = MappedGrid(NODES, {101: 2, 202: 0}, answers={node: answer(index) for index, node in enumerate(NODES)})
    assert describe_nodes(grid, {}, timeout_s=5.0) == {101: 0, 202: 1, 303: 2}  # the nodes' own answers
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == list(NODES)
    assert {m.metadata.message_type for m in grid.sent} == {NODE_INFO_MESSAGE_TYPE}


def test_without_a_map_every_node_is_asked_once(task_identity):
    grid = FakeGrid(NODES, answers={node: answer(index) for index, node in enumerate(NODES)})
    assert describe_nodes(grid, {}, timeout_s=5.0) == {101: 0, 202: 1, 303: 2}
    assert len(grid.calls) == 1 and len(grid.sent) == 3  # all queries in one send_and_receive
