"""The server's value checks on averages, and their per-reply fallback.

``Savic.aggregate_train`` screens the layout of every reply, then checks the
values (NaN, Inf, negative statistics) of all accepted replies at once on
their weighted averages; only when that finds a problem does it screen again
reply by reply. These tests pin that the outcome is the one a per-reply
screening gives: a faulty reply among good ones leaves exactly (bit for bit)
the model, state and metrics of a round without it, with the same logged
reason; and they check ``checked_weighted_average`` and the cached header
reads of ``array_view`` on hand-computed numbers.
"""

from __future__ import annotations


import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from flwr_scaling.protocol.flower_adapter import task_identity as server_task_identity
from flwr_scaling.core.arrays import checked_weighted_average, weighted_average
from flwr_scaling.protocol.records import array_layout, array_view
from flwr_scaling.core.rules import get_rule
from flwr_scaling.strategies import Savic
from flwr_scaling.strategies.screening import ReplyScreen, describe, reply_problem

try:  # tests/ as a package or as a rootdir-inserted folder
    from .fakes import f32, FakeGrid, as_numpy, error_reply, record, train_reply
except ImportError:  # pragma: no cover
    from fakes import f32, FakeGrid, as_numpy, error_reply, record, train_reply


A, B, C, D = 11, 12, 13, 14  # client nodes; A 1 example, B 3, C and D 4
X0 = {"w": f32([0, 0], [0, 0]), "b": f32(0, 0)}
MODELS = {
    A: {"w": f32([4, 8], [0, 4]), "b": f32(4, -4)},
    B: {"w": f32([0, 4], [4, 8]), "b": f32(0, 4)},
    C: {"w": f32([100, 100], [100, 100]), "b": f32(100, 100)},
    D: {"w": f32([7, 7], [7, 7]), "b": f32(7, 7)},
}
STATS = {
    A: {"w": f32([4, 0], [8, 4]), "b": f32(2, 6)},
    B: {"w": f32([0, 4], [4, 8]), "b": f32(2, 2)},
    C: {"w": f32([50, 50], [50, 50]), "b": f32(50, 50)},
    D: {"w": f32([5, 5], [5, 5]), "b": f32(5, 5)},
}
SIZES = {A: 1, B: 3, C: 4, D: 4}
WARM = {"w": f32([2, 2], [2, 2]), "b": f32(4, 4)}


pytestmark = pytest.mark.usefixtures("task_identity")  # messages need a task identity (conftest)

@pytest.fixture
def warnings_logged(flower_warnings):
    """The rejections Flower's logger warns about during the test."""
    return lambda: [message for message in flower_warnings() if message.startswith("Rejected reply")]


def configured(rule: str = "adam", mode: str = "global", nodes=(A, B, C, D), **options) -> tuple[Savic, dict[int, Message]]:
    """A strategy after its warm-up (every node sends WARM) and the round's train messages by node."""
    strategy = Savic(precond=rule, precond_mode=mode, precond_beta=0.5, precond_alpha=0.1, sampling_seed=0,
                     min_train_nodes=2, min_available_nodes=2, **options)
    grid = FakeGrid(nodes, {node: (WARM, SIZES[node]) for node in nodes})
    messages = strategy.configure_train(1, record(X0), ConfigRecord({"lr": 0.1}), grid)
    return strategy, {m.metadata.dst_node_id: m for m in messages}


def good(messages: dict[int, Message], node: int) -> Message:
    return train_reply(messages[node], MODELS[node], STATS[node], SIZES[node], loss=float(node))


def faulty(messages: dict[int, Message], node: int, kind: str) -> Message:
    """A reply from ``node`` with one fault of the given kind."""
    model = {k: v.copy() for k, v in MODELS[node].items()}
    stats = {k: v.copy() for k, v in STATS[node].items()}
    if kind == "nan-model":
        model["w"][0, 1] = np.nan
    elif kind == "inf-model":
        model["b"][1] = np.inf
    elif kind == "minus-inf-stats":
        stats["w"][1, 0] = -np.inf
    elif kind == "nan-stats":
        stats["b"][0] = np.nan
    elif kind == "hidden-negative-stats":
        # -1e-3 among entries of 50: every weighted average stays positive, only a per-reply look finds it
        stats["w"][1, 1] = -1e-3
    elif kind == "nan-model-and-wrong-stats-shape":
        model["w"][0, 0] = np.nan  # found first by a reply-by-reply screening
        stats["b"] = f32(1, 1, 1)
    elif kind == "wrong-model-dtype":
        model["w"] = model["w"].astype(np.float64)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return train_reply(messages[node], model, stats, SIZES[node], loss=float(node))


