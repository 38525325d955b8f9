"""Clients keep x⁰ from the warm-up, so round 1 does not send the model again to the nodes that hold it.

The strategy is driven with a fake grid (hand-made replies); the client side
is the real ClientApp, called with one ``Context`` per node across messages
as a SuperNode does.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flwr_scaling.clients import client_app
from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.core.seeding import initial_model
from flwr_scaling.data.federated import load_federated_data
from flwr_scaling.protocol.records import content_bytes, numpy_to_record
from flwr_scaling.protocol.wire import MODEL_VERSION_KEY
from flwr_scaling.run.config import RunConfig
from flwr_scaling.strategies import WARMUP_MESSAGE_TYPE, Savic

try:  # tests/ as a package or as a rootdir-inserted folder
    from .fakes import FakeGrid, error_reply, f32, record, stats_reply, train_reply
except ImportError:  # pragma: no cover
    from fakes import FakeGrid, error_reply, f32, record, stats_reply, train_reply

pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a task identity (conftest)

A, B, C = 11, 12, 13
X0 = {"w": f32([0, 0], [0, 0]), "b": f32(0, 0)}
WARM = {"w": f32([4, 4], [4, 4]), "b": f32(16, 16)}
MODEL_BYTES = sum(len(a.data) for a in record(X0).values())
STATE_BYTES = MODEL_BYTES  # float32 state, same layout as the model


def keeper(query: Message) -> Message:
    """A warm-up answer from a node that kept x⁰ (as this project's ClientApp does)."""
    reply = stats_reply(query, WARM, 1)
    reply.content["metrics"][MODEL_VERSION_KEY] = query.content["config"][MODEL_VERSION_KEY]
    return reply


def configure(strategy: Savic, grid: FakeGrid, server_round: int, config: ConfigRecord) -> dict[int, Message]:
    messages = list(strategy.configure_train(server_round, record(X0), config, grid))
    return {m.metadata.dst_node_id: m for m in messages}


def test_round_one_sends_no_model_to_nodes_that_kept_x0():
    strategy = Savic(precond="rmsprop", sampling_seed=0, min_train_nodes=3, min_available_nodes=3)
    # C answers the warm-up without confirming (e.g. a user's ClientApp that keeps nothing)
    grid = FakeGrid([A, B, C], {A: keeper, B: keeper, C: (WARM, 1)})
    config = ConfigRecord({"lr": 0.1})  # Flower passes the same train config object every round
    first = configure(strategy, grid, 1, config)
    queries = grid.sent
    assert {q.content["config"][MODEL_VERSION_KEY] for q in queries} == {1}
    assert {node for node, m in first.items() if "arrays" in m.content.array_records} == {C}
    assert all("precond" in m.content.array_records for m in first.values())
    assert {m.content["config"][MODEL_VERSION_KEY] for m in first.values()} == {1}
    strategy.aggregate_train(1, [train_reply(m, X0, WARM, 1) for m in first.values()])
    # warm-up: 3 models down, 3 statistics up; round 1: the state to all three, the model to C only
    assert strategy.history[1]["bytes_down"] == 3 * MODEL_BYTES + 3 * STATE_BYTES + MODEL_BYTES
    assert strategy.history[1]["bytes_down"] == sum(content_bytes(m.content) for m in [*queries, *first.values()])
    second = configure(strategy, grid, 2, config)
    assert all("arrays" in m.content.array_records for m in second.values())
    assert all(MODEL_VERSION_KEY not in m.content["config"] for m in second.values())


def test_a_failed_warmup_reply_gets_the_model_in_round_one():
    strategy = Savic(precond="rmsprop", sampling_seed=0, min_train_nodes=2, min_available_nodes=2)
    grid = FakeGrid([A, B], {A: keeper, B: error_reply})
    first = configure(strategy, grid, 1, ConfigRecord({"lr": 0.1}))
    assert {node for node, m in first.items() if "arrays" in m.content.array_records} == {B}


# ------------------------------------------------------------------ the client
CFG = RunConfig(dataset="wine", model="logreg", num_clients=3, precond="rmsprop", rounds=3)


def node_context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={})


