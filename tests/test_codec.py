"""The wire encodings of ``precond-dtype``, checked against bit patterns worked out by hand.

bfloat16 keeps the high half of a float32's bits, rounded to nearest with ties
to even; float16 first scales each array by a power of two that puts its
largest magnitude in [2**14, 2**15).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr_scaling.protocol.flower_adapter import task_identity as server_task_identity, wire_copy
from flwr_scaling.protocol.wire import (
    DTYPES,
    MAX_EXPONENT,
    SCALE_SUFFIX,
    decode,
    encode,
    exponents_problem,
    from_bfloat16_bits,
    from_scaled_float16,
    put_encoded,
    scale_exponent,
    take_encoded,
    to_bfloat16_bits,
    to_scaled_float16,
    to_wire_array,
    wire_dtype,
    wire_view,
)
from flwr_scaling.strategies import Savic

try:  # tests/ as a package or as a rootdir-inserted folder
    from .fakes import flower_warnings_during, FakeGrid, record
except ImportError:  # pragma: no cover
    from fakes import flower_warnings_during, FakeGrid, record


def from_bits(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def half_bits(values: np.ndarray) -> list[int]:
    return [int(b) for b in values.view(np.uint16)]


# ------------------------------------------------------------------ bfloat16
@pytest.mark.parametrize(
    "float32_bits, bfloat16_bits, meaning",
    [
        (0x3F800000, 0x3F80, "1.0 is exact"),
        (0xC0000000, 0xC000, "-2.0 is exact"),
        (0x80000000, 0x8000, "-0.0 keeps its sign"),
        (0x40490FDB, 0x4049, "pi: low half 0x0FDB < 0x8000 rounds down (3.140625)"),
        (0x3DCCCCCD, 0x3DCD, "0.1: low half 0xCCCD > 0x8000 rounds up (truncation would give 0x3DCC)"),
        (0x3F808000, 0x3F80, "1 + 2**-8: a tie, the kept half 0x3F80 is even: stays"),
        (0x3F818000, 0x3F82, "1 + 3 * 2**-8: a tie, 0x3F81 is odd: up to the even 0x3F82"),
        (0x3F808001, 0x3F81, "just above the tie rounds up"),
        (0x3F807FFF, 0x3F80, "just below the tie rounds down"),
        (0x7F7FFFFF, 0x7F80, "the largest float32 rounds past bfloat16's largest to Inf"),
        (0x7F800000, 0x7F80, "+Inf"),
        (0xFF800000, 0xFF80, "-Inf"),
        (0x00000001, 0x0000, "the smallest subnormal rounds to 0"),
        (0x00018000, 0x0002, "a subnormal tie goes to the even neighbour"),
    ],
)
def test_bfloat16_bit_patterns(float32_bits, bfloat16_bits, meaning):
    encoded = to_bfloat16_bits(from_bits(float32_bits))
    assert encoded.dtype == np.uint16
    assert int(encoded[0]) == bfloat16_bits, meaning


def test_bfloat16_decodes_by_shifting_back():
    decoded = from_bfloat16_bits(np.array([0x3F80, 0x4049, 0x3DCD, 0xC000, 0x7F80], dtype=np.uint16))
    assert decoded.dtype == np.float32
    assert decoded.tolist() == [1.0, 3.140625, 0.10009765625, -2.0, np.inf]


@pytest.mark.parametrize("nan_bits", [0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFF800001])
def test_bfloat16_keeps_every_nan_a_nan(nan_bits):
    # 0x7F800001 has its payload only in the dropped bits (naive rounding: Inf);
    # 0xFFFFFFFF would wrap around in uint32 were it rounded like a number.
    encoded = to_bfloat16_bits(from_bits(nan_bits))
    assert np.isnan(from_bfloat16_bits(encoded)[0])
    assert int(encoded[0]) >> 15 == nan_bits >> 31  # the sign survives


def test_bfloat16_round_trip_error_is_at_most_half_a_unit():
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e3
    back = from_bfloat16_bits(to_bfloat16_bits(values))
    # 8 significant bits: in [2**k, 2**(k+1)) the spacing is 2**(k-7), half of it at most |value| * 2**-8
    assert np.all(np.abs(back - values) <= np.abs(values) * 2.0**-8)


# ------------------------------------------------------------------ float16
def test_float16_scale_puts_the_largest_value_in_the_top_binade():
    # max 3.0 is in [2, 4): e = 13, so 3 * 2**13 = 24576 = 1.5 * 2**14 (0x7600);
    # 1 * 2**13 = 2**13 (0x7000), 0.5 * 2**13 = 2**12 (0x6C00)
    encoded, exponent = to_scaled_float16(np.array([1.0, 0.5, 3.0], dtype=np.float32))
    assert exponent == 13 and encoded.dtype == np.float16
    assert half_bits(encoded) == [0x7000, 0x6C00, 0x7600]
    assert from_scaled_float16(encoded, exponent).tolist() == [1.0, 0.5, 3.0]


def test_float16_guard_keeps_squared_gradients_that_plain_float16_flushes_to_zero():
    tiny = np.array([1e-8, 2e-8], dtype=np.float32)
    assert tiny.astype(np.float16).tolist() == [0.0, 0.0]  # both below 2**-25: lost unguarded
    # 2e-8 is in [2**-26, 2**-25): e = 15 + 25 = 40
    encoded, exponent = to_scaled_float16(tiny)
    assert exponent == 40
    np.testing.assert_allclose(from_scaled_float16(encoded, exponent), tiny, rtol=2.0**-11)


def test_float16_guard_keeps_values_that_plain_float16_overflows():
    big = np.array([1e5], dtype=np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(big.astype(np.float16)[0])
    # 1e5 is in [2**16, 2**17): e = -2, 1e5 / 4 = 25000; float16's spacing there is 16 and
    # 25000 / 16 = 1562.5 is a tie, so it goes to the even 1562 * 16 = 24992, i.e. 99968
    encoded, exponent = to_scaled_float16(big)
    assert exponent == -2 and encoded.tolist() == [24992.0]
    assert from_scaled_float16(encoded, exponent).tolist() == [99968.0]


def test_float16_negative_values_scale_by_magnitude():
    # oasis states can be negative: |-4| is the largest, in [4, 8): e = 12, -4 * 2**12 = -2**14 (0xF400)
    encoded, exponent = to_scaled_float16(np.array([-4.0, 1.0], dtype=np.float32))
    assert exponent == 12 and half_bits(encoded) == [0xF400, 0x6C00]


@pytest.mark.parametrize("values", [np.zeros(5, np.float32), np.zeros((2, 0), np.float32)], ids=["zeros", "empty"])
def test_float16_zero_and_empty_arrays(values):
    encoded, exponent = to_scaled_float16(values)
    assert exponent == 0 and encoded.shape == values.shape
    assert np.array_equal(from_scaled_float16(encoded, exponent), values)


def test_float16_nan_and_inf_survive_and_do_not_set_the_scale():
    encoded, exponent = to_scaled_float16(np.array([np.nan, np.inf, -np.inf, 2.0], dtype=np.float32))
    assert exponent == 13  # from 2.0, the only finite value
    back = from_scaled_float16(encoded, exponent)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and back[3] == 2.0


def test_float16_of_a_float32_subnormal_needs_ldexp():
    # 2**-149 needs e = 163: 2**163 is not a float32, ldexp never forms it
    assert scale_exponent(from_bits(0x00000001)) == 163
    encoded, exponent = to_scaled_float16(from_bits(0x00000001))
    assert encoded.tolist() == [16384.0]
    assert from_scaled_float16(encoded, exponent).view(np.uint32).tolist() == [1]


# ------------------------------------------------------------------ encode / decode
def test_float32_is_passed_through_untouched():
    arrays = {"w": np.array([[0.1, 2.5]], dtype=np.float32)}
    encoded = encode(arrays, dtype="float32")
    assert encoded.exponents == {}
    assert encoded.arrays["w"] is arrays["w"]  # no copy
    assert decode(encoded.arrays, dtype="float32")["w"] is arrays["w"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_round_trip_keeps_keys_shapes_and_order(dtype):
    arrays = {"w": np.array([[0.25, 4.0], [1.0, 0.5]], np.float32), "b": np.array([8.0, 0.0], np.float32)}
    encoded = encode(arrays, dtype=dtype)
    assert list(encoded.arrays) == ["w", "b"]
    assert all(a.dtype == wire_dtype(dtype) and a.shape == arrays[k].shape for k, a in encoded.arrays.items())
    assert set(encoded.exponents) == (set(arrays) if dtype == "float16" else set())
    decoded = decode(encoded.arrays, dtype=dtype, exponents=encoded.exponents)
    for key, value in arrays.items():  # powers of two: exact in every encoding
        assert decoded[key].dtype == np.float32 and np.array_equal(decoded[key], value), key


def test_16_bit_arrays_travel_without_the_npy_header_and_float32_as_before():
    bits = to_wire_array(np.array([0x3F80, 0xC000, 0x7FC0], dtype=np.uint16))
    assert (bits.stype, bits.dtype, tuple(bits.shape)) == ("raw", "uint16", (3,))
    assert bits.data == bytes([0x80, 0x3F, 0x00, 0xC0, 0xC0, 0x7F])  # little-endian, nothing else
    assert wire_view(bits).tolist() == [0x3F80, 0xC000, 0x7FC0]
    halves = to_wire_array(np.array([[1.0, -2.0]], dtype=np.float16))
    assert halves.data == bytes([0x00, 0x3C, 0x00, 0xC0]) and wire_view(halves).shape == (1, 2)
    floats = np.array([0.1, 2.5], dtype=np.float32)
    assert to_wire_array(floats).data == Array(floats).data  # float32: Flower's own .npy framing
    assert wire_view(to_wire_array(floats)).tolist() == floats.tolist()


@pytest.mark.parametrize(
    "array, message",
    [
        (Array(dtype="uint16", shape=(2,), stype="raw", data=b"\x00\x00\x00"), "holds 3 bytes, but uint16[2] needs 4"),
        (Array(dtype="float32", shape=(1,), stype="raw", data=b"\x00" * 4), "dtype 'float32' does not travel raw"),
    ],
)
def test_malformed_raw_arrays_are_refused(array, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        wire_view(array)


@pytest.mark.usefixtures("task_identity")
def test_raw_arrays_survive_flowers_message_serialisation():
    # What the SuperLink transport does to a message (protobuf), as flwr_scaling.run.inprocess does.
    content = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    put_encoded(content, "precond", {"w": np.array([[1.0, 2.0]], np.float32)}, dtype="float16")
    received = wire_copy(Message(content=content, dst_node_id=5, message_type="train"))
    array = received.content["precond"]["w"]
    assert (array.stype, array.dtype, tuple(array.shape)) == ("raw", "float16", (1, 2))
    assert dict(received.content["precond-scale"].items()) == {"w": 13}
    assert take_encoded(received.content, "precond", dtype="float16")["w"].tolist() == [[1.0, 2.0]]


def test_wire_dtypes():
    assert [str(wire_dtype(d)) for d in DTYPES] == ["float32", "uint16", "float16"]


def test_unknown_dtype_is_one_line():
    with pytest.raises(ValueError, match=r"^precond-dtype must be one of float32, bfloat16, float16, got 'int8'$"):
        encode({}, dtype="int8")


def test_float16_decode_without_exponents_fails():
    with pytest.raises(ValueError, match=r"float16 arrays \['w'\] come without their scale exponents"):
        decode({"w": np.zeros(2, np.float16)}, dtype="float16")


@pytest.mark.parametrize(
    "exponents, expected",
    [
        ({"w": 3, "b": -7}, None),
        ({"w": 3}, "no float16 scale exponent for ['b']"),
        ({"w": 3, "b": 1.5}, "float16 scale exponent of 'b' is 1.5, expected an integer in [-200, 200]"),
        ({"w": 3, "b": True}, "float16 scale exponent of 'b' is True, expected an integer in [-200, 200]"),
        ({"w": MAX_EXPONENT + 1, "b": 0}, "float16 scale exponent of 'w' is 201, expected an integer in [-200, 200]"),
    ],
)
def test_exponents_problem(exponents, expected):
    assert exponents_problem(exponents, ["w", "b"]) == expected


# ------------------------------------------------------- the strategy with encoded payloads
# Driven in-process with a fake grid, as in tests/test_strategy.py; every value is exact in
# bfloat16 (small integers), so the expected states are worked out by hand.


A, B = 11, 12  # A has 1 example, B 3: weights 0.25 and 0.75
X0 = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
WARM_A = {"w": np.full((2, 2), 8, np.float32), "b": np.full(2, 4, np.float32)}
WARM_B = {"w": np.zeros((2, 2), np.float32), "b": np.full(2, 4, np.float32)}
V0 = {"w": np.full((2, 2), 2, np.float32), "b": np.full(2, 4, np.float32)}  # 0.25 WARM_A + 0.75 WARM_B
S_A = {"w": np.array([[4, 0], [8, 4]], np.float32), "b": np.array([2, 6], np.float32)}
S_B = {"w": np.array([[0, 4], [4, 8]], np.float32), "b": np.array([2, 2], np.float32)}
# beta 0.5: v1 = 0.5 V0 + 0.5 (0.25 S_A + 0.75 S_B) = 0.5 V0 + 0.5 [[1, 3], [5, 7]], [2, 3]
V1 = {"w": np.array([[1.5, 2.5], [3.5, 4.5]], np.float32), "b": np.array([3, 3.5], np.float32)}


def encoded_reply(message: Message, stats, n: int, dtype: str, *, model=None) -> Message:
    """A client's reply with its statistic encoded as ``dtype`` (raw float32 arrays when ``dtype`` is None)."""
    content = RecordDict()
    if model is not None:
        content["arrays"] = record(model)
    if dtype is None:
        content["stats"] = record(stats)
    else:
        put_encoded(content, "stats", stats, dtype=dtype)
    content["metrics"] = MetricRecord({"num-examples": n} if model is None else {"num-examples": n, "train_loss": 0.0})
    return Message(content=content, reply_to=message)


