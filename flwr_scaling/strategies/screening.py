"""Checks on client replies before they may touch the global model or preconditioner, and their averages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import WARNING
from typing import NamedTuple

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flwr_scaling.core.arrays import checked_weighted_average
from flwr_scaling.core.rules import ScalingRule
from flwr_scaling.protocol.flower_adapter import log
from flwr_scaling.protocol.records import array_layout, array_view, record_views

Layout = Mapping[str, tuple[tuple[int, ...], str]]


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


class RoundAverages(NamedTuple):
    """A round's weighted averages (see ``ReplyScreen.average``)."""

    model: dict[str, np.ndarray]
    stats: dict[str, np.ndarray] | None  # None: the rule has no state
    clean: bool  # no NaN, Inf or impossible negative value in any averaged reply


class ReplyScreen:
    """Screens a round's replies (``reply_problem``) and averages the accepted ones.

    Parameters
    ----------
    rule : ScalingRule
        The run's scaling rule: whether replies carry a statistic (or state),
        and whether its entries may be negative.
    arrayrecord_key : str (default: "arrays")
        Key of the model ArrayRecord in replies.
    stats_key : str (default: "stats")
        Key of the statistic (or state) ArrayRecord in replies.
    weighted_by_key : str (default: "num-examples")
        Metric whose value weights the averages.
    """

    def __init__(
        self,
        *,
        rule: ScalingRule,
        arrayrecord_key: str = "arrays",
        stats_key: str = "stats",
        weighted_by_key: str = "num-examples",
    ) -> None:
        self.rule = rule
        self.arrayrecord_key = arrayrecord_key
        self.stats_key = stats_key
        self.weighted_by_key = weighted_by_key

    def weight(self, message: Message) -> float:
        """The reply's ``weighted_by_key`` metric (screened: present and positive)."""
        return float(split_records(message.content)[1][0][self.weighted_by_key])

    def screen(self, replies: list[Message], *, stats_layout: Layout | None, parameter_layout: Layout,
               with_model: bool = True) -> list[Message]:
        """The replies that may be aggregated; every rejection is logged with its node and reason."""
        accepted, rejections = self.screen_replies(
            replies, stats_layout=stats_layout, parameter_layout=parameter_layout, with_model=with_model
        )
        log_rejections(rejections)
        return accepted

    def screen_replies(
        self,
        replies: list[Message],
        *,
        stats_layout: Layout | None,
        parameter_layout: Layout,
        with_model: bool = True,
        check_values: bool = True,
    ) -> tuple[list[Message], list[tuple[Message, str]]]:
        """``(accepted, [(rejected reply, reason), ...])`` in reply order, nothing logged.

        ``parameter_layout`` is the layout of the model sent. Until the server
        holds a state (``stats_layout`` is ``None``), the first accepted
        statistic fixes the layout (and the first accepted reply the metric
        names) for the rest. ``check_values=False`` leaves out the checks of
        the values (NaN, Inf, sign), which the caller then makes on the
        averages; a reply rejected for its layout gets the reason the full
        check gives it.
        """
        model_layout = parameter_layout if with_model else None
        metric_keys = None
        accepted, rejections = [], []
        for message in replies:
            options = dict(
                arrayrecord_key=self.arrayrecord_key,
                stats_key=self.stats_key,
                weighted_by_key=self.weighted_by_key,
                model_layout=model_layout,
                rule=self.rule,
                stats_layout=stats_layout,
                parameter_layout=parameter_layout,
                metric_keys=metric_keys,
            )
            problem = reply_problem(message, check_values=check_values, **options)
            if problem is not None:
                if not check_values:  # the reason a full check gives (a bad value may come first)
                    problem = reply_problem(message, check_values=True, **options)
                rejections.append((message, problem))
                continue
            accepted.append(message)
            metric_keys = set(split_records(message.content)[1][0].keys())
            if stats_layout is None and self.rule.has_state:
                stats_layout = describe(message.content[self.stats_key])
        return accepted, rejections

    def average(self, accepted: list[Message]) -> RoundAverages:
        """Weighted averages of the accepted replies' models and statistics, and whether all their values are good.

        Good: every average is finite (so every value was, see
        ``checked_weighted_average``) and, for a rule whose statistics cannot
        be negative, no reply's statistic has a negative entry.
        """
        weights = [self.weight(m) for m in accepted]
        # Views of the serialised bytes: nothing is copied but into the averages.
        models = checked_weighted_average([record_views(m.content[self.arrayrecord_key]) for m in accepted], weights)
        if not self.rule.has_state:
            return RoundAverages(models.arrays, None, models.finite)
        stats = checked_weighted_average(
            [record_views(m.content[self.stats_key]) for m in accepted], weights, find_lowest=self.rule.nonnegative
        )
        return RoundAverages(models.arrays, stats.arrays, models.finite and stats.finite and not stats.lowest < 0)

    def accept_and_average(
        self,
        replies: list[Message],
        *,
        stats_layout: Layout | None,
        parameter_layout: Layout,
        min_successful: int,
        order: Callable[[Message], tuple],
    ) -> tuple[list[Message], RoundAverages | None]:
        """``(accepted replies sorted by order, their averages)``; averages ``None`` with fewer than ``min_successful``.

        Screens the layouts only, then checks the values of all accepted
        replies at once on their averages (no pass over each reply's data just
        for the checks). Only when that finds a bad value, screens again reply
        by reply with every check, which names the culprits and leaves them out.
        """
        layouts = dict(stats_layout=stats_layout, parameter_layout=parameter_layout)
        accepted, rejections = self.screen_replies(replies, check_values=False, **layouts)
        # A fixed order of summation makes the float averages identical from run to run.
        accepted.sort(key=order)
        enough = len(accepted) >= max(1, min_successful)
        averages = self.average(accepted) if enough else None
        if averages is not None and averages.clean:
            log_rejections(rejections)
            return accepted, averages
        # a bad value somewhere, or too few replies to tell: as many as each full check leaves
        accepted = sorted(self.screen(replies, **layouts), key=order)
        enough = len(accepted) >= max(1, min_successful)
        return accepted, self.average(accepted) if enough else None


def log_rejections(rejections: list[tuple[Message, str]]) -> None:
    """One warning per rejected reply, naming its node and the reason."""
    for message, problem in rejections:
        log(WARNING, "Rejected reply from node %s: %s", message.metadata.src_node_id, problem)
