"""``precond-every K``: the state travels only in refresh rounds, and to nodes that lack its version.

The strategy is driven in-process with a fake grid (hand-made replies); the
client side is the real ClientApp ``train`` handler, called with one
``Context`` across messages as a SuperNode does.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flwr_scaling.protocol.flower_adapter import task_identity as server_task_identity
from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.protocol.records import numpy_to_record
from flwr_scaling.clients import client_app
from flwr_scaling.protocol.wire import VERSION_KEY, put_encoded, wire_view
from flwr_scaling.run.config import RunConfig
from flwr_scaling.data.federated import load_federated_data
from flwr_scaling.core.seeding import initial_model
from flwr_scaling.strategies import WARMUP_MESSAGE_TYPE, Savic

try:  # tests/ as a package or as a rootdir-inserted folder
    from .fakes import flower_warnings_during, f32, FakeGrid, as_numpy, error_reply, record, stats_reply, train_reply
except ImportError:  # pragma: no cover
    from fakes import flower_warnings_during, f32, FakeGrid, as_numpy, error_reply, record, stats_reply, train_reply


A, B, C, D = 11, 12, 13, 14
X0 = {"w": f32([0, 0], [0, 0]), "b": f32(0, 0)}
X_NEW = {"w": f32([1, 1], [1, 1]), "b": f32(1, 1)}
# Warm-up statistics: every node sends WARM, so v0 = WARM whatever the weights
WARM = {"w": f32([4, 4], [4, 4]), "b": f32(16, 16)}
# Round statistics: every node sends S, so s̄ = S; with beta 0.5, v <- (v + S) / 2
S = {"w": f32([0, 0], [0, 0]), "b": f32(0, 0)}
MODEL_BYTES = sum(len(a.data) for a in record(X0).values())
STATE_BYTES = MODEL_BYTES  # float32 state, same layout as the model


pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a task identity (conftest)

def make(**kwargs) -> Savic:
    options = dict(precond="rmsprop", precond_beta=0.5, sampling_seed=0, min_train_nodes=2, min_available_nodes=2)
    options.update(kwargs)
    return Savic(**options)


def grid_of(nodes) -> FakeGrid:
    return FakeGrid(nodes, {node: (WARM, 1) for node in nodes})


def configure(strategy: Savic, grid: FakeGrid, server_round: int) -> dict[int, Message]:
    messages = list(strategy.configure_train(server_round, record(X0), ConfigRecord({"lr": 0.1}), grid))
    return {m.metadata.dst_node_id: m for m in messages}


def reply_all(strategy: Savic, server_round: int, messages: dict[int, Message], failing=()) -> None:
    replies = [error_reply(m) if node in failing else train_reply(m, X_NEW, S, 1) for node, m in messages.items()]
    strategy.aggregate_train(server_round, replies)




def with_state(messages: dict[int, Message]) -> set[int]:
    return {node for node, m in messages.items() if "precond" in m.content.array_records}


# ------------------------------------------------------------------ the strategy
def test_state_is_sent_only_in_refresh_rounds_with_full_participation():
    strategy = make(precond_every=2)
    grid = grid_of([A, B])
    sent = {}
    for server_round in range(1, 6):
        messages = configure(strategy, grid, server_round)
        sent[server_round] = (with_state(messages), {m.content["config"][VERSION_KEY] for m in messages.values()})
        reply_all(strategy, server_round, messages)
    # refreshes in rounds 1, 3, 5 (version = that round); rounds 2 and 4 send no state
    assert sent == {1: ({A, B}, {1}), 2: (set(), {1}), 3: ({A, B}, {3}), 4: (set(), {3}), 5: ({A, B}, {5})}


def test_bytes_down_drop_in_rounds_without_state():
    strategy = make(precond_every=2, precond_init="ones")
    grid = grid_of([A, B])
    for server_round in range(1, 5):
        reply_all(strategy, server_round, configure(strategy, grid, server_round))
    # ones: no state until round 1 ends; round 2 is no refresh, so clients keep v = 1; round 3 sends it
    down = {r: strategy.history[r]["bytes_down"] for r in range(1, 5)}
    assert down == {
        1: 2 * MODEL_BYTES,
        2: 2 * MODEL_BYTES,
        3: 2 * (MODEL_BYTES + STATE_BYTES),
        4: 2 * MODEL_BYTES,
    }


def test_every_one_sends_the_state_every_round_as_before():
    strategy = make()  # precond_every not given, none in the config: 1
    grid = grid_of([A, B])
    for server_round in range(1, 4):
        messages = configure(strategy, grid, server_round)
        assert with_state(messages) == {A, B}
        assert {m.content["config"][VERSION_KEY] for m in messages.values()} == {server_round}
        reply_all(strategy, server_round, messages)
    assert strategy.precond_every == 1


def test_clients_train_with_the_stale_state_and_the_server_updates_every_round():
    strategy = make(precond_every=3)
    grid = grid_of([A, B])
    sent_b = []
    for server_round in range(1, 5):
        messages = configure(strategy, grid, server_round)
        sent = [as_numpy(m.content["precond"]) for m in messages.values() if "precond" in m.content.array_records]
        sent_b.append(sent[0]["b"].tolist() if sent else None)
        reply_all(strategy, server_round, messages)
    # v0 = WARM (b = 16); the server halves v every round (S = 0): 8, 4, 2, 1 after rounds 1, 2, 3, 4
    assert strategy.precond_state["b"].tolist() == [1.0, 1.0]
    assert sent_b == [[16.0, 16.0], None, None, [2.0, 2.0]]
    # D̂ bounds logged per round are those of the state the clients hold: sqrt(16) = 4 in rounds 1-3
    assert [strategy.history[r]["precond_max"] for r in (1, 2, 3, 4)] == [4.0, 4.0, 4.0, pytest.approx(np.sqrt(2.0))]


def test_partial_participation_sends_the_state_to_sampled_nodes_that_lack_it():
    strategy = make(precond_every=3, fraction_train=0.5, min_available_nodes=4)
    grid = grid_of([A, B, C, D])
    held: dict[int, int] = {}  # what each node holds, as the test sees it
    mixed_rounds = 0
    for server_round in range(1, 10):
        version = 1 + 3 * ((server_round - 1) // 3)
        messages = configure(strategy, grid, server_round)
        assert len(messages) == 2
        assert {m.content["config"][VERSION_KEY] for m in messages.values()} == {version}
        expected = {node for node in messages if held.get(node) != version}
        assert with_state(messages) == expected, server_round
        mixed_rounds += 0 < len(expected) < 2
        reply_all(strategy, server_round, messages)
        held.update({node: version for node in messages})
    assert mixed_rounds > 0, "the sampling never gave a round with and without the state; pick another seed"


def test_a_node_whose_reply_failed_gets_the_state_again():
    strategy = make(precond_every=5)
    grid = grid_of([A, B])
    reply_all(strategy, 1, configure(strategy, grid, 1), failing={B})
    messages = configure(strategy, grid, 2)
    assert with_state(messages) == {B}  # A acknowledged version 1; B may have lost it
    down = strategy.history[1]["bytes_down"]
    reply_all(strategy, 2, messages)
    assert strategy.history[2]["bytes_down"] == 2 * MODEL_BYTES + STATE_BYTES < down
    assert with_state(configure(strategy, grid, 3)) == set()


def test_a_client_that_lacks_the_state_is_counted_as_failed_and_served_next_time():
    strategy = make(precond_every=5)
    grid = grid_of([A, B])
    reply_all(strategy, 1, configure(strategy, grid, 1))
    messages = configure(strategy, grid, 2)
    assert with_state(messages) == set()
    reason = "precond-every: this node holds no preconditioner state of round 1 in float32 (it holds none)"
    logged = flower_warnings_during(
        lambda: strategy.aggregate_train(2, [train_reply(messages[A], X_NEW, S, 1), error_reply(messages[B], reason)])
    )
    assert (strategy.history[2]["clients_ok"], strategy.history[2]["clients_failed"]) == (1, 1)
    assert f"Rejected reply from node {B}: client raised: {reason}" in logged
    assert with_state(configure(strategy, grid, 3)) == {B}


def test_a_resumed_strategy_sends_the_state_in_its_first_round():
    # rounds 1-6 done before; 7 is no refresh round (1, 6, 11, ...)
    strategy = make(precond_every=5, precond_state={k: v.copy() for k, v in WARM.items()}, round_offset=6)
    messages = configure(strategy, grid_of([A, B]), 1)
    assert with_state(messages) == {A, B}
    assert {m.content["config"][VERSION_KEY] for m in messages.values()} == {7}
    reply_all(strategy, 1, messages)
    assert with_state(configure(strategy, grid_of([A, B]), 2)) == set()  # round 8


def test_options_come_from_the_train_config_when_not_given():
    strategy = make()
    config = ConfigRecord({"lr": 0.1, "precond-dtype": "bfloat16", "precond-every": 4})
    list(strategy.configure_train(1, record(X0), config, grid_of([A, B])))
    assert (strategy.precond_dtype, strategy.precond_every) == ("bfloat16", 4)
    explicit = make(precond_dtype="float16", precond_every=2)
    list(explicit.configure_train(1, record(X0), config, grid_of([A, B])))
    assert (explicit.precond_dtype, explicit.precond_every) == ("float16", 2)
    assert config["precond-dtype"] == "float16"  # the clients follow the server


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precond_every": 0}, "precond_every must be an integer >= 1, got 0"),
        ({"precond_every": 2.0}, "precond_every must be an integer >= 1, got 2.0"),
        ({"precond_dtype": "int8"}, "precond_dtype must be one of ('float32', 'bfloat16', 'float16'), got 'int8'"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError) as error:
        make(**kwargs)
    assert str(error.value) == message


def test_bad_option_in_the_train_config_raises_at_the_first_round():
    with pytest.raises(ValueError, match=r"^precond_every must be an integer >= 1, got 0$"):
        list(make().configure_train(1, record(X0), ConfigRecord({"precond-every": 0}), grid_of([A, B])))


def test_fedavg_accepts_the_options_and_sends_what_it_always_sent():
    def run(**kwargs):
        strategy = make(precond="identity", **kwargs)
        grid = grid_of([A, B])
        rounds = []
        for server_round in (1, 2):
            messages = configure(strategy, grid, server_round)
            rounds.append(sorted((node, sorted(m.content.keys()), sorted(m.content["config"].keys()))
                                 for node, m in messages.items()))
            strategy.aggregate_train(server_round, [train_reply(m, X_NEW, None, 1) for m in messages.values()])
        return rounds, [strategy.history[r]["bytes_down"] for r in (1, 2)], grid.calls

    plain, bytes_plain, calls_plain = run()
    cheap, bytes_cheap, calls_cheap = run(precond_dtype="bfloat16", precond_every=3)
    assert plain == cheap and bytes_plain == bytes_cheap == [2 * MODEL_BYTES] * 2
    assert calls_plain == calls_cheap == []  # no warm-up either
    # the client settings the strategy always sends (strategies/client_settings.py), and no dtype or version
    settings = ["adam-beta1", "lr", "precond", "precond-alpha", "precond-beta", "precond-mode", "precond-probes"]
    assert plain[0][0] == (A, ["arrays", "config"], [*settings, "server-round"])


# ------------------------------------------------------------------ the client
CLIENT_CFG = RunConfig(dataset="wine", model="logreg", num_clients=3, precond="rmsprop", rounds=3)


def client_message(cfg: RunConfig, *, version: int | None, state: dict | None, server_round: int = 2) -> Message:
    data = load_federated_data(cfg.data_spec())
    model = initial_model("logreg", data.input_shape, data.num_classes, cfg.seed)
    config = {**cfg.to_flower(), "server-round": server_round}
    if version is not None:
        config[VERSION_KEY] = version
    content = RecordDict({"arrays": numpy_to_record(torch_to_numpy(model.state_dict())), "config": ConfigRecord(config)})
    if state is not None:
        put_encoded(content, "precond", state, dtype=cfg.precond_dtype)
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def node_context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={})


def state_for(cfg: RunConfig, value: float) -> dict[str, np.ndarray]:
    data = load_federated_data(cfg.data_spec())
    model = initial_model("logreg", data.input_shape, data.num_classes, cfg.seed)
    return {k: np.full(tuple(p.shape), value, dtype=np.float32) for k, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_client_uses_its_cached_state_when_none_is_sent(dtype):
    cfg = replace(CLIENT_CFG, precond_dtype=dtype)
    context = node_context()
    state = state_for(cfg, 0.01)
    first = client_app.app(client_message(cfg, version=1, state=state), context)
    second = client_app.app(client_message(cfg, version=1, state=None), context)  # nothing sent: the cache
    without = client_app.app(client_message(cfg, version=None, state=None), node_context())  # v = 1
    assert not first.has_error() and not second.has_error()
    for key in ("arrays", "stats"):
        ours = {k: wire_view(a) for k, a in first.content[key].items()}
        cached = {k: wire_view(a) for k, a in second.content[key].items()}
        assert all(np.array_equal(ours[k], cached[k]) for k in ours), key
    assert not np.array_equal(as_numpy(first.content["arrays"])["1.weight"], as_numpy(without.content["arrays"])["1.weight"])
    assert context.state["precond-cache-info"]["version"] == 1


def test_client_without_the_expected_state_replies_with_an_error():
    cfg = CLIENT_CFG
    reply = client_app.app(client_message(cfg, version=4, state=None), node_context())  # a fresh node
    assert reply.has_error()
    assert reply.error.reason == (
        "precond-every: this node holds no preconditioner state of round 4 in float32 (it holds none); "
        "the server must send it"
    )
    context = node_context()
    client_app.app(client_message(cfg, version=1, state=state_for(cfg, 0.01)), context)
    stale = client_app.app(client_message(cfg, version=4, state=None), context)
    assert stale.error.reason.startswith(
        "precond-every: this node holds no preconditioner state of round 4 in float32 (it holds round 1's in float32)"
    )


def test_a_sent_state_replaces_the_cached_one():
    cfg = CLIENT_CFG
    context = node_context()
    client_app.app(client_message(cfg, version=1, state=state_for(cfg, 0.01)), context)
    newer = client_app.app(client_message(cfg, version=4, state=state_for(cfg, 5.0)), context)
    cached = client_app.app(client_message(cfg, version=4, state=None), context)
    assert context.state["precond-cache-info"]["version"] == 4
    assert np.array_equal(as_numpy(newer.content["arrays"])["1.weight"], as_numpy(cached.content["arrays"])["1.weight"])


def test_warmup_query_is_not_affected_by_the_cache():
    # The warm-up carries no state and names no version: a fresh node answers it.
    cfg = CLIENT_CFG
    content = client_message(cfg, version=None, state=None).content
    query = Message(content=content, dst_node_id=7, message_type=WARMUP_MESSAGE_TYPE)
    reply = client_app.app(query, node_context())
    assert not reply.has_error() and sorted(reply.content["stats"].keys()) == ["1.bias", "1.weight"]


# ------------------------------------------------- the whole path against the serial reference
@pytest.mark.parametrize(
    "dtype, every, mode",
    [("bfloat16", 2, "global"), ("float16", 3, "local"), ("float32", 2, "global")],
)
def test_server_and_clients_in_process_match_the_serial_reference(tmp_path, dtype, every, mode):
    """The real ServerApp logic and ClientApp (one Context per node, as on a SuperNode), 2 of 4 clients
    per round: the same model and the same D̂ bounds every round as the serial reference."""
    from flwr_scaling.run.recorder import read_metrics
    from flwr_scaling.run.serial import run_serial
    from flwr_scaling.server_app import run_server

    cfg = RunConfig(dataset="wine", model="logreg", num_clients=4, clients_per_round=2, rounds=5, precond="rmsprop",
                    precond_mode=mode, precond_dtype=dtype, precond_every=every, warmup_batches=1,
                    out=str(tmp_path / "run"))
    nodes = {100 + pid: Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": 4},
                                state=RecordDict(), run_config={}) for pid in range(4)}
    grid = FakeGrid(nodes, {node: (lambda m, c=context: client_app.app(m, c)) for node, context in nodes.items()})
    strategy = run_server(grid, cfg)
    rows, reference = run_serial(cfg)
    flower = read_metrics(tmp_path / "run" / "metrics.csv")
    assert all(r["clients_failed"] == 0 for r in flower)
    for ours, theirs in zip(flower, rows, strict=True):
        assert ours["precond_max"] == pytest.approx(theirs.precond_max, rel=1e-6)
        assert ours["test_accuracy"] == pytest.approx(theirs.test_accuracy)
    from flwr_scaling.run.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "run").model
    for key, value in reference.items():
        np.testing.assert_allclose(model[key], value, rtol=1e-5, atol=1e-6)
    # the state went down only to nodes that lacked the version of the last refresh round
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN and "precond" in m.content.array_records]
    assert 0 < len(sent) < 2 * cfg.rounds if every > 1 else len(sent) == 2 * cfg.rounds
    assert strategy.precond_every == every and strategy.precond_dtype == dtype


class _StopAtRound:
    """This project's ClientApp, but the process "dies" (KeyboardInterrupt) when round ``round`` starts."""

    def __init__(self, round_: int):
        from flwr_scaling.clients import app

        self.app, self.round = app, round_

    def __call__(self, message, context):
        if message.metadata.message_type == "train" and int(message.content["config"]["server-round"]) == self.round:
            raise KeyboardInterrupt
        return self.app(message, context)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_resumed_between_refreshes_ends_as_the_uninterrupted_run(tmp_path, dtype):
    """precond-every 3: stopped after round 2 and resumed, round 3 must still use round 1's state."""
    from flwr_scaling.run.checkpoint import load_checkpoint
    from flwr_scaling.run.config import RunConfig
    from flwr_scaling.run.inprocess import run_inprocess

    common = dict(rounds=4, num_clients=3, warmup_batches=1, precond_every=3, precond_dtype=dtype)
    whole = run_inprocess(RunConfig(out=str(tmp_path / "whole"), **common))
    cut = RunConfig(out=str(tmp_path / "cut"), **common)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(cut, client_app=_StopAtRound(3))
    checkpoint = load_checkpoint(tmp_path / "cut")
    assert (checkpoint.round, checkpoint.broadcast_version) == (2, 1)
    resumed = run_inprocess(cut, resume=checkpoint)
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in whole]
    assert [r["precond_max"] for r in resumed] == [r["precond_max"] for r in whole]
    final, reference = load_checkpoint(tmp_path / "cut"), load_checkpoint(tmp_path / "whole")
    for key, value in reference.model.items():
        assert np.array_equal(final.model[key], value), key
