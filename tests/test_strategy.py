"""Unit tests of the Savic strategy, driven in-process with a fake Grid (no Ray).

Every expected number below is worked out by hand in the comments; the
weights are num-examples 1 and 3, i.e. 0.25 and 0.75.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flwr_scaling.protocol.flower_adapter import InconsistentMessageReplies, task_identity as server_task_identity
from flwr_scaling.strategies import WARMUP_MESSAGE_TYPE, Savic

try:  # tests/ as a package or as a rootdir-inserted folder
    from .fakes import flower_warnings_during, f32, FakeGrid, as_numpy, error_reply, record, stats_reply, train_reply
except ImportError:  # pragma: no cover
    from fakes import flower_warnings_during, f32, FakeGrid, as_numpy, error_reply, record, stats_reply, train_reply


SERVER_NODE = 0
A, B, C = 11, 12, 13  # client node ids; A has 1 example, B 3 (weights 0.25 / 0.75)

# Initial model x0
X0 = {"w": f32([0, 0], [0, 0]), "b": f32(0, 0)}
# Client models after a round and their weighted mean 0.25*X_A + 0.75*X_B
X_A = {"w": f32([4, 8], [0, 4]), "b": f32(4, -4)}
X_B = {"w": f32([0, 4], [4, 8]), "b": f32(0, 4)}
X_AVG = {"w": f32([1, 5], [3, 7]), "b": f32(1, 2)}
# Round statistics and their weighted mean s̄
S_A = {"w": f32([4, 0], [8, 4]), "b": f32(2, 6)}
S_B = {"w": f32([0, 4], [4, 8]), "b": f32(2, 2)}
S_AVG = {"w": f32([1, 3], [5, 7]), "b": f32(2, 3)}
# Warm-up statistics at x0 and v0 = 0.25*WARM_A + 0.75*WARM_B
WARM_A = {"w": f32([8, 8], [8, 8]), "b": f32(4, 4)}
WARM_B = {"w": f32([0, 0], [0, 0]), "b": f32(4, 4)}
V0 = {"w": f32([2, 2], [2, 2]), "b": f32(4, 4)}
# A third client whose values would be visible in any average it entered
X_C = {"w": f32([100, 100], [100, 100]), "b": f32(100, 100)}
S_C = {"w": f32([50, 50], [50, 50]), "b": f32(50, 50)}

BETA = 0.5
LOSS_A, LOSS_B = 2.0, 1.0  # weighted: 0.25*2 + 0.75*1 = 1.25


pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a task identity (conftest)

def make(**kwargs) -> Savic:
    options = dict(precond="adam", precond_beta=BETA, sampling_seed=0, min_train_nodes=2, min_available_nodes=2)
    options.update(kwargs)
    return Savic(**options)


def warm_grid(nodes=(A, B), extra=None) -> FakeGrid:
    answers = {A: (WARM_A, 1), B: (WARM_B, 3), C: (S_C, 4)}
    answers.update(extra or {})
    return FakeGrid(nodes, answers)


def by_node(messages) -> dict[int, Message]:
    out = {m.metadata.dst_node_id: m for m in messages}
    assert len(out) == len(list(messages)), "one message per node"
    return out


def configure(strategy: Savic, grid: FakeGrid, server_round: int = 1, arrays=None) -> dict[int, Message]:
    messages = list(strategy.configure_train(server_round, record(arrays or X0), ConfigRecord({"lr": 0.1}), grid))
    return by_node(messages)


def good_replies(messages: dict[int, Message], with_stats: bool = True) -> list[Message]:
    return [
        train_reply(messages[A], X_A, S_A if with_stats else None, 1, LOSS_A),
        train_reply(messages[B], X_B, S_B if with_stats else None, 3, LOSS_B),
    ]


def content_bytes_by_hand(messages) -> int:
    return sum(len(a.data) for m in messages if not m.has_error() for rec in m.content.array_records.values() for a in rec.values())


def assert_arrays(actual, expected) -> None:
    actual = as_numpy(actual) if isinstance(actual, ArrayRecord) else actual
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == np.float32, key
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------ configure_train
def test_warmup_queries_every_sampled_node_and_sets_weighted_mean_state():
    strategy = make(precond_init="warmup")
    grid = warm_grid()
    messages = configure(strategy, grid)

    # one query per sampled node, of the warm-up type, carrying the model and config
    assert len(grid.calls) == 1
    queries = grid.sent
    assert sorted(q.metadata.dst_node_id for q in queries) == [A, B]
    assert {q.metadata.message_type for q in queries} == {WARMUP_MESSAGE_TYPE} == {"query.precond_stats"}
    for query in queries:
        assert_arrays(query.content["arrays"], X0)
        assert query.content["config"]["server-round"] == 1
    assert grid.calls[0][2] == 3600.0  # default timeout bounds the warm-up

    # v0 = 0.25 * WARM_A + 0.75 * WARM_B
    assert_arrays(strategy.precond_state, V0)

    # every train message: model, config with the round, and the state
    assert sorted(messages) == [A, B]
    for message in messages.values():
        assert message.metadata.message_type == MessageType.TRAIN
        content = message.content
        assert set(content.array_records) == {"arrays", "precond"}
        assert_arrays(content["arrays"], X0)
        assert content["config"]["server-round"] == 1
        assert content["config"]["lr"] == 0.1
        assert_arrays(content["precond"], V0)


def test_warmup_happens_once_and_later_rounds_send_the_updated_state():
    strategy = make(precond_init="warmup")
    grid = warm_grid()
    messages = configure(strategy, grid)
    strategy.aggregate_train(1, good_replies(messages))
    # v1 = 0.5 * V0 + 0.5 * S_AVG
    v1 = {"w": f32([1.5, 2.5], [3.5, 4.5]), "b": f32(3, 3.5)}
    messages = configure(strategy, grid, server_round=2, arrays=X_AVG)
    assert len(grid.calls) == 1, "no second warm-up"
    for message in messages.values():
        assert message.content["config"]["server-round"] == 2
        assert_arrays(message.content["arrays"], X_AVG)
        assert_arrays(message.content["precond"], v1)


def test_ones_init_sends_no_query_and_no_state_in_round_one():
    strategy = make(precond_init="ones")
    grid = warm_grid()
    messages = configure(strategy, grid)
    assert grid.calls == []
    assert strategy.precond_state is None
    for message in messages.values():
        assert set(message.content.array_records) == {"arrays"}
        assert message.content["config"]["server-round"] == 1
    assert strategy.precond_bounds() == (1.0, 1.0)  # v = 1, alpha = 1e-3


@pytest.mark.parametrize("init", ["warmup", "ones"])
def test_identity_rule_never_queries_nor_sends_a_state(init):
    strategy = make(precond="identity", precond_init=init)
    grid = warm_grid()
    for server_round in (1, 2):
        messages = configure(strategy, grid, server_round=server_round)
        for message in messages.values():
            assert set(message.content.array_records) == {"arrays"}
        arrays, metrics = strategy.aggregate_train(server_round, good_replies(messages, with_stats=False))
        assert_arrays(arrays, X_AVG)
        assert metrics["clients-ok"] == 2 and metrics["clients-failed"] == 0
        assert metrics["precond-min"] == metrics["precond-max"] == 1.0
    assert grid.calls == []
    assert strategy.precond_state is None


def test_fraction_train_zero_sends_nothing():
    strategy = make(fraction_train=0.0)
    grid = warm_grid()
    assert list(strategy.configure_train(1, record(X0), ConfigRecord(), grid)) == []
    assert grid.calls == []


# ------------------------------------------------------------------ aggregate_train
@pytest.mark.parametrize("rule", ["rmsprop", "adam"])
def test_aggregate_global_moving_average(rule):
    strategy = make(precond=rule, precond_init="warmup")
    grid = warm_grid()
    messages = configure(strategy, grid)
    replies = good_replies(messages)
    bytes_down = content_bytes_by_hand(grid.sent) + content_bytes_by_hand(messages.values())
    bytes_up = content_bytes_by_hand(grid.received) + content_bytes_by_hand(replies)
    # each train message carries x and v (2d), each reply x and s (2d)
    model_bytes = sum(len(a.data) for a in record(X0).values())
    assert content_bytes_by_hand(messages.values()) == 2 * 2 * model_bytes
    assert content_bytes_by_hand(replies) == 2 * 2 * model_bytes

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert_arrays(arrays, X_AVG)  # 0.25 X_A + 0.75 X_B
    # v1 = beta * V0 + (1 - beta) * S_AVG = 0.5 * V0 + 0.5 * S_AVG
    assert_arrays(strategy.precond_state, {"w": f32([1.5, 2.5], [3.5, 4.5]), "b": f32(3, 3.5)})
    assert metrics["train_loss"] == pytest.approx(1.25)
    assert metrics["train_loss"] == pytest.approx(1.25)
    assert metrics["clients-ok"] == 2
    assert metrics["clients-failed"] == 0
    assert metrics["round-failed"] == 0
    # bounds of the state used in this round: D = sqrt(V0) -> sqrt(2) .. 2
    assert metrics["precond-min"] == pytest.approx(math.sqrt(2))
    assert metrics["precond-max"] == pytest.approx(2.0)
    # bytes: warm-up queries + 2 train messages down; warm-up stats + 2 replies up
    assert metrics["bytes-down"] == bytes_down
    assert metrics["bytes-up"] == bytes_up

    row = strategy.history[1]
    assert row["train_loss"] == pytest.approx(1.25)
    assert row["bytes_down"] == bytes_down and row["bytes_up"] == bytes_up
    assert row["clients_ok"] == 2 and row["clients_failed"] == 0 and row["round_failed"] == 0
    assert row["precond_min"] == pytest.approx(math.sqrt(2)) and row["precond_max"] == pytest.approx(2.0)


def test_aggregate_adagrad_adds_mean_statistic():
    strategy = make(precond="adagrad", precond_init="warmup")
    messages = configure(strategy, warm_grid())
    strategy.aggregate_train(1, good_replies(messages))
    # v1 = V0 + S_AVG (beta ignored)
    assert_arrays(strategy.precond_state, {"w": f32([3, 5], [7, 9]), "b": f32(6, 7)})


def test_aggregate_ones_init_updates_from_v_equal_one():
    strategy = make(precond="rmsprop", precond_init="ones")
    messages = configure(strategy, warm_grid())
    arrays, metrics = strategy.aggregate_train(1, good_replies(messages))
    assert_arrays(arrays, X_AVG)
    # v1 = 0.5 * 1 + 0.5 * S_AVG
    assert_arrays(strategy.precond_state, {"w": f32([1, 2], [3, 4]), "b": f32(1.5, 2)})
    assert metrics["precond-min"] == metrics["precond-max"] == 1.0
    # round 2 sends that state
    messages = configure(strategy, warm_grid(), server_round=2, arrays=X_AVG)
    for message in messages.values():
        assert_arrays(message.content["precond"], {"w": f32([1, 2], [3, 4]), "b": f32(1.5, 2)})


@pytest.mark.parametrize("init", ["warmup", "ones"])
def test_aggregate_local_mode_averages_client_states(init):
    strategy = make(precond="adam", precond_mode="local", precond_init=init)
    messages = configure(strategy, warm_grid())
    # in local mode "stats" carries each client's own state v_m; v1 = 0.25 v_A + 0.75 v_B
    arrays, _ = strategy.aggregate_train(1, good_replies(messages))
    assert_arrays(arrays, X_AVG)
    assert_arrays(strategy.precond_state, S_AVG)


def test_plain_fedavg_chokes_on_stats_but_savic_does_not():
    """The Flower trap: a second ArrayRecord in replies aborts FedAvg's aggregation."""
    strategy = make(precond_init="warmup")
    messages = configure(strategy, warm_grid())
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, good_replies(messages))
    arrays, metrics = strategy.aggregate_train(1, good_replies(messages))
    assert_arrays(arrays, X_AVG)
    assert metrics["clients-ok"] == 2


