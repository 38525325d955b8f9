"""Honest statistics over seeds: rounds to a target without survivor bias, paired differences with a bootstrap CI.

Two habits flatter a method that often fails: averaging the rounds to a
target over the seeds that reached it, and calling a difference "within
noise" by eye. Here

- ``reach_summary`` takes the median over **all** seeds, a seed that never
  reached the target counting as "more than the horizon" (so the median is
  "> R" once half the seeds fail), and says how many reached it (``k/n``);
- ``paired_comparison`` compares two methods seed by seed: a sweep gives the
  same split, partition and initial model to every method of a seed, so the
  per-seed differences remove the seed's own luck; their mean gets a
  percentile bootstrap 95 % interval (seeded, 10,000 resamples by default:
  the same files give the same interval). An interval that excludes 0 is a
  difference ("better"/"worse"), one that contains it is not ("no clear
  difference"). With 3 seeds the bootstrap is coarse (it can only resample
  those 3 values); the tables say how many pairs they rest on.

Pure functions of numbers; the report (``report.py``) turns them into tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flwr_scaling.studies.plan import value_text

RESAMPLES = 10_000
LEVEL = 0.95
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class ReachSummary:
    """Rounds to a target over seeds: the median over all seeds (never = beyond ``horizon``), and how many reached."""

    median: float  # math.inf when at least half the seeds never reached the target
    reached: int
    n: int
    horizon: int  # the number of rounds run

    def text(self) -> str:
        """``"7 (4/5)"``, ``"7.5 (5/5)"``, or ``"> 20 (2/5)"`` when the median seed never reached the target."""
        if math.isinf(self.median):
            return f"> {self.horizon} ({self.reached}/{self.n})"
        return f"{self.median:g} ({self.reached}/{self.n})"


def reach_summary(first_rounds: Sequence[int | None], horizon: int) -> ReachSummary:
    """Median rounds to target over every seed; ``None`` (never reached) counts as infinitely many rounds.

    Parameters
    ----------
    first_rounds : sequence of int or None
        Per seed, the first round reaching the target, or ``None``.
    horizon : int
        The rounds each run had (what "never" exceeds).
    """
    if not first_rounds:
        raise ValueError("reach_summary needs at least one seed")
    values = sorted(math.inf if r is None else float(r) for r in first_rounds)
    middle = len(values) // 2
    # The mean of two middle values, one of them "never", is "never": no finite number is honest there.
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    return ReachSummary(median, sum(r is not None for r in first_rounds), len(first_rounds), horizon)


@dataclass(frozen=True)
class PairedComparison:
    """``method`` minus ``baseline`` over the seeds both ran: the mean paired difference and its bootstrap CI."""

    method: str
    baseline: str
    n: int  # pairs (seeds both ran)
    mean: float
    low: float | None  # None with fewer than 2 pairs: no interval
    high: float | None

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` when the interval excludes 0, else ``no clear difference``."""
        if self.low is None or self.high is None:
            return "one pair: no interval"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no clear difference"

    def text(self, digits: int = 3) -> str:
        """``+0.012 [+0.004, +0.020]``."""
        if self.low is None:
            return f"{self.mean:+.{digits}f}"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_differences(values: Mapping[int, float], baseline: Mapping[int, float]) -> list[float]:
    """``values[s] − baseline[s]`` for every seed ``s`` both have, in seed order."""
    return [values[seed] - baseline[seed] for seed in sorted(set(values) & set(baseline))]


