"""Conversions between Flower records, NumPy dicts and torch dicts, and byte counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict


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
    """``Σ_m w_m a_m / Σ_m w_m`` key by key, in float64 then cast back to float32.

    Accumulating in float64 keeps the average independent of the order of the
    replies to well below float32 resolution.
    """
    if not arrays_list:
        raise ValueError("weighted_average needs at least one set of arrays")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    keys = list(arrays_list[0])
    out: dict[str, np.ndarray] = {}
    for key in keys:
        acc = np.zeros(np.shape(arrays_list[0][key]), dtype=np.float64)
        for arrays, weight in zip(arrays_list, weights, strict=True):
            acc += (weight / total) * np.asarray(arrays[key], dtype=np.float64)
        out[key] = acc.astype(np.float32)
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays in one ArrayRecord (what goes on the wire)."""
    return sum(len(array.data) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Bytes of all serialised arrays a message carries."""
    return sum(record_bytes(record) for record in content.array_records.values())


def total_bytes(contents: Iterable[RecordDict]) -> int:
    return sum(content_bytes(content) for content in contents)
