"""Summaries and plots of finished runs, computed from their ``metrics.csv`` alone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from flwr_scaling.run.recorder import write_atomic


def first_round_reaching(rows: Sequence[Mapping[str, float]], target: float) -> int | None:
    return next((int(r["round"]) for r in rows if r["test_accuracy"] >= target), None)


def megabytes_until(rows: Sequence[Mapping[str, float]], last_round: int | None = None) -> float:
    """Megabytes sent down and up in rounds 1..last_round (all rounds if ``None``)."""
    chosen = [r for r in rows if last_round is None or r["round"] <= last_round]
    return sum(r["bytes_down"] + r["bytes_up"] for r in chosen) / 1e6


def summary_rows(runs: Mapping[str, Sequence[Mapping[str, float]]], target: float) -> list[dict[str, object]]:
    table = []
    for label, rows in runs.items():
        reached = first_round_reaching(rows, target)
        table.append(
            {
                "run": label,
                "final_accuracy": rows[-1]["test_accuracy"],
                "best_accuracy": max(r["test_accuracy"] for r in rows),
                "rounds": int(rows[-1]["round"]),
                "round_to_target": reached,
                "mb_to_target": megabytes_until(rows, reached) if reached is not None else None,
                "mb_total": megabytes_until(rows),
                "max_gamma_over_alpha": max(r["precond_max"] / r["precond_min"] for r in rows),
            }
        )
    return table


def summary_markdown(runs: Mapping[str, Sequence[Mapping[str, float]]], target: float, lrs: Mapping[str, float]) -> str:
    lines = [
        f"| run | lr | final acc | best acc | first round >= {target:g} | MB to {target:g} | MB total | max Γ/α |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(runs, target):
        reached = "never" if row["round_to_target"] is None else str(row["round_to_target"])
        mb_target = "-" if row["mb_to_target"] is None else f"{row['mb_to_target']:.2f}"
        lines.append(
            f"| {row['run']} | {lrs.get(row['run'], float('nan')):g} | {row['final_accuracy']:.3f} | "
            f"{row['best_accuracy']:.3f} | {reached} | {mb_target} | {row['mb_total']:.2f} | "
            f"{row['max_gamma_over_alpha']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(runs: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str, target: float) -> None:
    """Test accuracy against rounds and against megabytes communicated, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, rows in runs.items():
        rounds = [r["round"] for r in rows]
        accuracy = [r["test_accuracy"] for r in rows]
        cumulative, total = [], 0.0
        for r in rows:
            total += (r["bytes_down"] + r["bytes_up"]) / 1e6
            cumulative.append(total)
        (line,) = by_round.plot(rounds, accuracy, marker="o", markersize=3, label=label)
        by_bytes.plot(cumulative, accuracy, marker="o", markersize=3, color=line.get_color(), label=label)
    for axis, xlabel in ((by_round, "round"), (by_bytes, "MB communicated (down + up)")):
        axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    by_round.set_ylabel("test accuracy")
    low = min(min(r["test_accuracy"] for r in rows) for rows in runs.values())
    by_round.set_ylim(max(0.0, math.floor(low * 10) / 10), 1.0)
    by_round.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_compare_report(
    out: Path, runs: Mapping[str, Sequence[Mapping[str, float]]], lrs: Mapping[str, float], target: float, title: str
) -> None:
    text = f"# {title}\n\n" + summary_markdown(runs, target, lrs)
    write_atomic(out / "summary.md", text)
    plot_accuracy(runs, out / "accuracy.png", title, target)