def assert_same_round(with_fault: tuple, without: tuple, extra_failed: int) -> None:
    """Bit-identical model and state, and the same metrics but the failure count."""
    (arrays_f, metrics_f, state_f), (arrays_c, metrics_c, state_c) = with_fault, without
    model_f, model_c = as_numpy(arrays_f), as_numpy(arrays_c)
    assert list(model_f) == list(model_c)
    for key in model_c:
        assert model_f[key].dtype == np.float32
        assert np.array_equal(model_f[key], model_c[key]), key
    assert list(state_f) == list(state_c)
    for key in state_c:
        assert np.array_equal(state_f[key], state_c[key]), key
    assert metrics_f["train_loss"] == metrics_c["train_loss"]
    assert metrics_f["clients-ok"] == metrics_c["clients-ok"]
    assert metrics_f["clients-failed"] == metrics_c["clients-failed"] + extra_failed


def run_round(rule: str, mode: str, make_replies) -> tuple:
    strategy, messages = configured(rule, mode)
    arrays, metrics = strategy.aggregate_train(1, make_replies(messages))
    return arrays, metrics, strategy.precond_state


FAULTS = [
    ("nan-model", "model[w] contains NaN or Inf"),
    ("inf-model", "model[b] contains NaN or Inf"),
    ("minus-inf-stats", "stats[w] contains NaN or Inf"),
    ("nan-stats", "stats[b] contains NaN or Inf"),
    ("hidden-negative-stats", "stats[w] has negative entries, impossible for this rule"),
    ("nan-model-and-wrong-stats-shape", "model[w] contains NaN or Inf"),
    ("wrong-model-dtype", "model[w] is float64[2, 2], expected float32[2, 2]"),
]


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize(("kind", "reason"), FAULTS, ids=[kind for kind, _ in FAULTS])
def test_one_faulty_reply_leaves_the_round_of_the_good_ones(kind, reason, mode, warnings_logged):
    # C's values would be visible in any average it entered (100s and 50s)
    with_fault = run_round("adam", mode, lambda m: [good(m, A), good(m, B), faulty(m, C, kind), good(m, D)])
    logged = warnings_logged()
    without = run_round("adam", mode, lambda m: [good(m, A), good(m, B), good(m, D)])
    assert_same_round(with_fault, without, extra_failed=1)
    assert logged == [f"Rejected reply from node {C}: {reason}"]
    assert warnings_logged() == logged  # the clean round logs no rejection


def test_same_result_as_an_error_reply_in_its_place():
    # a NaN reply and a reply that raised leave the same round (bit for bit)
    nan = run_round("rmsprop", "global", lambda m: [good(m, A), faulty(m, B, "nan-stats"), good(m, C)])
    raised = run_round("rmsprop", "global", lambda m: [good(m, A), error_reply(m[B]), good(m, C)])
    assert_same_round(nan, raised, extra_failed=0)


def test_several_faulty_replies_are_all_found(warnings_logged):
    with_faults = run_round("adagrad", "global", lambda m: [
        faulty(m, A, "nan-model"), good(m, B), faulty(m, C, "hidden-negative-stats"), good(m, D),
    ])
    without = run_round("adagrad", "global", lambda m: [good(m, B), good(m, D)])
    assert_same_round(with_faults, without, extra_failed=2)
    assert warnings_logged() == [
        f"Rejected reply from node {A}: model[w] contains NaN or Inf",
        f"Rejected reply from node {C}: stats[w] has negative entries, impossible for this rule",
    ]