def bootstrap_interval(differences: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences``.

    Draws ``resamples`` samples of the same size with replacement (numpy's
    PCG64 seeded with ``seed``: reproducible), takes each sample's mean and
    returns the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of those means
    (numpy's default linear interpolation).
    """
    data = np.asarray(differences, dtype=np.float64)
    if data.size < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 differences, got {data.size}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[picks].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_comparison(method: str, values: Mapping[int, float], baseline_name: str,
                      baseline: Mapping[int, float], **bootstrap) -> PairedComparison:
    """Compare ``values`` (seed -> score of ``method``) with ``baseline`` (seed -> score) seed by seed."""
    differences = paired_differences(values, baseline)
    if not differences:
        raise ValueError(f"{method} and {baseline_name} share no seed; paired differences need the same seeds")
    interval = bootstrap_interval(differences, **bootstrap) if len(differences) > 1 else (None, None)
    return PairedComparison(method, baseline_name, len(differences), statistics.fmean(differences), *interval)


def paired_table(comparisons: Sequence[tuple[str, PairedComparison]], quantity: str) -> list[str]:
    """Markdown lines: one row per ``(setting, comparison)``: method vs baseline, pairs, mean diff [95 % CI], verdict."""
    lines = [f"| setting | method vs baseline | pairs | mean paired diff in {quantity} [95 % CI] | verdict |",
             "|---|---|---|---|---|"]
    for setting, c in comparisons:
        lines.append(f"| {setting or '-'} | {c.method} vs {c.baseline} | {c.n} | {c.text()} | {c.verdict} |")
    return lines


# ------------------------------------------------------------ over metrics rows
def tuning_score(rows: Sequence[Mapping[str, float]]) -> float:
    """The tuning score of one run: its mean (test or validation) accuracy over rounds 1..R.

    It rewards speed and the final value alike; ``flwr-scaling tune`` chooses step sizes by it.
    """
    return statistics.fmean(float(row["test_accuracy"]) for row in rows)


def honest_summary(runs: Sequence[Sequence[Mapping[str, float]]], target: float) -> dict[str, object]:
    """Per group of seeds: the tuning score (mean ± std over seeds) and rounds and MB to ``target`` as medians over
    all seeds (a seed that never reached it counts as more than the horizon, resp. infinitely many MB)."""
    scores = [tuning_score(rows) for rows in runs]
    firsts = [next((int(r["round"]) for r in rows if r["test_accuracy"] >= target), None) for rows in runs]
    reach = reach_summary(firsts, min(len(rows) for rows in runs))
    megabytes = [math.inf if first is None else
                 sum(r["bytes_down"] + r["bytes_up"] for r in rows if r["round"] <= first) / 1e6
                 for rows, first in zip(runs, firsts)]
    return {
        "target_accuracy": target,
        "tuning_score_mean": statistics.fmean(scores),
        "tuning_score_std": statistics.stdev(scores) if len(scores) > 1 else None,
        "rounds_to_target_median": reach.median,
        "mb_to_target_median": statistics.median(megabytes),
        "reach_text": reach.text(),
    }


def paired_section(groups: Sequence[tuple[str, str, Mapping[int, Sequence[Mapping[str, float]]]]],
                   baseline: str) -> list[str]:
    """Markdown lines comparing every method with ``baseline`` seed by seed, in each setting, or ``[]``.

    ``groups``: ``(setting, method, {seed: rows})``; a setting is the grid values other than method and seed
    (``""`` for none). Two quantities: the tuning score and the final accuracy. Empty when no setting has the
    baseline and another method with a seed in common.
    """
    by_setting: dict[str, dict[str, Mapping[int, Sequence[Mapping[str, float]]]]] = {}
    for setting, method, runs in groups:
        by_setting.setdefault(setting, {})[method] = runs
    lines = []
    for title, measure in (("mean acc over rounds (tuning score)", tuning_score),
                           ("final acc", lambda rows: float(rows[-1]["test_accuracy"]))):
        comparisons = []
        for setting, methods in by_setting.items():
            if baseline not in methods:
                continue
            base = {seed: measure(rows) for seed, rows in methods[baseline].items()}
            for method, runs in methods.items():
                if method != baseline and set(runs) & set(base):
                    comparisons.append((setting, paired_comparison(
                        method, {seed: measure(rows) for seed, rows in runs.items()}, baseline, base)))
        if comparisons:
            lines += ["", *paired_table(comparisons, title)]
    return lines


def paired_note(groups: Sequence[tuple[str, str, Mapping[int, Sequence[Mapping[str, float]]]]],
                baseline: str) -> list[str]:
    """``paired_section`` with the paragraph that says how to read it, as one note of a report (or none)."""
    lines = paired_section(groups, baseline)
    if not lines:
        return []
    return ["\n".join([f"Paired differences from {baseline} over the seeds both ran (same seed: same split, partition "
                       f"and initial model); mean and percentile bootstrap 95 % interval ({RESAMPLES:,} resamples, "
                       f"seed {BOOTSTRAP_SEED}). \"better\"/\"worse\": the interval excludes 0.", *lines])]


def paired_note_of_groups(groups: Sequence[Any], keys: Sequence[str], method_key: str = "method",
                          preferred: str = "fedavg") -> list[str]:
    """``paired_note`` for a report's seed groups (``outcomes.Group``: ``values`` in ``keys`` order, ``seeds``,
    ``runs``): each method against ``preferred`` (else the first method), per setting of the other keys."""
    if method_key not in keys:
        return []
    position = list(keys).index(method_key)
    methods = [group.values[position] for group in groups]
    entries = [(", ".join(f"{k}={value_text(v)}" for k, v in zip(keys, g.values) if k != method_key),
                g.values[position], dict(zip(g.seeds, g.runs))) for g in groups]
    return paired_note(entries, preferred if preferred in methods else methods[0])


def reading_note(split: str, target: str) -> str:
    """How to read a sweep's summary table: which split, what the columns mean (``target``: "0.9" or "the target")."""
    return (f"Accuracy on the {split} split. Mean ± sample standard deviation (n − 1) over seeds. Mean acc over "
            f"rounds: the tuning score (rewards speed and the final value). Rounds and MB to {target}: first round "
            f"whose accuracy is >= {target}, median over all seeds, a seed that never reached it counting as more "
            f"than the rounds run (\"> R\" when the median seed never did; how many reached it in brackets). MB: "
            f"bytes sent down and up (10^6). Γ/α: largest precond_max / precond_min over rounds and seeds.")


__all__ = ["ReachSummary", "PairedComparison", "reach_summary", "paired_differences", "bootstrap_interval",
           "paired_comparison", "paired_table", "tuning_score", "honest_summary", "paired_section", "paired_note",
           "paired_note_of_groups", "reading_note",
           "RESAMPLES",
           "LEVEL"]