# ------------------------------------------------------------ seed groups (sweeps)
def seed_group_summary(runs: Sequence[Sequence[Mapping[str, float]]], target: float) -> dict[str, object]:
    """Statistics over runs that differ only in their seed (each a list of ``metrics.csv`` rows).

    Means and sample standard deviations (n - 1; ``None`` for one run) of the
    final and the best test accuracy; rounds and MB to ``target`` averaged
    over the runs that reached it (``None`` if none did) and how many did;
    mean total MB; the largest precond_max / precond_min of any round and run.
    """
    import statistics

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
        "max_gamma_over_alpha": max(_gamma_over_alpha(r) for rows in runs for r in rows),
        # Convex problems (logreg): the optimality gap f(x) - f* after the last round.
        "final_gap_mean": statistics.fmean(gaps) if (gaps := _finals(runs, "f_gap")) else None,
        "final_gap_std": spread(gaps) if gaps else None,
        # Runs with client evaluation: the worst-10 % clients' accuracy at the last evaluated round.
        "final_worst10_mean": statistics.fmean(worst) if (worst := _finals(runs, "client_acc_worst10")) else None,
        "final_worst10_std": spread(worst) if worst else None,
    }


def _finals(runs: Sequence[Sequence[Mapping[str, float]]], column: str) -> list[float]:
    """Each run's last finite value of ``column``; empty unless every run has one."""
    import math

    finals = []
    for rows in runs:
        values = [row[column] for row in rows if math.isfinite(row.get(column, math.nan))]
        if not values:
            return []
        finals.append(values[-1])
    return finals


def _gamma_over_alpha(row: Mapping[str, float]) -> float:
    return row["precond_max"] / row["precond_min"] if row["precond_min"] > 0 else math.inf


def _series(rows: Sequence[Mapping[str, float]], name: str) -> list[float]:
    if name == "mb":  # cumulative megabytes after each round
        total, values = 0.0, []
        for r in rows:
            total += (r["bytes_down"] + r["bytes_up"]) / 1e6
            values.append(total)
        return values
    if name == "gamma_over_alpha":
        return [_gamma_over_alpha(r) for r in rows]
    return [float(r[name]) for r in rows]


def plot_seed_groups(
    groups: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    path: Path,
    *,
    x: str,
    y: str,
    title: str,
    xlabel: str,
    ylabel: str,
    styles: Mapping[str, Mapping[str, object]] | None = None,
    band: str = "std",
    log_y: bool = False,
    target: float | None = None,
) -> None:
    """One line per group (the mean over its runs, round by round) with a band: ±1 sample std
    (``band="std"``, two runs or more) or min..max (``band="range"``). ``x`` and ``y`` are
    metrics.csv columns or ``"mb"`` (cumulative MB) / ``"gamma_over_alpha"``. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    many = len(groups) > 8
    fig, axis = plt.subplots(figsize=(10.5 if many else 8, 5))
    lowest = math.inf
    for label, runs in groups.items():
        length = min(len(rows) for rows in runs)
        xs = np.mean([_series(rows, x)[:length] for rows in runs], axis=0)
        ys = np.array([_series(rows, y)[:length] for rows in runs])
        mean = ys.mean(axis=0)
        style = dict((styles or {}).get(label, {}))
        marker = style.pop("marker", None)
        (line,) = axis.plot(xs, mean, label=f"{label} (n={len(runs)})", linewidth=1.6, marker=marker or "o",
                            markersize=3, **style)
        if band == "range" and len(runs) > 1:
            low, high = ys.min(axis=0), ys.max(axis=0)
        elif band == "std" and len(runs) > 1:
            std = ys.std(axis=0, ddof=1)
            low, high = mean - std, mean + std
        else:
            low = high = mean
        if len(runs) > 1:
            axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        lowest = min(lowest, float(np.min(low)))
    if target is not None:
        axis.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    if log_y:
        axis.set_yscale("log")
    elif y == "test_accuracy" and math.isfinite(lowest):
        axis.set_ylim(max(0.0, math.floor(lowest * 10) / 10), 1.0)
    if x == "round":
        from matplotlib.ticker import MaxNLocator

        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3, which="both" if log_y else "major")
    if many:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        axis.legend(loc="lower right" if y == "test_accuracy" else "best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
