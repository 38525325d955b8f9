"""Checks on client replies before they may touch the global model or preconditioner, and their averages.

Each reply is checked alone (``reply_problem``: layout, finite and possible
values, finite metrics), then against the round's cohort (``ReplyScreen.
screen_cohort``: claimed ``num-examples`` within its bound, model update and
statistic norms within ``screen_factor`` times the round's median, see
``flwr_scaling.strategies.robust``). The accepted replies are averaged by
their weights, or with ``aggregation`` median / trimmed-mean.

Long because the single-reply checks, the cohort checks and the checked fast
average share one pass over the replies (the fast path re-checks a reply only when
its average is not finite); the robust rules themselves live in ``robust.py``.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Mapping
from logging import WARNING
from typing import NamedTuple

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flwr_scaling.core.arrays import checked_weighted_average
from flwr_scaling.core.rules import ScalingRule
from flwr_scaling.protocol.flower_adapter import log
from flwr_scaling.protocol.records import array_layout, array_view, record_views
from flwr_scaling.strategies.robust import AGGREGATIONS, beyond_cohort, norm, robust_average

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
    for name, value in metrics[0].items():
        # A NaN train_loss would otherwise reach the metric average and metrics.csv.
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            return f"metric '{name}' is not finite ({value!r})"
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
    """Screens a round's replies (``reply_problem``, then ``screen_cohort``) and averages the accepted ones.

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
    screen_factor : float (default: 0.0)
        A reply whose model update norm ``||x_m - x_p||`` or statistic norm is
        more than this many times the round's median is rejected (only with
        at least 3 replies, see ``robust.beyond_cohort``). 0: off, as the
        strategies' own default screen has it; runs get the configuration's
        ``screen-factor`` (10 by default, ``server_app.make_strategy``).
    max_num_examples : int | None (default: None)
        Largest ``weighted_by_key`` a reply may claim.
    example_bounds : Mapping[int, int] | None (default: None)
        Largest claim of each node id (its known partition size, in
        simulation); it takes precedence over ``max_num_examples``. A node
        with neither bound is held to ``screen_factor`` times the round's
        median claim.
    aggregation : str (default: "mean")
        "mean" (weighted by the claims), "median" or "trimmed-mean" (element
        wise, unweighted: ``robust.robust_average``), for models and statistics.
    trim_fraction : float (default: 0.2)
        Fraction of the replies cut from each end by "trimmed-mean".
    """

    def __init__(
        self,
        *,
        rule: ScalingRule,
        arrayrecord_key: str = "arrays",
        stats_key: str = "stats",
        weighted_by_key: str = "num-examples",
        screen_factor: float = 0.0,
        max_num_examples: int | None = None,
        example_bounds: Mapping[int, int] | None = None,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if not screen_factor >= 0:
            raise ValueError(f"screen_factor must be >= 0, got {screen_factor}")
        self.rule = rule
        self.arrayrecord_key = arrayrecord_key
        self.stats_key = stats_key
        self.weighted_by_key = weighted_by_key
        self.screen_factor = screen_factor
        self.max_num_examples = max_num_examples
        # Kept as given, not copied: server_app.PartitionSizes computes a size only when a node replies.
        self.example_bounds: Mapping[int, int] = example_bounds if example_bounds is not None else {}
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction

    def weight(self, message: Message) -> float:
        """The reply's ``weighted_by_key`` metric (screened: present and positive)."""
        return float(split_records(message.content)[1][0][self.weighted_by_key])

    def screen(self, replies: list[Message], *, stats_layout: Layout | None, parameter_layout: Layout,
               with_model: bool = True, reference: ArrayRecord | None = None) -> list[Message]:
        """The replies that may be aggregated; every rejection is logged with its node and reason."""
        accepted, rejections = self.screen_replies(
            replies, stats_layout=stats_layout, parameter_layout=parameter_layout, with_model=with_model
        )
        accepted, outliers = self.screen_cohort(accepted, reference=reference if with_model else None)
        log_rejections(rejections + outliers)
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

        Each reply alone (``reply_problem``); the cohort rules are
        ``screen_cohort``'s. ``parameter_layout`` is the layout of the model
        sent. Until the server holds a state (``stats_layout`` is ``None``),
        the first accepted statistic fixes the layout (and the first accepted
        reply the metric names) for the rest. ``check_values=False`` leaves out
        the checks of the values (NaN, Inf, sign), which the caller then makes
        on the averages; a reply rejected for its layout gets the reason the
        full check gives it.
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

    def example_bound(self, message: Message) -> tuple[float, str] | None:
        """``(largest claim, what bounds it)`` for the reply's node, or ``None`` when only the cohort bounds it."""
        node = message.metadata.src_node_id
        if node in self.example_bounds:
            return self.example_bounds[node], "its partition's size"
        if self.max_num_examples:
            return self.max_num_examples, "max-num-examples"
        return None

    def screen_cohort(
        self, replies: list[Message], *, reference: ArrayRecord | None = None
    ) -> tuple[list[Message], list[tuple[Message, str]]]:
        """``(kept, [(rejected reply, reason), ...])``: the replies that ``reply_problem`` accepted, held
        to their bounds and to the round's cohort.

        In order: the claimed ``weighted_by_key`` against ``example_bound``
        (or, for nodes without one, ``screen_factor`` times the median claim);
        the model update norm ``||x_m - reference||`` (when ``reference``, the
        model sent, is given); the statistic's norm. Each cohort rule takes the
        median over the replies the previous rules kept.
        """
        kept, rejections = [], []
        for message in replies:
            bound = self.example_bound(message)
            claim = self.weight(message)
            if bound is not None and claim > bound[0]:
                rejections.append((message, f"'{self.weighted_by_key}' {claim:g} exceeds {bound[1]} ({bound[0]:g})"))
            else:
                kept.append(message)
        unbounded = [m for m in kept if self.example_bound(m) is None]
        self._drop_outliers(kept, unbounded, [self.weight(m) for m in unbounded], f"'{self.weighted_by_key}'", rejections)
        if reference is not None:
            sent = record_views(reference)
            sizes = [norm(record_views(m.content[self.arrayrecord_key]), sent) for m in kept]
            self._drop_outliers(kept, list(kept), sizes, "model update norm", rejections)
        if self.rule.has_state:
            sizes = [norm(record_views(m.content[self.stats_key])) for m in kept]
            self._drop_outliers(kept, list(kept), sizes, f"{self.stats_key} norm", rejections)
        return kept, rejections

    def _drop_outliers(self, kept: list[Message], judged: list[Message], sizes: list[float], what: str,
                       rejections: list[tuple[Message, str]]) -> None:
        """Remove from ``kept`` (into ``rejections``) the ``judged`` replies whose size is beyond the cohort's bound."""
        flags = beyond_cohort(sizes, self.screen_factor)
        if not any(flags):
            return
        median = float(np.median([s for s in sizes if math.isfinite(s)]))
        for message, size, flagged in zip(judged, sizes, flags):
            if flagged:
                kept.remove(message)
                rejections.append(
                    (message, f"{what} {size:.3g} is more than {self.screen_factor:g} x the round's median ({median:.3g})")
                )

    def average(self, accepted: list[Message]) -> RoundAverages:
        """Averages of the accepted replies' models and statistics, and whether all their values are good.

        Weighted means (``aggregation`` "mean"): good when every average is
        finite (so every value was, see ``checked_weighted_average``) and, for
        a rule whose statistics cannot be negative, no reply's statistic has a
        negative entry. Median and trimmed mean: the replies' values must have
        been checked before (``accept_and_average`` does); the result is good
        when finite.
        """
        if self.aggregation != "mean":
            model = robust_average([record_views(m.content[self.arrayrecord_key]) for m in accepted],
                                   self.aggregation, self.trim_fraction)
            stats = robust_average([record_views(m.content[self.stats_key]) for m in accepted],
                                   self.aggregation, self.trim_fraction) if self.rule.has_state else None
            clean = all(np.isfinite(v).all() for part in (model, stats or {}) for v in part.values())
            return RoundAverages(model, stats, clean)
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
        reference: ArrayRecord | None = None,
    ) -> tuple[list[Message], RoundAverages | None]:
        """``(accepted replies sorted by order, their averages)``; averages ``None`` with fewer than ``min_successful``.

        ``reference`` is the model sent this round (for the update norms).
        With weighted means, screens the layouts only, then checks the values
        of all accepted replies at once on their averages (no pass over each
        reply's data just for the checks). Only when that finds a bad value or
        an outlier, screens again reply by reply with every check, which names
        the culprits and leaves them out. Median and trimmed mean would hide a bad
        value, so with them every reply is checked first.
        """
        layouts = dict(stats_layout=stats_layout, parameter_layout=parameter_layout)
        if self.aggregation == "mean":
            accepted, rejections = self.screen_replies(replies, check_values=False, **layouts)
            accepted, outliers = self.screen_cohort(accepted, reference=reference)
            # A fixed order of summation makes the float averages identical from run to run.
            accepted.sort(key=order)
            enough = len(accepted) >= max(1, min_successful)
            averages = self.average(accepted) if enough and not outliers else None
            # An outlier may hold a bad value too: the full check below names that first.
            if averages is not None and averages.clean:
                log_rejections(rejections + outliers)
                return accepted, averages
        # a bad value or an outlier somewhere, too few replies to tell, or a robust average: as many as each
        # full check leaves
        accepted = sorted(self.screen(replies, reference=reference, **layouts), key=order)
        enough = len(accepted) >= max(1, min_successful)
        return accepted, self.average(accepted) if enough else None


def log_rejections(rejections: list[tuple[Message, str]]) -> None:
    """One warning per rejected reply, naming its node and the reason."""
    for message, problem in rejections:
        log(WARNING, "Rejected reply from node %s: %s", message.metadata.src_node_id, problem)
