"""Bounded client influence: claims bounded, outliers screened against the cohort, robust averages.

Replies that are finite, well-shaped and non-negative but absurd (a statistic
of 1e30, ``num-examples`` of 1e308, a model moved by 1e30, a NaN
``train_loss``) must not reach the model, the preconditioner or metrics.csv.
The rules (``flwr_scaling.strategies.robust``, ``ReplyScreen.screen_cohort``)
are checked on hand-computed numbers, then in real in-process runs with two
of ten clients faulty.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from flwr_scaling.core.rules import get_rule
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.inprocess import run_inprocess
from flwr_scaling.strategies import Savic
from flwr_scaling.strategies.robust import beyond_cohort, norm, robust_average, trim_count
from flwr_scaling.strategies.screening import ReplyScreen, describe, reply_problem
from flwr_scaling.testing import ABSURD_FAULTS, faulty_client_app

try:  # tests/ as a package or as a rootdir-inserted folder
    from .fakes import FakeGrid, as_numpy, f32, record, train_reply
except ImportError:  # pragma: no cover
    from fakes import FakeGrid, as_numpy, f32, record, train_reply

A, B, C, D = 11, 12, 13, 14
X0 = {"w": f32([0, 0], [0, 0]), "b": f32(0, 0)}


# ------------------------------------------------------------------ the rules
def test_median_of_an_odd_and_an_even_number_of_replies():
    odd = [{"w": f32(1, 2)}, {"w": f32(3, 10)}, {"w": f32(2, -5)}]
    assert robust_average(odd, "median")["w"].tolist() == [2.0, 2.0]
    even = odd + [{"w": f32(100, 100)}]  # the mean of the two middle values: (2+3)/2, (2+10)/2
    assert robust_average(even, "median")["w"].tolist() == [2.5, 6.0]
    assert robust_average(even, "median")["w"].dtype == np.float32


def test_trimmed_mean_cuts_floor_of_the_fraction_from_each_end():
    replies = [{"w": f32(v, -v)} for v in (1, 2, 3, 4, 100)]
    # floor(0.2 * 5) = 1 cut at each end: mean(2, 3, 4) = 3, and mean(-4, -3, -2) = -3
    assert robust_average(replies, "trimmed-mean", 0.2)["w"].tolist() == [3.0, -3.0]
    assert robust_average(replies, "trimmed-mean", 0.0)["w"].tolist() == [22.0, -22.0]
    assert (trim_count(10, 0.2), trim_count(5, 0.49), trim_count(2, 0.4), trim_count(1, 0.4)) == (2, 2, 0, 0)


def test_cohort_rule_flags_beyond_factor_times_median_with_three_or_more():
    # median of [1, 2, 3, 40] is 2.5: the bound is 25
    assert beyond_cohort([1, 2, 3, 40], 10) == [False, False, False, True]
    assert beyond_cohort([1, 2, 3, 25], 10) == [False] * 4  # at the bound is within it
    assert beyond_cohort([1, 400], 10) == [False, False]  # two replies: the rule does not judge
    assert beyond_cohort([1, 2, 3, 40], 0) == [False] * 4  # off
    assert beyond_cohort([0, 0, 0, 1], 10) == [False] * 4  # a zero median bounds nothing
    # non-finite sizes are left to the value checks and do not count in the median (of 1, 2, 3)
    assert beyond_cohort([1, 2, 3, math.nan, 21], 10) == [False, False, False, False, False]
    assert beyond_cohort([1, 2, 3, math.inf, 31], 10) == [False, False, False, False, True]


def test_norm_is_exact_and_does_not_overflow():
    assert norm({"a": f32(3, 4)}) == 5.0
    assert norm({"a": f32(4, 6), "b": f32(12)}, {"a": f32(1, 2), "b": f32(0)}) == 13.0  # sqrt(9 + 16 + 144)
    assert norm({"a": np.full(4, 1e30, dtype=np.float32)}) == pytest.approx(2e30, rel=1e-6)  # float32 would be Inf


def test_a_non_finite_metric_is_rejected(task_identity):
    message = Message(content=RecordDict({"arrays": record(X0)}), message_type=MessageType.TRAIN, dst_node_id=A)
    reply = train_reply(message, X0, None, 3, loss=float("nan"))
    problem = reply_problem(reply, arrayrecord_key="arrays", stats_key="stats", weighted_by_key="num-examples",
                            model_layout=describe(record(X0)), rule=get_rule("identity"), stats_layout=None,
                            parameter_layout=describe(record(X0)))
    assert problem == "metric 'train_loss' is not finite (nan)"


def test_options_are_checked():
    for options, message in [
        ({"aggregation": "mode"}, "aggregation: unknown value 'mode'; known: mean, median, trimmed-mean"),
        ({"screen_factor": 1.0}, "screen-factor must be 0 (off) or > 1 (the median reply itself must pass), got 1"),
    ]:
        with pytest.raises(ConfigError) as error:
            replace(RunConfig(), **options).validate()
        assert str(error.value) == message
    with pytest.raises(ValueError, match="trim_fraction must be in"):
        ReplyScreen(rule=get_rule("adam"), trim_fraction=0.5)


# ------------------------------------------------------- the strategy's screen
MODELS = {
    A: {"w": f32([4, 8], [0, 4]), "b": f32(4, -4)},
    B: {"w": f32([0, 4], [4, 8]), "b": f32(0, 4)},
    C: {"w": f32([1, 1], [1, 1]), "b": f32(1e30, 1)},  # finite, and 1e30 away from x0
    D: {"w": f32([7, 7], [7, 7]), "b": f32(7, 7)},
}
STATS = {
    A: {"w": f32([4, 0], [8, 4]), "b": f32(2, 6)},
    B: {"w": f32([0, 4], [4, 8]), "b": f32(2, 2)},
    C: {"w": f32([1, 1], [1, 1]), "b": f32(1, 1)},
    D: {"w": f32([5, 5], [5, 5]), "b": f32(5, 5)},
}
SIZES = {A: 1, B: 3, C: 4, D: 4}
WARM = {"w": f32([2, 2], [2, 2]), "b": f32(4, 4)}


def round_with(screen: ReplyScreen, replies: dict[int, tuple]) -> tuple:
    """One adam round (beta 0.5, after a warm-up that sends WARM) whose replies are ``{node: (model, stats, n)}``."""
    strategy = Savic(precond="adam", precond_beta=0.5, precond_alpha=0.1, sampling_seed=0, min_train_nodes=2,
                     min_available_nodes=2, screen=screen)
    nodes = tuple(replies)
    grid = FakeGrid(nodes, {node: (WARM, SIZES[node]) for node in nodes})
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, record(X0), ConfigRecord({}), grid)}
    answers = [train_reply(messages[node], model, stats, n) for node, (model, stats, n) in replies.items()]
    arrays, metrics = strategy.aggregate_train(1, answers)
    return (as_numpy(arrays) if arrays is not None else None), metrics, strategy.precond_state


def screen(**options) -> ReplyScreen:
    return ReplyScreen(rule=get_rule("adam"), **options)


def honest(*nodes, claim=None) -> dict[int, tuple]:
    return {node: (MODELS[node], STATS[node], SIZES[node] if claim is None else claim) for node in nodes}


@pytest.mark.usefixtures("task_identity")
def test_a_model_update_beyond_ten_times_the_median_is_rejected_with_its_reason(flower_warnings):
    arrays, metrics, _ = round_with(screen(screen_factor=10), honest(A, B, C, D))
    # update norms: A sqrt(16+64+0+16+16+16) = 11.31, B sqrt(112) = 10.58, D sqrt(6*49) = 17.15, C about 1e30:
    # median (11.31 + 17.15) / 2 = 14.2
    assert metrics["clients-failed"] == 1
    assert [w for w in flower_warnings() if w.startswith("Rejected")] == [
        f"Rejected reply from node {C}: model update norm 1e+30 is more than 10 x the round's median (14.2)"
    ]
    # the weighted mean of A (1), B (3) and D (4): b = (4 + 0 + 28) / 8, (-4 + 12 + 28) / 8
    assert arrays["b"].tolist() == [4.0, 4.5]


@pytest.mark.usefixtures("task_identity")
def test_a_huge_statistic_is_rejected_and_the_state_stays_from_the_others(flower_warnings):
    replies = honest(A, B, D)
    replies[C] = (MODELS[D], {"w": f32([1e30, 1e30], [1e30, 1e30]), "b": f32(1, 1)}, 4)
    _, metrics, state = round_with(screen(screen_factor=10), replies)
    assert metrics["clients-failed"] == 1
    assert any(f"node {C}: stats norm 2e+30 is more than 10 x" in w for w in flower_warnings())
    # s̄_b = (1*2 + 3*2 + 4*5) / 8 = 3.5 ; v1 = 0.5*4 + 0.5*3.5 = 3.75 (adam keeps v in the second half)
    assert state["b"].tolist() == pytest.approx([3.75, 0.5 * 4 + 0.5 * (6 + 6 + 20) / 8])


@pytest.mark.usefixtures("task_identity")
def test_claims_are_bounded_by_the_partition_then_max_num_examples_then_the_median(flower_warnings):
    replies = honest(A, B, D)
    replies[C] = (MODELS[D], STATS[D], 1e308)
    bounds = {A: 1, B: 3, C: 1000, D: 4}
    _, metrics, _ = round_with(screen(example_bounds=bounds, max_num_examples=10**9), dict(replies))
    assert metrics["clients-failed"] == 1
    assert f"Rejected reply from node {C}: 'num-examples' 1e+308 exceeds its partition's size (1000)" in flower_warnings()
    _, metrics, _ = round_with(screen(max_num_examples=500), dict(replies))
    assert f"Rejected reply from node {C}: 'num-examples' 1e+308 exceeds max-num-examples (500)" in flower_warnings()
    # no bound configured: claims 1, 3, 4 and 1e308 have median 3.5, the bound 35
    _, metrics, _ = round_with(screen(screen_factor=10), dict(replies))
    assert f"Rejected reply from node {C}: 'num-examples' 1e+308 is more than 10 x the round's median (3.5)" in (
        flower_warnings())
    assert metrics["clients-failed"] == 1


@pytest.mark.usefixtures("task_identity")
def test_two_replies_are_not_judged_by_the_cohort_rule():
    _, metrics, _ = round_with(screen(screen_factor=10), honest(A, C))
    assert metrics["clients-failed"] == 0


@pytest.mark.usefixtures("task_identity")
def test_median_and_trimmed_mean_aggregation_ignore_the_weights():
    arrays, _, state = round_with(screen(aggregation="median"), honest(A, B, D))
    # element-wise medians of A, B, D: w [[4, 7], [4, 7]], b [4, 4]
    assert arrays["w"].tolist() == [[4, 7], [4, 7]] and arrays["b"].tolist() == [4, 4]
    # s̃_b = median(2, 2, 5), median(6, 2, 5) = 2, 5 ; v1 = 0.5*4 + 0.5*s̃
    assert state["b"].tolist() == [3.0, 4.5]
    # four replies, 0.25 trimmed: floor(1) cut from each end, the mean of the middle two
    arrays, _, _ = round_with(screen(aggregation="trimmed-mean", trim_fraction=0.25), honest(A, B, C, D))
    assert arrays["w"][0].tolist() == [(4 + 1) / 2, (7 + 4) / 2]  # A 4 B 0 C 1 D 7 ; A 8 B 4 C 1 D 7
    assert arrays["b"][1].tolist() == (1 + 4) / 2  # A -4 B 4 C 1 D 7


# ------------------------------------------------------------ in real runs
SMALL = RunConfig(dataset="digits", num_clients=10, rounds=5, warmup_batches=1, checkpoint_every=0)
FAULTY_PARTITIONS = (3, 7)


@pytest.fixture(scope="module")
def without_them(tmp_path_factory):
    """The run in which the two clients raise: what the others alone give."""
    out = tmp_path_factory.mktemp("robust") / "raising"
    return run_inprocess(replace(SMALL, out=str(out)), client_app=faulty_client_app(
        {p: "raise" for p in FAULTY_PARTITIONS}))


@pytest.mark.parametrize("fault", ABSURD_FAULTS)
def test_two_absurd_clients_of_ten_are_rejected_every_round(tmp_path, fault, without_them):
    rows = run_inprocess(replace(SMALL, out=str(tmp_path / fault)),
                         client_app=faulty_client_app({p: fault for p in FAULTY_PARTITIONS}))
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(8, 2)] * 5
    assert abs(rows[-1]["test_accuracy"] - without_them[-1]["test_accuracy"]) <= 0.01
    assert rows[-1]["test_accuracy"] > 0.5  # it learns (about 0.1 at random)
    alpha = 1e-3  # adam's default lower clip
    for row in rows:
        assert math.isfinite(row["precond_max"]) and row["precond_min"] >= alpha * (1 - 1e-6), row
        assert math.isfinite(row["train_loss"]), row