def wire_grid(dtype: str, warm_dtype_b: str | None = "same") -> FakeGrid:
    warm_b = dtype if warm_dtype_b == "same" else warm_dtype_b
    return FakeGrid([A, B], {A: lambda q: encoded_reply(q, WARM_A, 1, dtype), B: lambda q: encoded_reply(q, WARM_B, 3, warm_b)})


def wire_strategy(dtype: str, **kwargs) -> Savic:
    options = dict(precond="rmsprop", precond_beta=0.5, precond_dtype=dtype, sampling_seed=0, min_train_nodes=2,
                   min_available_nodes=2)
    options.update(kwargs)
    return Savic(**options)


def train_messages(strategy: Savic, grid: FakeGrid, server_round: int = 1) -> dict[int, Message]:
    messages = strategy.configure_train(server_round, record(X0), ConfigRecord({"lr": 0.1}), grid)
    return {m.metadata.dst_node_id: m for m in messages}


def array_bytes(arrays) -> int:
    return sum(len(Array(np.ascontiguousarray(v)).data) for v in arrays.values())




@pytest.mark.usefixtures("task_identity")
def test_bfloat16_run_sends_bits_decodes_replies_and_counts_half_the_state_bytes():
    strategy = wire_strategy("bfloat16")
    grid = wire_grid("bfloat16")
    messages = train_messages(strategy, grid)
    assert strategy.precond_state["w"].tolist() == V0["w"].tolist()  # warm-up statistics decoded
    sent = messages[A].content["precond"]
    assert {k: (a.dtype, a.shape, a.stype) for k, a in sent.items()} == {"w": ("uint16", (2, 2), "raw"), "b": ("uint16", (2,), "raw")}
    assert {k: len(a.data) for k, a in sent.items()} == {"w": 8, "b": 4}  # 2 bytes an entry, no header
    bits = {k: wire_view(a) for k, a in sent.items()}
    assert bits["w"].tolist() == [[0x4000] * 2] * 2 and bits["b"].tolist() == [0x4080] * 2  # 2.0 and 4.0
    assert messages[A].content["config"]["precond-dtype"] == "bfloat16"
    replies = [encoded_reply(messages[A], S_A, 1, "bfloat16", model=X0), encoded_reply(messages[B], S_B, 3, "bfloat16", model=X0)]
    strategy.aggregate_train(1, replies)
    assert {k: v.tolist() for k, v in strategy.precond_state.items()} == {k: v.tolist() for k, v in V1.items()}
    assert all(v.dtype == np.float32 for v in strategy.precond_state.values())  # the server keeps float32
    half_state = 2 * 6  # six entries, two bytes each
    model = array_bytes(X0)
    row = strategy.history[1]
    assert row["bytes_down"] == 2 * model + 2 * (model + half_state)  # warm-up queries, then model + state
    assert row["bytes_up"] == 2 * half_state + 2 * (model + half_state)
    assert (row["clients_ok"], row["clients_failed"]) == (2, 0)