def message(message_type: str, *, with_model: bool, model_version: int | None) -> Message:
    data = load_federated_data(CFG.data_spec())
    model = initial_model("logreg", data.input_shape, data.num_classes, CFG.seed)
    config = {**CFG.to_flower(), "server-round": 1}
    if model_version is not None:
        config[MODEL_VERSION_KEY] = model_version
    content = RecordDict({"config": ConfigRecord(config)})
    if with_model:
        content["arrays"] = numpy_to_record(torch_to_numpy(model.state_dict()))
    return Message(content=content, dst_node_id=7, message_type=message_type)


def test_client_keeps_x0_and_trains_from_it_exactly_as_from_a_sent_model():
    context = node_context()
    warm = client_app.app(message(WARMUP_MESSAGE_TYPE, with_model=True, model_version=1), context)
    assert warm.content["metrics"][MODEL_VERSION_KEY] == 1
    assert "model-cache" in context.state.array_records
    cached = client_app.app(message(MessageType.TRAIN, with_model=False, model_version=1), context)
    sent = client_app.app(message(MessageType.TRAIN, with_model=True, model_version=1), node_context())
    assert not cached.has_error() and not sent.has_error()
    for key, array in sent.content["arrays"].items():
        assert np.array_equal(array.numpy(), cached.content["arrays"][key].numpy())
    assert "model-cache" not in context.state.array_records  # used once, then forgotten


def test_warmup_without_a_model_version_keeps_nothing():
    context = node_context()
    warm = client_app.app(message(WARMUP_MESSAGE_TYPE, with_model=True, model_version=None), context)
    assert MODEL_VERSION_KEY not in warm.content["metrics"]
    assert "model-cache" not in context.state.array_records


def test_client_without_x0_replies_with_an_error():
    reply = client_app.app(message(MessageType.TRAIN, with_model=False, model_version=1), node_context())
    assert reply.has_error() and reply.error.code == client_app.MISSING_STATE_ERROR
    assert reply.error.reason == (
        "warm-up: this train message carries no model and this node holds no x⁰ of round 1 (it holds none); "
        "the server must send it"
    )


# ------------------------------------------------- the whole path: a node loses x⁰
def test_a_node_that_lost_x0_fails_once_then_gets_the_model(tmp_path):
    from flwr_scaling.run.recorder import read_metrics
    from flwr_scaling.server_app import run_server

    cfg = RunConfig(dataset="wine", model="logreg", num_clients=3, clients_per_round=3, rounds=2, precond="rmsprop",
                    warmup_batches=1, out=str(tmp_path / "run"))
    nodes = {100 + pid: Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": 3},
                                state=RecordDict(), run_config={}) for pid in range(3)}
    forgetful = 101

    def answer(node: int):
        def respond(m: Message) -> Message:
            if node == forgetful and m.metadata.message_type == MessageType.TRAIN:
                nodes[node].state = RecordDict()  # a fresh process: x⁰ (and everything else) is gone
            return client_app.app(m, nodes[node])
        return respond

    grid = FakeGrid(nodes, {node: answer(node) for node in nodes})
    run_server(grid, cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(2, 1), (3, 0)]
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    # round 1: no model to any node (all three confirmed x⁰); round 2: the model to all three
    assert [sum("arrays" in m.content.array_records for m in train[i:i + 3]) for i in (0, 3)] == [0, 3]
    warmup = [m for m in grid.sent if m.metadata.message_type == WARMUP_MESSAGE_TYPE]
    assert rows[0]["bytes_down"] == sum(content_bytes(m.content) for m in [*warmup, *train[:3]])
    assert rows[1]["bytes_down"] == sum(content_bytes(m.content) for m in train[3:])
