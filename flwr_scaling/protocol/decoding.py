"""Decoding the clients' statistics (or states) from their ``precond-dtype`` on the server.

A reply whose statistic is not encoded as the run says (a float32 array in a
bfloat16 run, a float16 array without its exponent) becomes an error reply,
rejected and counted like any failed client. NaN and Inf survive decoding, so
the screening that follows still rejects them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Error, Message, RecordDict

from flwr_scaling.protocol.flower_adapter import error_reply
from flwr_scaling.protocol.records import numpy_to_record
from flwr_scaling.protocol.wire import SCALE_SUFFIX, decode, exponents_problem, wire_dtype, wire_view

# Error code given to a reply whose statistic is not encoded as the run's precond-dtype says.
WRONG_ENCODING_ERROR = 4602

Layout = Mapping[str, tuple[tuple[int, ...], str]]


def decode_record(content: RecordDict, key: str, dtype: str) -> dict[str, np.ndarray]:
    """Float32 arrays from ``content[key]`` encoded as ``dtype`` (views where float32)."""
    scale = content.get(key + SCALE_SUFFIX)
    exponents = dict(scale.items()) if isinstance(scale, ConfigRecord) else None
    views = {name: wire_view(array) for name, array in content[key].items()}
    return decode(views, dtype=dtype, exponents=exponents)


def decoded_payload(
    content: RecordDict, key: str, dtype: str, layout: Layout | None, model_layout: Layout
) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """``(None, float32 arrays)`` from the encoded record ``content[key]``, or ``(problem, None)``.

    ``layout`` is the exact ``{key: (shape, wire dtype)}`` expected; ``None``
    before the server has a state: then any non-empty subset of the model's
    arrays (``model_layout``), with their shapes.
    """
    record = content[key]
    if layout is None:
        unknown = sorted(set(record.keys()) - set(model_layout))
        if unknown or not record.keys():
            return f"{key} keys {unknown or '[]'} are not arrays of the model", None
        layout = {name: (model_layout[name][0], str(wire_dtype(dtype))) for name in record.keys()}
    if set(record.keys()) != set(layout):
        missing, extra = sorted(set(layout) - set(record.keys())), sorted(set(record.keys()) - set(layout))
        return f"{key} has wrong keys (missing {missing}, unexpected {extra})", None
    for name, array in record.items():
        shape, expected = layout[name]
        if tuple(array.shape) != shape or array.dtype != expected:
            return f"{key}[{name}] is {array.dtype}{list(array.shape)}, expected {expected}{list(shape)}", None
    if dtype == "float16":
        scale = content.get(key + SCALE_SUFFIX)
        problem = exponents_problem(dict(scale.items()) if isinstance(scale, ConfigRecord) else {}, list(record.keys()))
        if problem is not None:
            return problem, None
    try:
        return None, decode_record(content, key, dtype)
    except ValueError as error:
        return f"{key} cannot be decoded ({error})", None


def decode_replies(
    replies: list[Message], *, key: str, dtype: str, layout: Layout | None, model_layout: Layout
) -> list[Message]:
    """The replies with ``content[key]`` decoded from ``dtype`` to float32 (see ``decoded_payload``).

    A reply that raised or lacks ``key`` is passed on as it is: the screening
    says what is wrong with it. Float32 replies need no decoding and are
    returned unchanged.
    """
    if dtype == "float32":
        return replies
    decoded = []
    for message in replies:
        if message.has_error() or key not in message.content.array_records:
            decoded.append(message)
            continue
        problem, arrays = decoded_payload(message.content, key, dtype, layout, model_layout)
        if problem is not None:
            error = Error(code=WRONG_ENCODING_ERROR, reason=f"precond-dtype {dtype}: {problem}")
            decoded.append(error_reply(message.metadata, error))
            continue
        message.content[key] = numpy_to_record(arrays)
        message.content.pop(key + SCALE_SUFFIX, None)
        decoded.append(message)
    return decoded
