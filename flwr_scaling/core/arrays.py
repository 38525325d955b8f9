"""Conversions between NumPy and torch dicts, and the weighted averages of the server update.

The math alone: no Flower. What reads and writes Flower records (views of
serialised arrays, byte counts) is in ``flwr_scaling.protocol.records``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flwr_scaling.core.devices import torch_threads


def numpy_to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``{key: float32 tensor}`` copies of ``arrays`` (a model's ``load_state_dict`` input)."""
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
    with torch_threads(1), warnings.catch_warnings():  # a bandwidth-bound average gains nothing from more
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


_TORCH_FLOATS = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64, np.dtype(np.float16): torch.float16}


def _native(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype`` in native byte order: the array itself when it already is (no copy)."""
    values = np.asarray(values)
    return values if values.dtype == dtype else values.astype(dtype)
