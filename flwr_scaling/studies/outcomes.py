"""What finished runs achieved, computed from their ``metrics.csv`` rows alone (no files, no plots).

A run is a list of rows, one per round, as ``read_metrics`` returns them. A
group is a list of runs that differ only in their seed; ``compare`` reports
groups of one run, sweeps groups of one run per seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Rows = Sequence[Mapping[str, float]]  # one run: its metrics.csv rows, round by round


@dataclass(frozen=True)
class Group:
    """Runs that differ only in their seed (one run for ``compare``), and how the reports name them.

    ``cells`` are the leading columns of the summary tables, in order (e.g.
    ``{"method": "fedavg", "lr": "0.4"}``); ``label`` names the group in plot
    legends; ``values`` are its grid values (empty for ``compare``), which
    choose its colour and line style; ``seeds`` are its runs' seeds.
    """

    label: str
    cells: dict[str, str]
    runs: list[Rows]
    values: tuple[Any, ...] = ()
    seeds: list[int] = field(default_factory=list)


def first_round_reaching(rows: Rows, target: float) -> int | None:
    """The first round whose test accuracy is at least ``target``; ``None`` if no round is."""
    return next((int(r["round"]) for r in rows if r["test_accuracy"] >= target), None)


def megabytes_until(rows: Rows, last_round: int | None = None) -> float:
    """Megabytes sent down and up in rounds 1..last_round (all rounds if ``None``)."""
    chosen = [r for r in rows if last_round is None or r["round"] <= last_round]
    return sum(r["bytes_down"] + r["bytes_up"] for r in chosen) / 1e6


def gamma_over_alpha(row: Mapping[str, float]) -> float:
    """The preconditioner's spread precond_max / precond_min in one round (infinite if the minimum is 0)."""
    return row["precond_max"] / row["precond_min"] if row["precond_min"] > 0 else math.inf


def series(rows: Rows, name: str) -> list[float]:
    """One value per round: a metrics.csv column, or ``"mb"`` (cumulative MB) or ``"gamma_over_alpha"``."""
    if name == "mb":
        total, values = 0.0, []
        for r in rows:
            total += (r["bytes_down"] + r["bytes_up"]) / 1e6
            values.append(total)
        return values
    if name == "gamma_over_alpha":
        return [gamma_over_alpha(r) for r in rows]
    return [float(r[name]) for r in rows]


def seed_group_summary(runs: Sequence[Rows], target: float) -> dict[str, object]:
    """Statistics over runs that differ only in their seed (each a list of ``metrics.csv`` rows).

    Means and sample standard deviations (n - 1; ``None`` for one run) of the
    final and the best test accuracy; rounds and MB to ``target`` averaged
    over the runs that reached it (``None`` if none did) and how many did;
    mean total MB; the largest precond_max / precond_min of any round and run;
    the final optimality gap and worst-10 % client accuracy when every run has them.
    """

    def spread(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    finals = [rows[-1]["test_accuracy"] for rows in runs]
    bests = [max(r["test_accuracy"] for r in rows) for rows in runs]
    reached = [(round_, megabytes_until(rows, round_)) for rows in runs
               if (round_ := first_round_reaching(rows, target)) is not None]
    return {
        "n_seeds": len(runs),
        "final_accuracy_mean": statistics.fmean(finals),
        "final_accuracy_std": spread(finals),
        "best_accuracy_mean": statistics.fmean(bests),
        "best_accuracy_std": spread(bests),
        "rounds_to_target_mean": statistics.fmean(r for r, _ in reached) if reached else None,
        "reached_target": len(reached),
        "mb_to_target_mean": statistics.fmean(mb for _, mb in reached) if reached else None,
        "mb_total_mean": statistics.fmean(megabytes_until(rows) for rows in runs),
        "max_gamma_over_alpha": max(gamma_over_alpha(r) for rows in runs for r in rows),
        # Convex problems (logreg): the optimality gap f(x) - f* after the last round.
        "final_gap_mean": statistics.fmean(gaps) if (gaps := _finals(runs, "f_gap")) else None,
        "final_gap_std": spread(gaps) if gaps else None,
        # Runs with client evaluation: the worst-10 % clients' accuracy at the last evaluated round.
        "final_worst10_mean": statistics.fmean(worst) if (worst := _finals(runs, "client_acc_worst10")) else None,
        "final_worst10_std": spread(worst) if worst else None,
    }


def _finals(runs: Sequence[Rows], column: str) -> list[float]:
    """Each run's last finite value of ``column``; empty unless every run has one."""
    finals = []
    for rows in runs:
        values = [row[column] for row in rows if math.isfinite(row.get(column, math.nan))]
        if not values:
            return []
        finals.append(values[-1])
    return finals


__all__ = ["Rows", "Group", "first_round_reaching", "megabytes_until", "gamma_over_alpha", "series", "seed_group_summary"]
