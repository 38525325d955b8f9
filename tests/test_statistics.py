"""Honest statistics (studies/statistics.py): every number below is worked out by hand."""

from __future__ import annotations

import math

import pytest

from flwr_scaling.studies.statistics import (
    bootstrap_interval, paired_comparison, paired_differences, paired_table, reach_summary,
)


def test_rounds_to_target_count_the_seeds_that_never_reached_it():
    # 3, 5, never, 7, never -> sorted 3, 5, 7, inf, inf: median 7, 3 of 5 reached.
    summary = reach_summary([3, None, 5, 7, None], horizon=20)
    assert (summary.median, summary.reached, summary.n) == (7.0, 3, 5)
    assert summary.text() == "7 (3/5)"
    # The survivor mean would say 5.0 for 3, never, never; the median of 3, inf, inf is inf.
    assert reach_summary([3, None, None], horizon=20).text() == "> 20 (1/3)"
    # Even count: the mean of the two middle values; with a never among them, never.
    assert reach_summary([4, 3, 6, 10], horizon=12).text() == "5 (4/4)"
    assert reach_summary([4, None, 6, None], horizon=12).text() == "> 12 (2/4)"
    assert reach_summary([11, 12], horizon=20).text() == "11.5 (2/2)"


def test_paired_differences_use_the_seeds_both_methods_ran():
    assert paired_differences({0: 0.9, 1: 0.8, 2: 0.7}, {1: 0.5, 2: 0.75, 3: 0.1}) == pytest.approx([0.3, -0.05])


def test_bootstrap_interval_of_two_values_is_their_range():
    # Resamples of (0, 1) of size 2 have means 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5 % and
    # 97.5 % quantiles of 10,000 such means are 0 and 1.
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # Equal differences: every resample has that mean.
    assert bootstrap_interval([0.02, 0.02, 0.02]) == pytest.approx((0.02, 0.02))
    # Seeded: the same call gives the same interval; a 50 % interval is inside the 95 % one.
    data = [0.01, 0.03, -0.02, 0.05, 0.00]
    assert bootstrap_interval(data) == bootstrap_interval(data)
    low95, high95 = bootstrap_interval(data)
    low50, high50 = bootstrap_interval(data, level=0.5)
    assert low95 <= low50 < high50 <= high95
    assert low95 >= min(data) and high95 <= max(data)
    with pytest.raises(ValueError, match="at least 2 differences, got 1"):
        bootstrap_interval([0.1])


def test_paired_comparison_verdicts_and_table():
    better = paired_comparison("savic", {0: 0.95, 1: 0.96, 2: 0.97}, "fedavg", {0: 0.90, 1: 0.91, 2: 0.92})
    assert (better.n, better.mean, better.verdict) == (3, pytest.approx(0.05), "better")
    assert better.text() == "+0.050 [+0.050, +0.050]"
    mixed = paired_comparison("x", {0: 1.0, 1: 0.0}, "y", {0: 0.0, 1: 1.0})  # differences +1, -1
    assert (mixed.mean, mixed.low, mixed.high, mixed.verdict) == (0.0, -1.0, 1.0, "no clear difference")
    worse = paired_comparison("x", {0: 0.0, 1: 0.1}, "y", {0: 0.5, 1: 0.5})  # -0.5, -0.4
    assert (worse.low, worse.high, worse.verdict) == (pytest.approx(-0.5), pytest.approx(-0.4), "worse")
    single = paired_comparison("x", {0: 0.5}, "y", {0: 0.25})
    assert (single.low, single.verdict, single.text()) == (None, "one pair: no interval", "+0.250")
    with pytest.raises(ValueError, match="x and y share no seed"):
        paired_comparison("x", {0: 0.5}, "y", {1: 0.25})
    assert paired_table([("alpha=0.1", mixed)], "final acc") == [
        "| setting | method vs baseline | pairs | mean paired diff in final acc [95 % CI] | verdict |",
        "|---|---|---|---|---|",
        "| alpha=0.1 | x vs y | 2 | +0.000 [-1.000, +1.000] | no clear difference |",
    ]
    assert math.isinf(reach_summary([None], horizon=3).median)