@pytest.mark.parametrize(
    ("server_lr", "x0", "expected"),
    [
        # x1 = x0 + 0.5 * (X_AVG - x0) with x0 = 1 everywhere
        (0.5, {"w": f32([1, 1], [1, 1]), "b": f32(1, 1)}, {"w": f32([1, 3], [2, 4]), "b": f32(1, 1.5)}),
        # x1 = x0 + 2 * (X_AVG - x0) with x0 = 0 -> 2 * X_AVG
        (2.0, X0, {"w": f32([2, 10], [6, 14]), "b": f32(2, 4)}),
    ],
)
def test_server_learning_rate(server_lr, x0, expected):
    strategy = make(precond="adam", precond_init="ones", server_lr=server_lr)
    messages = configure(strategy, warm_grid(), arrays=x0)
    arrays, _ = strategy.aggregate_train(1, good_replies(messages))
    assert_arrays(arrays, expected)
    # the preconditioner update does not depend on eta
    assert_arrays(strategy.precond_state, {"w": f32([1, 2], [3, 4]), "b": f32(1.5, 2)})


# ------------------------------------------------------------------ screening
def _bad(kind: str, message: Message) -> Message:
    """A reply from node C that must be rejected, by kind of fault."""
    x, s = dict(X_C), dict(S_C)
    n: int | float | None = 4
    if kind == "error":
        return error_reply(message, "out of memory")
    if kind == "nan-model":
        x["w"] = f32([np.nan, 1], [1, 1])
    elif kind == "inf-model":
        x["b"] = f32(np.inf, 1)
    elif kind == "missing-model-key":
        x = {"w": X_C["w"]}
    elif kind == "wrong-model-key":
        x = {"w": X_C["w"], "bias": X_C["b"]}
    elif kind == "extra-model-key":
        x["c"] = f32(1)
    elif kind == "wrong-model-shape":
        x["w"] = np.ones((2, 3), dtype=np.float32)
    elif kind == "wrong-model-dtype":
        x["w"] = X_C["w"].astype(np.float64)
    elif kind == "no-model":
        x = None
    elif kind == "nan-stats":
        s["b"] = f32(1, np.nan)
    elif kind == "wrong-stats-key":
        s = {"w": S_C["w"], "bias": S_C["b"]}
    elif kind == "wrong-stats-shape":
        s["b"] = f32(1, 1, 1)
    elif kind == "negative-stats":
        s["w"] = f32([1, -1e-3], [1, 1])
    elif kind == "missing-stats":
        s = None
    elif kind == "missing-num-examples":
        n = None
    elif kind == "zero-num-examples":
        n = 0
    elif kind == "negative-num-examples":
        n = -4
    else:  # pragma: no cover
        raise AssertionError(kind)
    return train_reply(message, x, s, n, loss=50.0)


