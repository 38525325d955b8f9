"""Wire encodings of the preconditioner state and the clients' statistics (``precond-dtype``).

The server always keeps float32; only what travels is encoded:

- ``float32``: the arrays as they are (no copy, bit-identical to no encoding);
- ``bfloat16``: the high 16 bits of each float32, rounded to nearest, ties to
  even, carried as ``uint16`` (NumPy has no bfloat16). Same range as float32,
  8 significant bits; decoding shifts the bits back.
- ``float16``: IEEE half precision after a per-array power-of-two scale. Squared
  gradients span many decades: unscaled, everything below 6e-8 becomes 0 and
  anything above 65504 becomes Inf. The scale ``2**e`` puts the array's largest
  finite magnitude in [2**14, 2**15), half the top of the float16 range, so
  rounding can never overflow and the array keeps 2**28 of dynamic range below
  its maximum (2**38 with subnormals). For a preconditioner this is the range
  that matters: D̂ = max(alpha, D(v)) clips the small entries anyway. A power of
  two makes scaling and unscaling exact. The exponents ``e`` (one small int per
  array) travel beside the arrays.

NaN and Inf survive both encodings (a NaN stays a NaN, an Inf an Inf), so the
server's screening of decoded replies still rejects them.

In Flower records, float32 arrays keep Flower's usual ``.npy`` framing. The
16-bit arrays travel bare (``stype`` "raw": the little-endian buffer alone),
since a Flower ``Array`` carries dtype and shape itself: the 128-byte ``.npy``
header per array would otherwise be a third of a small model's encoded
payload (a9a's logistic regression: 496 bytes of bfloat16 data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flwr_scaling.protocol.records import array_view

DTYPES = ("float32", "bfloat16", "float16")
# How the strategy and the ClientApp name what travels (ConfigRecord keys):
DTYPE_KEY = "precond-dtype"  # in the config: the encoding of the state sent down and of what clients send up
VERSION_KEY = "precond-version"  # in the train config: the round whose state the client must train with
MODEL_VERSION_KEY = "model-version"  # in the warm-up and round-1 configs: the round of the x⁰ the node keeps
SCALE_SUFFIX = "-scale"  # "<record key>-scale": ConfigRecord of the float16 exponents beside that ArrayRecord
# What each encoding looks like on the wire (the dtype of the serialised arrays).
WIRE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16)}
# The largest finite magnitude of an array lands in [2**TOP_BINADE, 2**(TOP_BINADE + 1)).
TOP_BINADE = 14
# Exponents outside this range cannot come from a float32 array (2**-149 .. 2**128):
# a reply that carries one is malformed.
MAX_EXPONENT = 200

_BF16_QUIET_NAN_BIT = np.uint32(0x0040)
# Array.stype of a bare little-endian buffer (no .npy header).
RAW_STYPE = "raw"
RAW_DTYPES = {"uint16": np.dtype("<u2"), "float16": np.dtype("<f2")}


@dataclass(frozen=True)
class Encoded:
    """Arrays as they travel, and the float16 scale exponents (empty for the other encodings).

    The original array is ``decoded(arrays[key]) * 2.0 ** -exponents[key]``.
    """

    arrays: dict[str, np.ndarray]
    exponents: dict[str, int] = field(default_factory=dict)


def check_dtype(dtype: str) -> None:
    """Raise ``ValueError`` (one line) unless ``dtype`` is a known encoding."""
    if dtype not in DTYPES:
        raise ValueError(f"precond-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def wire_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of arrays encoded as ``dtype`` (``uint16`` for bfloat16)."""
    check_dtype(dtype)
    return WIRE_DTYPES[dtype]


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (``uint16``), rounded to nearest, ties to even.

    Adding ``0x7FFF`` plus the lowest kept bit before dropping the low 16 bits
    is round-half-to-even on the bit pattern; it carries into the exponent when
    it must (the largest float32 values become Inf, as in IEEE rounding). NaNs
    are set apart first: their rounding could carry into the sign or turn a
    NaN whose payload sits in the low bits into Inf.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        rounded[nan] = (bits[nan] >> 16) | _BF16_QUIET_NAN_BIT
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def scale_exponent(values: np.ndarray) -> int:
    """``e`` such that the largest finite ``|value| * 2**e`` lies in [2**14, 2**15); 0 if none is nonzero."""
    if values.size == 0:
        return 0
    # Two reductions, no temporary; only an array holding NaN or Inf pays for a mask.
    largest = max(float(values.max()), -float(values.min()))
    if not np.isfinite(largest):
        finite = values[np.isfinite(values)]
        largest = max(float(finite.max()), -float(finite.min())) if finite.size else 0.0
    if largest == 0.0:
        return 0
    _, exponent = np.frexp(largest)  # largest = mantissa * 2**exponent, mantissa in [0.5, 1)
    return int(TOP_BINADE + 1 - exponent)


