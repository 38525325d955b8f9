"""Plots of finished runs (matplotlib, written atomically): ``compare``'s accuracy figure and a sweep's figures.

``compare`` draws one line per run in a two-panel figure (``plot_accuracy``); a
sweep draws one line per group of seeds, the mean with a band, in one figure per
quantity (``plot_sweep``). Both read only metrics.csv rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr_scaling.studies.outcomes import Group, Rows, series


def plot_accuracy(runs: Mapping[str, Rows], path: Path, title: str, target: float) -> None:
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


def line_styles(groups: Sequence[Group], first_values: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Colour by the first grid key (the method, if swept; ``first_values`` are its values), line style
    and marker by the other keys, so that groups sharing a method share a colour."""
    import matplotlib

    if not first_values:
        return {g.label: {"color": "C0", "linestyle": "-"} for g in groups}
    palette = matplotlib.colormaps["tab10" if len(first_values) <= 10 else "tab20"]
    colours = {json.dumps(v): palette(i % palette.N) for i, v in enumerate(first_values)}
    rest = [tuple(g.values[1:]) for g in groups]
    combos = list(dict.fromkeys(rest))
    dashes = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*"]
    styles = {}
    for group, other in zip(groups, rest):
        i = combos.index(other)
        styles[group.label] = {
            "color": colours[json.dumps(group.values[0])],
            "linestyle": dashes[i % len(dashes)],
            "marker": markers[(i // len(dashes)) % len(markers)],
        }
    return styles


def plot_sweep(out: Path, name: str, groups: Sequence[Group], first_values: Sequence[Any], target: float,
               context: str) -> None:
    """A sweep's figures in ``out``: accuracy by round and by MB, Γ/α, and, when the runs have them, the
    optimality gap and the worst clients' accuracy (a stale one of these two is removed)."""
    curves = {group.label: group.runs for group in groups}
    styles = line_styles(groups, first_values)
    seeds = sorted({seed for group in groups for seed in group.seeds})
    subtitle = f"{context}" if context else ""
    over = f"mean ± std over seeds ({', '.join(map(str, seeds))})"
    plot_seed_groups(curves, out / "accuracy.png", x="round", y="test_accuracy", styles=styles,
                     title=f"{name}: test accuracy, {over}\n{subtitle}".rstrip(),
                     xlabel="round", ylabel="test accuracy", target=target)
    plot_seed_groups(curves, out / "accuracy_vs_mb.png", x="mb", y="test_accuracy", styles=styles,
                     title=f"{name}: test accuracy against communication, {over}\n{subtitle}".rstrip(),
                     xlabel="MB communicated (down + up, cumulative)", ylabel="test accuracy", target=target)
    plot_seed_groups(curves, out / "gamma_over_alpha.png", x="round", y="gamma_over_alpha", styles=styles,
                     band="range", log_y=True,
                     title=f"{name}: preconditioner spread Γ/α = max D̂ / min D̂, mean and min–max over seeds"
                           f"\n{subtitle}".rstrip(),
                     xlabel="round", ylabel="precond_max / precond_min (log scale)")
    gap = out / "optimality_gap.png"
    if _any_finite(curves, "f_gap"):
        plot_seed_groups(curves, gap, x="round", y="f_gap", styles=styles, log_y=True,
                         title=f"{name}: optimality gap f(x) − f* of the convex objective, {over}\n{subtitle}".rstrip(),
                         xlabel="round", ylabel="f(x) − f* (log scale)")
    else:
        gap.unlink(missing_ok=True)
    worst = out / "client_worst10.png"
    if _any_finite(curves, "client_acc_worst10"):
        # Heterogeneity hurts the worst clients first: runs with --client-eval-every get this plot.
        plot_seed_groups(curves, worst, x="round", y="client_acc_worst10", styles=styles,
                         title=f"{name}: mean accuracy of the worst 10 % of clients, {over}\n{subtitle}".rstrip(),
                         xlabel="round", ylabel="worst-10 % client accuracy (own held-out data)")
    else:
        worst.unlink(missing_ok=True)


def _any_finite(curves: Mapping[str, Sequence[Rows]], column: str) -> bool:
    """Some round of some run has a finite ``column`` (blank cells read as NaN)."""
    return any(math.isfinite(row.get(column, math.nan)) for runs in curves.values() for rows in runs for row in rows)


def plot_seed_groups(
    groups: Mapping[str, Sequence[Rows]],
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
        xs = np.mean([series(rows, x)[:length] for rows in runs], axis=0)
        ys = np.array([series(rows, y)[:length] for rows in runs])
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


__all__ = ["plot_accuracy", "plot_seed_groups", "plot_sweep", "line_styles"]
