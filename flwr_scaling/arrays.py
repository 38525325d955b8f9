"""Conversions between Flower records, NumPy dicts and torch dicts, and byte counts."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a serialised Array, without copying its bytes.

    ``Array.numpy()`` copies through ``np.load``; the server reads every array
    of every reply twice (checks, then averages), so it reads views instead.
    """
    buffer = io.BytesIO(array.data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(buffer)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    view = np.frombuffer(array.data, dtype=dtype, count=int(np.prod(shape)), offset=buffer.tell())
    return view.reshape(shape, order="F" if fortran_order else "C")


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


def weighted_average(
    arrays_list: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """``Σ_m w_m a_m / Σ_m w_m`` key by key, accumulated in float32 like Flower's FedAvg.

    Two buffers per key, whatever the number of replies: the sum and one
    scratch array (no temporaries per reply). The result depends on the order
    of ``arrays_list``; the strategy passes replies in a fixed order.
    """
    if not arrays_list:
        raise ValueError("weighted_average needs at least one set of arrays")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: dict[str, np.ndarray] = {}
    for key in arrays_list[0]:
        first = np.asarray(arrays_list[0][key])
        dtype = first.dtype if np.issubdtype(first.dtype, np.floating) else np.float32
        acc = np.multiply(first, np.asarray(weights[0] / total, dtype=dtype), dtype=dtype)
        scratch = np.empty_like(acc)
        for arrays, weight in zip(arrays_list[1:], weights[1:], strict=True):
            np.multiply(arrays[key], np.asarray(weight / total, dtype=dtype), out=scratch, dtype=dtype)
            acc += scratch
        out[key] = acc
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays in one ArrayRecord (what goes on the wire)."""
    return sum(len(array.data) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Bytes of all serialised arrays a message carries."""
    return sum(record_bytes(record) for record in content.array_records.values())


def total_bytes(contents: Iterable[RecordDict]) -> int:
    return sum(content_bytes(content) for content in contents)