@pytest.mark.usefixtures("task_identity")
def test_float16_run_carries_exponents_and_keeps_tiny_statistics():
    strategy = wire_strategy("float16", precond_mode="local")  # the server averages the clients' states
    messages = train_messages(strategy, wire_grid("float16"))
    # the largest of v0's w is 2.0, in [2, 4): e = 13; of b, 4.0 in [4, 8): e = 12
    assert dict(messages[A].content["precond" + SCALE_SUFFIX].items()) == {"w": 13, "b": 12}
    tiny = {"w": np.full((2, 2), 1e-8, np.float32), "b": np.full(2, 2e-8, np.float32)}
    replies = [encoded_reply(messages[m], tiny, n, "float16", model=X0) for m, n in ((A, 1), (B, 3))]
    strategy.aggregate_train(1, replies)
    # v1 = the clients' mean state = tiny: below float16's range, the scale keeps it (error < 2**-11)
    assert tiny["b"].astype(np.float16).tolist() == [0.0, 0.0]
    for key in tiny:
        np.testing.assert_allclose(strategy.precond_state[key], tiny[key], rtol=2.0**-11)
    assert strategy.history[1]["clients_ok"] == 2


def _truncated(reply: Message) -> Message:
    """The reply with one byte cut from its raw bfloat16 ``stats[w]``."""
    stats = reply.content["stats"]
    w = stats["w"]
    stats["w"] = Array(dtype=w.dtype, shape=tuple(w.shape), stype=w.stype, data=w.data[:-1])
    return reply


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "dtype, make_bad, reason",
    [
        ("bfloat16", lambda m: encoded_reply(m, S_B, 3, None, model=X0),
         "client raised: precond-dtype bfloat16: stats[w] is float32[2, 2], expected uint16[2, 2]"),
        ("float16", lambda m: encoded_reply(m, S_B, 3, "bfloat16", model=X0),
         "client raised: precond-dtype float16: stats[w] is uint16[2, 2], expected float16[2, 2]"),
        ("bfloat16", lambda m: encoded_reply(m, {**S_B, "w": np.array([[np.nan, 1], [1, 1]], np.float32)}, 3, "bfloat16", model=X0),
         "stats[w] contains NaN or Inf"),
        ("bfloat16", lambda m: encoded_reply(m, {**S_B, "b": np.array([np.inf, 1], np.float32)}, 3, "bfloat16", model=X0),
         "stats[b] contains NaN or Inf"),
        ("float16", lambda m: encoded_reply(m, {**S_B, "b": np.array([np.nan, 1], np.float32)}, 3, "float16", model=X0),
         "stats[b] contains NaN or Inf"),
        ("bfloat16", lambda m: encoded_reply(m, {**S_B, "b": np.array([-2, 1], np.float32)}, 3, "bfloat16", model=X0),
         "stats[b] has negative entries, impossible for this rule"),
        ("bfloat16", lambda m: _truncated(encoded_reply(m, S_B, 3, "bfloat16", model=X0)),
         "precond-dtype bfloat16: stats cannot be decoded (holds 7 bytes, but uint16[2, 2] needs 8)"),
    ],
    ids=["float32-in-bfloat16-run", "bfloat16-in-float16-run", "nan-bf16", "inf-bf16", "nan-fp16", "negative-bf16",
         "truncated-bf16"],
)
def test_bad_encoded_statistics_are_rejected_after_decoding(dtype, make_bad, reason):
    strategy = wire_strategy(dtype)
    messages = train_messages(strategy, wire_grid(dtype))
    good = encoded_reply(messages[A], S_A, 1, dtype, model=X0)
    logged = flower_warnings_during(lambda: strategy.aggregate_train(1, [good, make_bad(messages[B])]))
    assert (strategy.history[1]["clients_ok"], strategy.history[1]["clients_failed"]) == (1, 1)
    assert any(f"node {B}: " in line and reason in line for line in logged), logged
    # only A's statistic: v1 = 0.5 v0 + 0.5 S_A
    assert strategy.precond_state["b"].tolist() == (0.5 * V0["b"] + 0.5 * S_A["b"]).tolist()


