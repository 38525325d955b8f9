"""Summaries and plots of finished runs, computed from their ``metrics.csv`` alone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .recorder import write_atomic


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
