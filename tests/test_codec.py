"""The wire encodings of ``precond-dtype``, checked against bit patterns worked out by hand.

bfloat16 keeps the high half of a float32's bits, rounded to nearest with ties
to even; float16 first scales each array by a power of two that puts its
largest magnitude in [2**14, 2**15).
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_scaling.codec import (
    DTYPES,
    MAX_EXPONENT,
    decode,
    encode,
    exponents_problem,
    from_bfloat16_bits,
    from_scaled_float16,
    scale_exponent,
    to_bfloat16_bits,
    to_scaled_float16,
    wire_dtype,
)


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
