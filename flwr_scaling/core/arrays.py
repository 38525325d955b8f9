"""Conversions between Flower records, NumPy dicts and torch dicts, and byte counts."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
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


def numpy_to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in arrays.items()}


def torch_to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copies, never views: a view of ``model.state_dict()`` changes when the model trains on."""
    return {key: value.detach().cpu().numpy().astype(np.float32, copy=True) for key, value in tensors.items()}


@dataclass
class CheckedAverage:
    """A weighted average and what it tells about its inputs (see ``checked_weighted_average``)."""

    arrays: dict[str, np.ndarray]
    finite: bool  # every entry of every average is finite
    lowest: float  # the smallest entry of any input (inf when not asked for, or no entries)


def weighted_average(
    arrays_list: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """``Σ_m w_m a_m / Σ_m w_m`` key by key, accumulated in float32 like Flower's FedAvg.

    One buffer per key, whatever the number of replies (see
    ``checked_weighted_average``). The result depends on the order of
    ``arrays_list``; the strategy passes replies in a fixed order.
    """
    return checked_weighted_average(arrays_list, weights).arrays


def checked_weighted_average(
    arrays_list: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    find_lowest: bool = False,
) -> CheckedAverage:
    """``Σ_m w_m a_m / Σ_m w_m`` key by key, and whether it is finite, in one pass over the inputs.

    Each input array is read once, by a fused multiply-add into the key's
    float32 accumulator (``torch``'s ``add_`` with ``alpha``: one pass, where
    NumPy needs a multiply and an add). The checks ride on the averages
    instead of on every input: with positive weights a NaN or an Inf in any
    input makes its average non-finite, so ``finite`` is True exactly when
    every input entry is finite, unless finite inputs overflow float32 (then
    ``finite`` is False and a per-input check finds nothing wrong).
    ``find_lowest`` also takes the minimum of every input array right after
    it was added, while it is still in cache (a sign check must look at every
    input: the average of a negative entry and larger positive ones is
    positive). Accumulators are float32 (float64 or float16 for inputs of
    that type, as NumPy would give).
    """
    if not arrays_list:
        raise ValueError("weighted_average needs at least one set of arrays")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    factors = [weight / total for weight in weights]
    out: dict[str, np.ndarray] = {}
    finite, lowest = True, math.inf
    with _one_torch_thread(), warnings.catch_warnings():
        # The inputs are read-only views of received bytes, only ever read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key in arrays_list[0]:
            first = np.asarray(arrays_list[0][key])
            dtype = first.dtype if first.dtype in _TORCH_FLOATS else np.dtype(np.float32)
            acc = torch.empty(first.shape, dtype=_TORCH_FLOATS[dtype])
            for index, (arrays, factor) in enumerate(zip(arrays_list, factors, strict=True)):
                values = torch.from_numpy(_native(arrays[key], dtype))
                if index == 0:
                    torch.mul(values, factor, out=acc)
                else:
                    acc.add_(values, alpha=factor)
                if find_lowest and values.numel():
                    lowest = min(lowest, float(values.min()))
            if acc.numel():
                low, high = torch.aminmax(acc)
                finite = finite and bool(torch.isfinite(low)) and bool(torch.isfinite(high))
            out[key] = acc.numpy()
    return CheckedAverage(out, finite, lowest)


@contextmanager
def _one_torch_thread():
    """Run torch kernels on the calling thread only, for the duration of the block.

    An average is bound by memory bandwidth, so a second thread gains little;
    but an OpenMP thread that must wait for a busy core stalls every kernel:
    measured on the loaded 2-core development machine, one ``add_`` of 1e5
    floats took 3.5 ms with 2 threads against 8 µs with one.
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


_TORCH_FLOATS = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64, np.dtype(np.float16): torch.float16}


def _native(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype`` in native byte order: the array itself when it already is (no copy)."""
    values = np.asarray(values)
    return values if values.dtype == dtype else values.astype(dtype)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays in one ArrayRecord (what goes on the wire)."""
    return sum(len(array.data) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Bytes of all serialised arrays a message carries."""
    # content.items(), not content.array_records: that builds a new type-checked dict at every access.
    return sum(record_bytes(record) for record in content.values() if isinstance(record, ArrayRecord))


def total_bytes(contents: Iterable[RecordDict]) -> int:
    return sum(content_bytes(content) for content in contents)
