"""Checks on one client reply before it may touch the global model or preconditioner."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flwr_scaling.protocol.records import array_layout, array_view
from flwr_scaling.core.rules import ScalingRule


def _arrays_problem(
    name: str,
    record: ArrayRecord,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    nonnegative: bool,
    check_values: bool = True,
) -> str | None:
    keys = set(record.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        return f"{name} has wrong keys (missing {missing}, unexpected {extra})"
    for key, array in record.items():
        shape, dtype = expected[key]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"{name}[{key}] is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        try:
            # Without the value checks no view is needed, only what the header says.
            values = array_view(array) if check_values else None
            held_shape, held_dtype = (values.shape, str(values.dtype)) if check_values else array_layout(array)
        except ValueError as error:
            return f"{name}[{key}] is not a valid NumPy buffer ({error})"
        if held_shape != shape or held_dtype != dtype:
            return f"{name}[{key}] holds {held_dtype}{list(held_shape)} but says {dtype}{list(shape)}"
        if values is None or values.size == 0:
            continue
        # Two reductions and no temporary array: min and max are NaN if any
        # entry is NaN, and one of them is infinite if any entry is.
        low, high = values.min(), values.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            return f"{name}[{key}] contains NaN or Inf"
        if nonnegative and low < 0:
            return f"{name}[{key}] has negative entries, impossible for this rule"
    return None


def split_records(content: RecordDict) -> tuple[dict[str, ArrayRecord], list[MetricRecord]]:
    """``({key: ArrayRecord}, [MetricRecord, ...])`` of a message's content, in one pass.

    Flower's ``content.array_records`` and ``content.metric_records`` build a
    new synchronised, type-checked dict at every access; the server screens
    every reply of a round, so it reads the records once, into plain containers.
    """
    arrays: dict[str, ArrayRecord] = {}
    metrics: list[MetricRecord] = []
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays[key] = record
        elif isinstance(record, MetricRecord):
            metrics.append(record)
    return arrays, metrics


def describe(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of a record: what a reply must match."""
    return {key: (tuple(array.shape), array.dtype) for key, array in record.items()}


def reply_problem(
    message: Message,
    *,
    arrayrecord_key: str,
    stats_key: str,
    weighted_by_key: str,
    model_layout: Mapping[str, tuple[tuple[int, ...], str]] | None,
    rule: ScalingRule,
    stats_layout: Mapping[str, tuple[tuple[int, ...], str]] | None,
    parameter_layout: Mapping[str, tuple[tuple[int, ...], str]],
    metric_keys: set[str] | None = None,
    check_values: bool = True,
) -> str | None:
    """Why this reply must be rejected, or ``None`` when it is good.

    ``model_layout`` is ``None`` for warm-up replies, which carry no model.
    ``stats_layout`` is the exact layout the statistic (or state) must have;
    while the server has no state yet it is ``None`` and the statistic must
    then cover a non-empty subset of ``parameter_layout`` (the model's
    arrays) with the same shapes and dtypes. ``metric_keys``, when given, is
    the set of metric names every reply of the round must carry (FedAvg's
    metric average needs the same keys everywhere).

    ``check_values=False`` checks everything but the values themselves (NaN,
    Inf, negative entries): the layout alone, without a pass over the data.
    The strategy screens a round that way, checks the values of all accepted
    replies at once on their averages, and screens again with
    ``check_values=True`` only when that finds a problem. A reply rejected
    without the value checks is rejected with them too (possibly for another
    reason, found first), so the full check gives the logged reason.
    """
    if message.has_error():
        return f"client raised: {message.error.reason}"
    content = message.content
    array_records, metrics = split_records(content)
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}"
    weight = metrics[0].get(weighted_by_key)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not np.isfinite(weight) or weight <= 0:
        return f"'{weighted_by_key}' is missing or not positive ({weight!r})"
    if metric_keys is not None and set(metrics[0].keys()) != metric_keys:
        return f"metric names {sorted(metrics[0].keys())} differ from the round's {sorted(metric_keys)}"
    allowed = ({arrayrecord_key} if model_layout is not None else set()) | ({stats_key} if rule.has_state else set())
    extra = set(array_records) - allowed
    if extra:
        return f"unexpected ArrayRecords {sorted(extra)}"
    if model_layout is not None:
        if arrayrecord_key not in array_records:
            return f"no '{arrayrecord_key}' ArrayRecord"
        problem = _arrays_problem("model", array_records[arrayrecord_key], model_layout, False, check_values)
        if problem:
            return problem
    if rule.has_state:
        if stats_key not in array_records:
            return f"no '{stats_key}' ArrayRecord (statistic or state)"
        record = array_records[stats_key]
        layout = stats_layout
        if layout is None:
            unknown = sorted(set(record.keys()) - set(parameter_layout))
            if unknown or not record.keys():
                return f"{stats_key} keys {unknown or '[]'} are not arrays of the model"
            layout = {key: parameter_layout[key] for key in record.keys()}
        return _arrays_problem(stats_key, record, layout, rule.nonnegative, check_values)
    return None