def to_scaled_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 -> (float16 of ``values * 2**e``, ``e``); see the module notes for the choice of ``e``."""
    values = np.asarray(values, dtype=np.float32)
    exponent = scale_exponent(values)
    # ldexp scales without forming 2**e, which float32 cannot hold for tiny arrays (e > 127).
    return np.ldexp(values, exponent).astype(np.float16), exponent


def from_scaled_float16(values: np.ndarray, exponent: int) -> np.ndarray:
    """(float16, ``e``) -> float32 ``values * 2**-e`` (exact up to float32's own range)."""
    return np.ldexp(np.asarray(values, dtype=np.float16).astype(np.float32), -int(exponent)).astype(np.float32)


def encode(arrays: Mapping[str, np.ndarray], *, dtype: str) -> Encoded:
    """Encode float32 ``arrays`` for the wire as ``dtype`` ("float32", "bfloat16" or "float16")."""
    check_dtype(dtype)
    if dtype == "float32":
        return Encoded({key: np.asarray(value, dtype=np.float32) for key, value in arrays.items()})
    if dtype == "bfloat16":
        return Encoded({key: to_bfloat16_bits(value) for key, value in arrays.items()})
    encoded, exponents = {}, {}
    for key, value in arrays.items():
        encoded[key], exponents[key] = to_scaled_float16(value)
    return Encoded(encoded, exponents)


def decode(arrays: Mapping[str, np.ndarray], *, dtype: str, exponents: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Float32 arrays back from ``encode``'s output (``exponents``: needed for float16).

    Raises ``ValueError`` when an array is not of ``dtype``'s wire dtype: a
    float32 array in a bfloat16 run would otherwise be cast, not decoded.
    """
    expected = wire_dtype(dtype)
    for key, value in arrays.items():
        if np.asarray(value).dtype != expected:
            raise ValueError(f"{key!r} is {np.asarray(value).dtype}, expected {expected} for precond-dtype {dtype}")
    if dtype == "float32":
        return {key: np.asarray(value, dtype=np.float32) for key, value in arrays.items()}
    if dtype == "bfloat16":
        return {key: from_bfloat16_bits(value) for key, value in arrays.items()}
    exponents = exponents or {}
    missing = sorted(set(arrays) - set(exponents))
    if missing:
        raise ValueError(f"float16 arrays {missing} come without their scale exponents")
    return {key: from_scaled_float16(value, exponents[key]) for key, value in arrays.items()}


def exponents_problem(exponents: Mapping[str, object], keys) -> str | None:
    """Why float16 scale exponents received for ``keys`` cannot be used, or ``None``."""
    missing = sorted(set(keys) - set(exponents))
    if missing:
        return f"no float16 scale exponent for {missing}"
    for key in keys:
        value = exponents[key]
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_EXPONENT:
            return f"float16 scale exponent of {key!r} is {value!r}, expected an integer in [-{MAX_EXPONENT}, {MAX_EXPONENT}]"
    return None


# ------------------------------------------------------------ Flower records
def to_wire_array(values: np.ndarray) -> Array:
    """A Flower ``Array``: float32 (and anything else) as ``.npy``; uint16 and float16 as bare bytes."""
    values = np.ascontiguousarray(values)
    raw = RAW_DTYPES.get(str(values.dtype))
    if raw is None:
        return Array(values)
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=RAW_STYPE, data=values.astype(raw).tobytes())


def wire_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array`` in either framing; ``ValueError`` if it is malformed."""
    if array.stype != RAW_STYPE:
        return array_view(array)
    dtype = RAW_DTYPES.get(str(array.dtype))
    if dtype is None:
        raise ValueError(f"dtype {array.dtype!r} does not travel raw; expected one of {', '.join(RAW_DTYPES)}")
    shape = tuple(int(n) for n in array.shape)
    expected = int(np.prod(shape)) * dtype.itemsize
    if any(n < 0 for n in shape) or len(array.data) != expected:
        raise ValueError(f"holds {len(array.data)} bytes, but {array.dtype}{list(shape)} needs {expected}")
    return np.frombuffer(array.data, dtype=dtype).reshape(shape)


def put_encoded(content: RecordDict, key: str, arrays: Mapping[str, np.ndarray], *, dtype: str) -> None:
    """Store float32 ``arrays`` in ``content[key]`` encoded as ``dtype`` (float16: exponents in ``key-scale``)."""
    encoded = encode(arrays, dtype=dtype)
    content[key] = ArrayRecord({name: to_wire_array(value) for name, value in encoded.arrays.items()})
    if encoded.exponents:
        content[key + SCALE_SUFFIX] = ConfigRecord(dict(encoded.exponents))


def take_encoded(content: RecordDict, key: str, *, dtype: str) -> dict[str, np.ndarray]:
    """The float32 arrays that ``put_encoded`` stored in ``content[key]``; ``ValueError`` if malformed."""
    record = content[key]
    exponents = None
    if dtype == "float16":
        scale = content.get(key + SCALE_SUFFIX)
        exponents = dict(scale.items()) if isinstance(scale, ConfigRecord) else {}
        problem = exponents_problem(exponents, list(record.keys()))
        if problem:
            raise ValueError(problem)
    return decode({name: wire_view(array) for name, array in record.items()}, dtype=dtype, exponents=exponents)
