"""Flower records as NumPy: zero-copy views of serialised arrays, conversions and byte counts."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


class _Header(NamedTuple):
    """A parsed ``.npy`` header: its exact bytes and what they say."""

    header: bytes
    dtype: np.dtype
    shape: tuple[int, ...]
    order: str
    count: int
    nbytes: int  # of the data that must follow the header
    dtype_name: str  # str(dtype), computed once


# Headers already parsed, by (shape, dtype) as the Array declares them. np.save
# writes the same bytes for the same layout, so a buffer that starts with the
# bytes of a known header says what that header says, without parsing.
_KNOWN_HEADERS: dict[tuple[tuple[int, ...], str], _Header] = {}
_MAX_KNOWN_HEADERS = 256


def _known_header(array: Array) -> _Header | None:
    known = _KNOWN_HEADERS.get((tuple(array.shape), array.dtype))
    return known if known is not None and array.data.startswith(known.header) else None


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a serialised Array, without copying its bytes.

    ``Array.numpy()`` copies through ``np.load``; the server reads every array
    of every reply, so it reads views instead. Parsing a ``.npy`` header costs
    more than viewing a 1e5-element array, so a header is parsed once per
    layout and later buffers that start with the very same bytes are viewed
    directly (the same result as parsing them, errors included).
    """
    data = array.data
    known = _known_header(array)
    if known is not None:
        return np.frombuffer(data, dtype=known.dtype, count=known.count, offset=len(known.header)).reshape(
            known.shape, order=known.order
        )
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(buffer)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    order = "F" if fortran_order else "C"
    offset, count = buffer.tell(), math.prod(shape)
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order=order)
    if len(_KNOWN_HEADERS) >= _MAX_KNOWN_HEADERS:
        _KNOWN_HEADERS.clear()
    _KNOWN_HEADERS[(tuple(array.shape), array.dtype)] = _Header(
        bytes(data[:offset]), dtype, tuple(shape), order, count, count * dtype.itemsize, str(dtype)
    )
    return view


def array_layout(array: Array) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` that the bytes of a serialised Array hold.

    Raises ``ValueError`` exactly where ``array_view`` does (a malformed
    header, too few bytes); with a known header it makes no view at all, which
    is what screening the layout of every reply needs.
    """
    known = _known_header(array)
    if known is not None and len(array.data) >= len(known.header) + known.nbytes:
        return known.shape, known.dtype_name
    view = array_view(array)
    return view.shape, str(view.dtype)


def record_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{key: read-only view}`` of every array in a record (see ``array_view``)."""
    return {key: array_view(array) for key, array in record.items()}


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ``{key: np.ndarray}``, keeping the record's key order."""
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{key: np.ndarray}`` -> ArrayRecord (Flower does not take raw dicts)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays in one ArrayRecord (what goes on the wire)."""
    return sum(len(array.data) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Bytes of all serialised arrays a message carries."""
    # content.items(), not content.array_records: that builds a new type-checked dict at every access.
    return sum(record_bytes(record) for record in content.values() if isinstance(record, ArrayRecord))