def test_oasis_keeps_negative_statistics_and_rejects_nan(warnings_logged):
    # oasis statistics may be negative: the hidden negative entry is data, NaN is still a fault
    negative = run_round("oasis", "global", lambda m: [good(m, A), good(m, B), faulty(m, C, "hidden-negative-stats")])
    assert negative[1]["clients-ok"] == 3 and warnings_logged() == []
    # s̄ on w[1, 1] = (1*4 + 3*8 + 4*(-1e-3)) / 8 = 3.4995 ; v1 = 0.5*2 + 0.5*3.4995 = 2.74975
    assert negative[2]["w"][1, 1] == pytest.approx(2.74975, rel=1e-6)
    nan = run_round("oasis", "global", lambda m: [good(m, A), good(m, B), faulty(m, C, "nan-stats")])
    without = run_round("oasis", "global", lambda m: [good(m, A), good(m, B)])
    assert_same_round(nan, without, extra_failed=1)


def test_good_round_takes_the_fast_path_and_a_bad_one_screens_again(monkeypatch):
    calls = []
    full_screen = ReplyScreen.screen

    def counting_screen(self, *args, **kwargs):
        calls.append(1)
        return full_screen(self, *args, **kwargs)

    (clean, clean_messages), (dirty, dirty_messages) = configured(), configured()  # warm-ups screen too
    monkeypatch.setattr(ReplyScreen, "screen", counting_screen)
    clean.aggregate_train(1, [good(clean_messages, A), good(clean_messages, B)])
    assert calls == []  # values checked on the averages only
    dirty.aggregate_train(1, [good(dirty_messages, A), faulty(dirty_messages, B, "nan-model"), good(dirty_messages, C)])
    assert calls == [1]  # one reply-by-reply screening finds the culprit


def test_too_few_replies_after_the_fallback_fail_the_round(warnings_logged):
    strategy, messages = configured(min_successful_clients=2)
    before = {k: v.copy() for k, v in strategy.precond_state.items()}
    arrays, metrics = strategy.aggregate_train(1, [good(messages, A), faulty(messages, B, "inf-model")])
    assert arrays is None
    assert (metrics["clients-ok"], metrics["clients-failed"], metrics["round-failed"]) == (1, 1, 1)
    for key, value in before.items():
        assert np.array_equal(strategy.precond_state[key], value)
    assert warnings_logged()[0] == f"Rejected reply from node {B}: model[b] contains NaN or Inf"


def test_layout_only_screening_rejects_what_the_full_screening_rejects():
    # reply_problem(check_values=False) may accept a reply with bad values, never reject a good one
    strategy, messages = configured()
    layout = describe(record(X0))
    options = dict(arrayrecord_key="arrays", stats_key="stats", weighted_by_key="num-examples",
                   model_layout=layout, rule=get_rule("adam"), stats_layout=layout, parameter_layout=layout)
    for kind, reason in FAULTS:
        reply = faulty(messages, C, kind)
        assert reply_problem(reply, check_values=True, **options) == reason
        structural = reply_problem(reply, check_values=False, **options)
        assert structural is None or kind in ("nan-model-and-wrong-stats-shape", "wrong-model-dtype")
    assert reply_problem(good(messages, A), check_values=False, **options) is None


# ------------------------------------------------------------ checked_weighted_average


