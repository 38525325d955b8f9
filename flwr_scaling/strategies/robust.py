"""Bounded client influence: the cohort rule that rejects outlying replies, and robust averages.

Two defences, both applied by ``ReplyScreen``:

- **Cohort rule** (``beyond_cohort``): a reply whose size (the norm of its
  model update ``x_m - x_p``, the norm of its statistic, its ``num-examples``)
  is more than ``factor`` times the median of the round's replies is an
  outlier. The median is what half the cohort reaches, so up to half the
  replies can be absurd without moving it; honest clients of one round differ
  by their data and their number of local steps, a small factor (10 by
  default). The rule needs at least ``MIN_COHORT`` replies: with two, the
  median is the mean of the two and one absurd reply would hide itself.
- **Robust averages** (``robust_average``): the element-wise median or trimmed
  mean of the accepted replies instead of their weighted mean. Both ignore
  the ``num-examples`` weights: a weight is a claim of the client, and a
  median or trimmed mean that used it could again be bought with one large
  claim (Flower's FedMedian and FedTrimmedAvg also use no weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

AGGREGATIONS = ("mean", "median", "trimmed-mean")
MIN_COHORT = 3  # fewest replies the cohort rule judges


def norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> float:
    """Euclidean norm of all ``arrays`` together (minus ``reference``, when given), in float64.

    float64 because a float32 sum of squares overflows to Inf for entries
    beyond about 1e19, and an infinite norm would look like a NaN problem
    instead of a large one.
    """
    total = 0.0
    for key, values in arrays.items():
        flat = np.asarray(values, dtype=np.float64).ravel()
        if reference is not None:
            flat = flat - np.asarray(reference[key], dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def beyond_cohort(sizes: Sequence[float], factor: float) -> list[bool]:
    """For each size, whether it exceeds ``factor`` times the median of the finite sizes.

    Nothing is flagged when ``factor`` is 0 (rule off), when fewer than
    ``MIN_COHORT`` sizes are finite, or when the median is 0 (then any
    factor of it is 0, and every reply that moved at all would be flagged).
    Non-finite sizes are never flagged here: the value checks name them.
    """
    finite = [s for s in sizes if math.isfinite(s)]
    if factor <= 0 or len(finite) < MIN_COHORT:
        return [False] * len(sizes)
    bound = factor * float(np.median(finite))
    if bound <= 0:
        return [False] * len(sizes)
    return [math.isfinite(s) and s > bound for s in sizes]


def trim_count(count: int, fraction: float) -> int:
    """Replies cut from each end by a trimmed mean of ``count`` replies: ``floor(fraction * count)``,
    at most what leaves one reply."""
    return min(int(math.floor(fraction * count)), (count - 1) // 2)


def robust_average(
    replies: Sequence[Mapping[str, np.ndarray]], aggregation: str, trim_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """Element-wise ``"median"`` or ``"trimmed-mean"`` of the replies' arrays, in their dtype.

    The trimmed mean sorts each entry's values over the replies, drops the
    ``trim_count`` smallest and largest, and averages the rest. Weights are
    not used (see the module docstring). NaN propagates into the median; the
    caller checks values before.
    """
    if aggregation not in AGGREGATIONS[1:]:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS[1:]}, got {aggregation!r}")
    if not replies:
        raise ValueError("no replies to average")
    cut = trim_count(len(replies), trim_fraction)
    result = {}
    for key, first in replies[0].items():
        stacked = np.stack([np.asarray(r[key], dtype=np.float64) for r in replies])
        if aggregation == "median":
            value = np.median(stacked, axis=0)
        else:
            value = np.sort(stacked, axis=0)[cut: len(replies) - cut].mean(axis=0)
        result[key] = value.astype(np.asarray(first).dtype)
    return result