BAD_KINDS = [
    "error", "nan-model", "inf-model", "missing-model-key", "wrong-model-key", "extra-model-key",
    "wrong-model-shape", "wrong-model-dtype", "no-model", "nan-stats", "wrong-stats-key",
    "wrong-stats-shape", "negative-stats", "missing-stats", "missing-num-examples",
    "zero-num-examples", "negative-num-examples",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_reply_is_rejected_and_counted(kind):
    strategy = make(precond="adam", precond_init="warmup")
    grid = warm_grid(nodes=(A, B, C), extra={C: (WARM_B, 3)})
    messages = configure(strategy, grid)
    # v0 = (1*WARM_A + 3*WARM_B + 3*WARM_B) / 7
    v0 = {"w": f32([8 / 7, 8 / 7], [8 / 7, 8 / 7]), "b": f32(4, 4)}
    assert_arrays(strategy.precond_state, v0)
    replies = good_replies(messages) + [_bad(kind, messages[C])]
    bytes_up = content_bytes_by_hand(grid.received) + content_bytes_by_hand(replies)

    arrays, metrics = strategy.aggregate_train(1, replies)

    # exactly as if only A and B had answered
    assert_arrays(arrays, X_AVG)
    assert_arrays(strategy.precond_state, {k: BETA * v0[k] + (1 - BETA) * S_AVG[k] for k in v0})
    assert metrics["train_loss"] == pytest.approx(1.25)
    assert metrics["clients-ok"] == 2
    assert metrics["clients-failed"] == 1
    assert metrics["round-failed"] == 0
    assert metrics["bytes-up"] == bytes_up  # rejected replies were still received; errors carry nothing
    assert strategy.history[1]["clients_failed"] == 1


def test_rejection_is_logged_with_node_and_reason():
    strategy = make(precond="adam", precond_init="warmup")
    messages = configure(strategy, warm_grid(nodes=(A, B, C), extra={C: (WARM_B, 3)}))
    texts = flower_warnings_during(
        lambda: strategy.aggregate_train(1, good_replies(messages) + [_bad("negative-stats", messages[C])])
    )
    assert any(f"node {C}" in t and "negative" in t for t in texts), texts


def test_too_few_good_replies_leaves_model_and_state_unchanged():
    strategy = make(precond="adam", precond_init="warmup", min_successful_clients=2)
    grid = warm_grid(nodes=(A, B, C), extra={C: (WARM_B, 3)})
    messages = configure(strategy, grid)
    before = {k: v.copy() for k, v in strategy.precond_state.items()}
    replies = [
        train_reply(messages[A], X_A, S_A, 1, LOSS_A),
        _bad("nan-model", messages[B]),
        _bad("error", messages[C]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert_arrays(strategy.precond_state, before)
    assert metrics["clients-ok"] == 1
    assert metrics["clients-failed"] == 2
    assert metrics["round-failed"] == 1
    assert "train_loss" not in metrics
    assert math.isnan(strategy.history[1]["train_loss"])
    assert strategy.history[1]["round_failed"] == 1


def test_all_replies_failing_leaves_model_and_state_unchanged():
    strategy = make(precond="rmsprop", precond_init="warmup")
    messages = configure(strategy, warm_grid())
    arrays, metrics = strategy.aggregate_train(1, [error_reply(m) for m in messages.values()])
    assert arrays is None
    assert_arrays(strategy.precond_state, V0)
    assert metrics["clients-ok"] == 0 and metrics["clients-failed"] == 2 and metrics["round-failed"] == 1


def test_min_successful_clients_met_exactly():
    strategy = make(precond="adam", precond_init="warmup", min_successful_clients=2)
    messages = configure(strategy, warm_grid())
    arrays, metrics = strategy.aggregate_train(1, good_replies(messages))
    assert_arrays(arrays, X_AVG)
    assert metrics["round-failed"] == 0


def test_oasis_accepts_negative_statistics():
    strategy = make(precond="oasis", precond_init="warmup", precond_alpha=0.1)
    # warm-up statistics may be negative: v0 = 0.25 * (-4) + 0.75 * 4 = 2 on w; 0.25 * 4 + 0.75 * (-4) = -2 on b
    grid = warm_grid(extra={
        A: ({"w": f32([-4, -4], [-4, -4]), "b": f32(4, 4)}, 1),
        B: ({"w": f32([4, 4], [4, 4]), "b": f32(-4, -4)}, 3),
    })  # fmt: skip
    messages = configure(strategy, grid)
    assert_arrays(strategy.precond_state, {"w": f32([2, 2], [2, 2]), "b": f32(-2, -2)})
    assert strategy.precond_bounds() == (2.0, 2.0)  # D = |v|
    neg_a = {"w": -S_A["w"], "b": -S_A["b"]}
    replies = [train_reply(messages[A], X_A, neg_a, 1, LOSS_A), train_reply(messages[B], X_B, S_B, 3, LOSS_B)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-ok"] == 2 and metrics["clients-failed"] == 0
    assert_arrays(arrays, X_AVG)
    # s̄ = -0.25 S_A + 0.75 S_B: w [[-1, 3], [1, 5]], b [1, 0]; v1 = 0.5 v0 + 0.5 s̄
    assert_arrays(strategy.precond_state, {"w": f32([0.5, 2.5], [1.5, 3.5]), "b": f32(-0.5, -1)})
    # D̂ = max(0.1, |v1|): min 0.5, max 3.5
    assert strategy.precond_bounds() == pytest.approx((0.5, 3.5))


def test_bad_warmup_replies_are_left_out_of_v0():
    strategy = make(precond="adam", precond_init="warmup")
    grid = warm_grid(
        nodes=(A, B, C),
        extra={C: lambda q: stats_reply(q, {"w": f32([-1, 0], [0, 0]), "b": f32(0, 0)}, 4)},
    )
    configure(strategy, grid)
    assert_arrays(strategy.precond_state, V0)  # C's negative statistic is ignored

    strategy = make(precond="adam", precond_init="warmup")
    grid = warm_grid(nodes=(A, B, C), extra={C: error_reply})
    configure(strategy, grid)
    assert_arrays(strategy.precond_state, V0)


def test_failed_warmup_falls_back_to_ones():
    strategy = make(precond="adam", precond_init="warmup")
    grid = warm_grid(extra={A: error_reply, B: lambda q: stats_reply(q, WARM_B, 0)})
    messages = configure(strategy, grid)
    assert len(grid.calls) == 1
    assert strategy.precond_state is None
    for message in messages.values():
        assert "precond" not in message.content.array_records


# ------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    ("rule", "alpha", "state", "expected"),
    [
        # sqrt -> [0.1, 2, 3, 0.5], [4, 0] -> max(0.5, .) -> min 0.5, max 4
        ("adam", 0.5, {"w": f32([0.01, 4], [9, 0.25]), "b": f32(16, 0)}, (0.5, 4.0)),
        ("rmsprop", 0.05, {"w": f32([0.01, 4], [9, 0.25]), "b": f32(16, 0)}, (0.05, 4.0)),
        ("adagrad", 1e-3, {"w": f32([0.01, 4], [9, 0.25]), "b": f32(16, 1)}, (0.1, 4.0)),
        # |v| -> [3, 0.05, 2, 0.5], [0, 1] -> max(0.1, .) -> min 0.1, max 3
        ("oasis", 0.1, {"w": f32([-3, 0.05], [2, -0.5]), "b": f32(0, 1)}, (0.1, 3.0)),
        ("oasis", 1e-3, {"w": f32([-3, 0.05], [2, -0.5]), "b": f32(0.5, 1)}, (0.05, 3.0)),
    ],
)
def test_precond_bounds_by_hand(rule, alpha, state, expected):
    strategy = make(precond=rule, precond_alpha=alpha, precond_state=state)
    assert strategy.precond_bounds() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("alpha", "expected"), [(1e-3, 1.0), (2.0, 2.0)])
def test_precond_bounds_for_v_equal_one(alpha, expected):
    assert make(precond="rmsprop", precond_alpha=alpha).precond_bounds() == (expected, expected)


def test_precond_bounds_identity():
    strategy = make(precond="identity", precond_alpha=5.0)
    assert strategy.precond_bounds() == (1.0, 1.0)


# ------------------------------------------------------------------ sampling
def _sampled(strategy: Savic, grid: FakeGrid, rounds: int = 3) -> list[list[int]]:
    out = []
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, record(X0), ConfigRecord(), grid)
        out.append([m.metadata.dst_node_id for m in messages])
    return out


def test_seeded_sampling_is_reproducible_and_order_independent():
    nodes = list(range(100, 110))
    first = _sampled(make(precond="identity", fraction_train=0.5, sampling_seed=7), FakeGrid(nodes))
    second = _sampled(make(precond="identity", fraction_train=0.5, sampling_seed=7), FakeGrid(nodes[::-1]))
    assert first == second
    for chosen in first:
        assert len(chosen) == 5 and len(set(chosen)) == 5 and set(chosen) <= set(nodes)


def test_fraction_half_of_four_nodes_picks_two():
    nodes = [A, B, C, 14]
    grid = FakeGrid(nodes, {n: (WARM_A, 1) for n in nodes})
    strategy = make(precond="adam", precond_init="warmup", fraction_train=0.5, min_train_nodes=1)
    messages = list(strategy.configure_train(1, record(X0), ConfigRecord(), grid))
    chosen = sorted(m.metadata.dst_node_id for m in messages)
    assert len(chosen) == 2 and len(set(chosen)) == 2 and set(chosen) <= set(nodes)
    # the warm-up asks exactly the nodes that then train
    assert sorted(q.metadata.dst_node_id for q in grid.sent) == chosen


# ------------------------------------------------------------------ summary
def test_summary_logs_rule_name():
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        make(precond="oasis", precond_mode="local", precond_init="ones").summary()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = "\n".join(r.getMessage() for r in records)
    assert "oasis" in text and "local" in text and "ones" in text
    assert "Minimum available nodes" in text  # FedAvg's part follows


# ------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kwargs",
    [
        {"precond": "sgd"},
        {"precond_mode": "both"},
        {"precond_init": "zeros"},
        {"precond_beta": 1.0},
        {"precond_beta": -0.1},
        {"precond_alpha": 0.0},
        {"server_lr": 0.0},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        make(**kwargs)


# ------------------------------------------------------------------ end to end through start()
def test_start_runs_rounds_through_the_fake_grid():
    """Strategy.start with the fake grid: warm-up, two rounds, history and Result filled."""

    def client(stats_warm, n, model, stats, loss):
        def answer(message: Message) -> Message:
            if message.metadata.message_type == WARMUP_MESSAGE_TYPE:
                return stats_reply(message, stats_warm, n)
            assert message.metadata.message_type == MessageType.TRAIN
            assert "precond" in message.content.array_records
            return train_reply(message, model, stats, n, loss)

        return answer

    grid = FakeGrid([A, B], {A: client(WARM_A, 1, X_A, S_A, LOSS_A), B: client(WARM_B, 3, X_B, S_B, LOSS_B)})
    strategy = make(precond="rmsprop", precond_init="warmup")
    result = strategy.start(grid=grid, initial_arrays=record(X0), num_rounds=2, timeout=5.0)
    assert_arrays(result.arrays, X_AVG)
    assert sorted(result.train_metrics_clientapp) == [1, 2] == sorted(strategy.history)
    assert result.train_metrics_clientapp[2]["train_loss"] == pytest.approx(1.25)
    warmups = [m for m in grid.sent if m.metadata.message_type == WARMUP_MESSAGE_TYPE]
    assert len(warmups) == 2
    assert all(timeout == 5.0 for _, _, timeout in grid.calls)
    # v1 = 0.5 V0 + 0.5 S_AVG; v2 = 0.5 v1 + 0.5 S_AVG
    v1 = {"w": f32([1.5, 2.5], [3.5, 4.5]), "b": f32(3, 3.5)}
    assert_arrays(strategy.precond_state, {k: 0.5 * v1[k] + 0.5 * S_AVG[k] for k in v1})
    assert strategy.history[2]["precond_min"] == pytest.approx(math.sqrt(1.5))
    assert strategy.history[2]["precond_max"] == pytest.approx(math.sqrt(4.5))


# ------------------------------------------------------ faults that once aborted a run
@pytest.mark.parametrize("init", ["warmup", "ones"])
@pytest.mark.parametrize(
    "bad_stats",
    [
        {"zzz": f32(1, 1)},  # wrong key
        {"w": f32([40]), "b": f32(40)},  # wrong, broadcastable shapes
    ],
    ids=["wrong-key", "wrong-shape"],
)
def test_first_statistics_with_wrong_layout_are_rejected(init, bad_stats):
    strategy = make(precond="rmsprop", precond_init=init)
    answers = {C: (bad_stats, 4)} if init == "warmup" else {C: (WARM_B, 3)}
    grid = warm_grid(nodes=(A, B, C), extra=answers)
    messages = configure(strategy, grid)
    if init == "warmup":
        assert_arrays(strategy.precond_state, V0)  # C's statistic left out
        return
    replies = good_replies(messages) + [train_reply(messages[C], X_C, bad_stats, 4, 50.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-failed"] == 1
    assert_arrays(arrays, X_AVG)
    assert_arrays(strategy.precond_state, {"w": f32([1, 2], [3, 4]), "b": f32(1.5, 2)})


@pytest.mark.parametrize("rule", ["adam", "identity"])
def test_reply_with_an_extra_array_record_is_rejected(rule):
    strategy = make(precond=rule, precond_init="ones")
    messages = configure(strategy, warm_grid(nodes=(A, B, C)))
    with_stats = rule != "identity"
    bad = train_reply(messages[C], X_C, S_C if with_stats else None, 4, 50.0)
    bad.content["junk" if with_stats else "stats"] = record({"q": f32(1)})
    arrays, metrics = strategy.aggregate_train(1, good_replies(messages, with_stats) + [bad])
    assert metrics["clients-failed"] == 1
    assert_arrays(arrays, X_AVG)


def test_reply_with_different_metric_keys_is_rejected():
    strategy = make(precond="adam", precond_init="ones")
    messages = configure(strategy, warm_grid(nodes=(A, B, C)))
    bad = train_reply(messages[C], X_C, S_C, 4, 50.0)
    bad.content["metrics"] = MetricRecord({"num-examples": 4})
    arrays, metrics = strategy.aggregate_train(1, good_replies(messages) + [bad])
    assert metrics["clients-failed"] == 1
    assert_arrays(arrays, X_AVG)


# ------------------------------------------------------------ client evaluation
def test_client_evaluation_every_k_rounds_summarises_accuracies():
    strategy = make(precond="adam", client_eval_every=2)
    grid = FakeGrid((A, B, C), {})
    assert list(strategy.configure_evaluate(1, record(X0), ConfigRecord({}), grid)) == []
    messages = by_node(strategy.configure_evaluate(2, record(X0), ConfigRecord({}), grid))
    assert set(messages) == {A, B, C} and all(m.metadata.message_type == MessageType.EVALUATE for m in messages.values())
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "eval_accuracy": acc})}), reply_to=messages[node])
        for node, acc in ((A, 0.5), (B, 0.9), (C, 0.7))
    ] + [error_reply(messages[A])]
    metrics = strategy.aggregate_evaluate(2, replies)
    # mean 0.7; population std sqrt((0.2² + 0.2² + 0²) / 3); worst 10 % of 3 clients = the single worst
    assert metrics["client-acc-mean"] == pytest.approx(0.7)
    assert metrics["client-acc-std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert metrics["client-acc-worst10"] == pytest.approx(0.5)
    assert strategy.history[2]["clients_evaluated"] == 3


def test_round_goes_on_with_the_connected_nodes_after_node_wait_s():
    # a node dropped out: do not wait for it
    strategy = make(precond="identity", min_available_nodes=3, min_train_nodes=3, node_wait_s=0.0)
    messages = by_node(strategy.configure_train(1, record(X0), ConfigRecord({}), FakeGrid((A, B), {})))
    assert set(messages) == {A, B}


def test_without_node_wait_s_the_sampler_waits_like_flowers(monkeypatch):
    strategy = make(precond="identity", min_available_nodes=3, min_train_nodes=3)
    naps = []

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == 3:
            raise TimeoutError("still waiting")

    monkeypatch.setattr("flwr_scaling.strategies.sampling.time.sleep", nap)
    with pytest.raises(TimeoutError):
        list(strategy.configure_train(1, record(X0), ConfigRecord({}), FakeGrid((A, B), {})))
    assert len(naps) == 3