def test_checked_weighted_average_by_hand():
    # weights 1 and 3: 0.25 a + 0.75 b ; a's smallest entry is -8, b's -1
    a = {"w": f32([4, -8], [0, 4]), "s": np.asarray(np.float32(2))}
    b = {"w": f32([0, 4], [4, -1]), "s": np.asarray(np.float32(6))}
    result = checked_weighted_average([a, b], [1, 3], find_lowest=True)
    np.testing.assert_array_equal(result.arrays["w"], f32([1, 1], [3, 0.25]))
    assert result.arrays["s"].shape == () and float(result.arrays["s"]) == 5.0
    assert result.finite and result.lowest == -8.0
    assert all(value.dtype == np.float32 for value in result.arrays.values())
    # without find_lowest the minimum is not taken
    assert checked_weighted_average([a, b], [1, 3]).lowest == float("inf")
    np.testing.assert_array_equal(weighted_average([a, b], [1, 3])["w"], result.arrays["w"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_checked_weighted_average_is_not_finite_when_any_input_is_not(bad):
    good_values = {"w": f32(1, 2, 3)}
    bad_values = {"w": f32(1, bad, 3)}
    for order in ([good_values, bad_values, good_values], [bad_values, good_values, good_values]):
        result = checked_weighted_average(order, [1, 1, 1000])
        assert not result.finite
    assert checked_weighted_average([good_values, good_values], [1, 1]).finite


def test_checked_weighted_average_finds_a_negative_entry_the_average_hides():
    # 0.999 * 50 + 0.001 * (-1) > 0: the average is positive, the smallest input entry is not
    result = checked_weighted_average([{"w": f32(50, 50)}, {"w": f32(-1, 50)}], [999, 1], find_lowest=True)
    assert (result.arrays["w"] > 0).all()
    assert result.lowest == -1.0


def test_checked_weighted_average_types_and_empty_arrays():
    # float64 stays float64, integers average as float32, empty arrays average to empty arrays
    result = checked_weighted_average(
        [{"d": np.array([1.0, 3.0]), "i": np.array([1, 2], dtype=np.int64), "e": np.zeros((0, 3), np.float32)},
         {"d": np.array([3.0, 5.0]), "i": np.array([3, 4], dtype=np.int64), "e": np.zeros((0, 3), np.float32)}],
        [1, 1], find_lowest=True,
    )
    assert result.arrays["d"].dtype == np.float64 and result.arrays["d"].tolist() == [2.0, 4.0]
    assert result.arrays["i"].dtype == np.float32 and result.arrays["i"].tolist() == [2.0, 3.0]
    assert result.arrays["e"].shape == (0, 3)
    assert result.finite and result.lowest == 1.0


def test_checked_weighted_average_rejects_no_input_and_zero_weights():
    with pytest.raises(ValueError, match="at least one"):
        checked_weighted_average([], [])
    with pytest.raises(ValueError, match="positive"):
        checked_weighted_average([{"w": f32(1)}], [0])


# ------------------------------------------------------------------ array_view


def test_array_view_reads_cached_and_uncached_headers_alike():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    first, second = Array(values), Array(values * 2)
    np.testing.assert_array_equal(array_view(first), values)  # parses the header
    view = array_view(second)  # the same header bytes: read without parsing
    np.testing.assert_array_equal(view, values * 2)
    assert not view.flags.writeable and view.base is not None  # a view of the received bytes
    fortran = Array(np.asfortranarray(values))  # another header for the same shape and dtype
    np.testing.assert_array_equal(array_view(fortran), values)


def test_array_view_of_a_truncated_buffer_raises_even_with_a_known_header():
    values = np.ones((4, 4), dtype=np.float32)
    assert array_layout(Array(values)) == ((4, 4), "float32")  # the header is now known
    truncated = Array(values)
    truncated.data = truncated.data[:-8]
    with pytest.raises(ValueError) as from_view:
        array_view(truncated)
    with pytest.raises(ValueError) as from_layout:
        array_layout(truncated)
    assert str(from_layout.value) == str(from_view.value)  # the same logged reason either way


def test_array_layout_reports_what_the_bytes_hold():
    # declared float32[2, 2], bytes of float64[2, 2]: the layout of the bytes, parsed or known alike
    for _ in range(2):
        lying = Array(np.zeros((2, 2), dtype=np.float64))
        lying.dtype = "float32"
        assert array_layout(lying) == ((2, 2), "float64")
    assert array_layout(Array(np.zeros((3,), dtype=np.float16))) == ((3,), "float16")


def test_reply_whose_bytes_disagree_with_its_declared_layout_is_rejected(warnings_logged):
    # the Array says float32[2, 2] but its bytes hold float64: rejected as before, the header read is not trusted
    strategy, messages = configured()
    lying = good(messages, C)
    model = lying.content["arrays"]
    model["w"] = Array(np.ones((2, 2), dtype=np.float64))
    model["w"].dtype = "float32"
    without = run_round("adam", "global", lambda m: [good(m, A), good(m, B)])
    arrays, metrics = strategy.aggregate_train(1, [good(messages, A), good(messages, B), lying])
    assert_same_round((arrays, metrics, strategy.precond_state), without, extra_failed=1)
    assert warnings_logged() == [f"Rejected reply from node {C}: model[w] holds float64[2, 2] but says float32[2, 2]"]
    assert isinstance(model, ArrayRecord)