@pytest.mark.usefixtures("task_identity")
def test_float16_reply_without_its_exponents_is_rejected():
    strategy = wire_strategy("float16")
    messages = train_messages(strategy, wire_grid("float16"))
    bad = encoded_reply(messages[B], S_B, 3, "float16", model=X0)
    bad.content.pop("stats" + SCALE_SUFFIX)
    logged = flower_warnings_during(lambda: strategy.aggregate_train(1, [encoded_reply(messages[A], S_A, 1, "float16", model=X0), bad]))
    assert strategy.history[1]["clients_failed"] == 1
    assert any("precond-dtype float16: no float16 scale exponent for ['b', 'w']" in line for line in logged), logged


@pytest.mark.usefixtures("task_identity")
def test_warmup_statistic_in_the_wrong_encoding_is_left_out_of_v0():
    strategy = wire_strategy("bfloat16")
    logged = flower_warnings_during(lambda: train_messages(strategy, wire_grid("bfloat16", warm_dtype_b=None)))
    assert strategy.precond_state["w"].tolist() == WARM_A["w"].tolist()  # A's alone
    assert any(f"node {B}" in line and "expected uint16[2, 2]" in line for line in logged), logged


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "stats, dtype, ok",
    [
        ({"b": np.ones(2, np.float32)}, "bfloat16", True),  # a subset of the model's arrays
        ({"b": np.ones(2, np.float32)}, None, False),  # float32 in a bfloat16 run
        ({"zzz": np.ones(2, np.float32)}, "bfloat16", False),  # not an array of the model
    ],
)
def test_first_statistics_without_a_server_state_follow_the_encoding(stats, dtype, ok):
    strategy = wire_strategy("bfloat16", precond_init="ones")
    messages = train_messages(strategy, FakeGrid([A, B], {}))
    assert "precond" not in messages[A].content.array_records  # v = 1: nothing to send
    strategy.aggregate_train(1, [encoded_reply(messages[A], stats, 1, dtype, model=X0)])
    assert strategy.history[1]["clients_ok"] == int(ok)
    if ok:  # 0.5 * 1 + 0.5 * 1
        assert strategy.precond_state["b"].tolist() == [1.0, 1.0]


@pytest.mark.usefixtures("task_identity")
def test_float32_default_sends_the_same_bytes_as_numpy_to_record():
    strategy = wire_strategy(None)
    messages = train_messages(strategy, wire_grid("float32"))
    sent = messages[A].content["precond"]
    assert {k: bytes(a.data) for k, a in sent.items()} == {k: bytes(Array(v).data) for k, v in V0.items()}
    assert "precond" + SCALE_SUFFIX not in messages[A].content
    assert isinstance(sent, ArrayRecord)
