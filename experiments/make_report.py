"""Build ``experiments/REPORT.md`` from the study's sweep results (reads files only; runs nothing).

    python experiments/make_report.py

Reads ``experiments/results/<problem>-<sweep>/summary.csv`` (written by
``flwr-scaling sweep`` / ``flwr-scaling report``) and the run times in each
run's ``DONE`` record, and writes one table per question and problem. The
findings at the top come from ``experiments/findings.md`` (written by hand
from these tables). A difference is called "within noise" when it is smaller
than the two methods' seed standard deviations combined (sqrt(s1² + s2²)).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROBLEMS = {"digits": "digits + CNN", "a9a": "a9a + logistic regression", "mnist": "MNIST 8k/2k + CNN"}
SCALINGS = ["savic-adagrad-global", "savic-rmsprop-global", "savic-adam-global", "savic-oasis-global"]
MODES = [("savic-adam-global", "savic-adam-local"), ("savic-oasis-global", "savic-oasis-local")]
BASELINES = ["fedadam", "fedyogi", "fedadagrad", "fedprox", "local-adam"]


def load(problem: str, sweep: str) -> list[dict[str, str]] | None:
    path = RESULTS / f"{problem}-{sweep}" / "summary.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def number(row: dict[str, str], key: str) -> float | None:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def pm(row: dict[str, str], key: str, digits: int = 3) -> str:
    mean, std = number(row, f"{key}_mean"), number(row, f"{key}_std")
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def rounds(row: dict[str, str]) -> str:
    mean = number(row, "rounds_to_target_mean")
    return f"{mean:.1f} ({row['reached_target']}/{row['n_seeds']})" if mean is not None else f"never (0/{row['n_seeds']})"


def mb(row: dict[str, str]) -> str:
    mean = number(row, "mb_to_target_mean")
    return "-" if mean is None else f"{mean:.2f}"


def verdict(row: dict[str, str], reference: dict[str, str], key: str = "final_accuracy") -> str:
    """Difference in ``key`` to ``reference``, in points, and whether it exceeds the seed noise."""
    a, b = number(row, f"{key}_mean"), number(reference, f"{key}_mean")
    noise = math.hypot(number(row, f"{key}_std") or 0.0, number(reference, f"{key}_std") or 0.0)
    delta = a - b
    word = "within noise" if abs(delta) <= noise else ("better" if delta > 0 else "worse")
    return f"{100 * delta:+.1f} pts ({word})"


def by(rows: list[dict[str, str]], **match) -> dict[str, str] | None:
    for row in rows:
        if all(row.get(k) == str(v) for k, v in match.items()):
            return row
    return None


def gap_column(rows: list[dict[str, str]]) -> bool:
    return any(number(r, "final_gap_mean") is not None for r in rows)


def step_sizes(problem: str, sweep: str) -> dict[str, str]:
    """``{method: "γ 0.3"}`` (and ``", η 0.1"`` for the server optimizers) from the sweep's run configs."""
    spec = json.loads((RESULTS / f"{problem}-{sweep}" / "sweep.json").read_text(encoding="utf-8"))
    sizes = {}
    for run in spec["runs"]:
        config, method = run["config"], run["values"]["method"]
        server = f", η {config['server-lr']:g}" if config["strategy"] in ("fedadam", "fedyogi", "fedadagrad") else ""
        sizes[method] = f"γ {config['lr']:g}{server}"
    return sizes


def method_table(rows: list[dict[str, str]], methods: list[str], reference: str, target: str,
                 sizes: dict[str, str]) -> list[str]:
    gap = gap_column(rows)
    head = ["method", "step sizes", "final test acc", f"vs {reference}", f"rounds to {target}", f"MB to {target}", "MB total"]
    head += ["final f − f*"] if gap else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = by(rows, method=reference)
    for method in methods:
        row = by(rows, method=method)
        if row is None:
            continue
        cells = [method, sizes.get(method, row["lr"]), pm(row, "final_accuracy"), "-" if method == reference else verdict(row, ref),
                 rounds(row), mb(row), f"{float(row['mb_total_mean']):.2f}"]
        if gap:
            cells.append(pm(row, "final_gap", 4))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_of(problem: str, sweep: str) -> str:
    spec = json.loads((RESULTS / f"{problem}-{sweep}" / "sweep.json").read_text(encoding="utf-8"))
    return f"{spec['target-accuracy']:g}"


def study_seconds() -> tuple[float, int]:
    total, count = 0.0, 0
    for done in RESULTS.glob("*/runs/*/DONE"):
        total += float(json.loads(done.read_text(encoding="utf-8")).get("seconds", 0.0))
        count += 1
    return total, count


def tuning_seconds() -> float:
    """The tuning tables' own "Took N s" lines, summed."""
    total = 0.0
    for path in (HERE / "tuning").glob("*.md"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("Took ") and line.endswith(" s on this machine."):
                total += float(line.split()[1])
    return total


def section_methods(problem: str, out: list[str]) -> None:
    rows = load(problem, "methods")
    if rows is None:
        out.append(f"*{problem}: not run yet.*\n")
        return
    target = target_of(problem, "methods")
    sizes = step_sizes(problem, "methods")
    out += [f"#### {PROBLEMS[problem]}", "", "Question 1 (scaling vs Local SGD):", ""]
    out += method_table(rows, ["fedavg", *SCALINGS], "fedavg", target, sizes)
    out += ["", "Question 2 (global vs local scaling):", ""]
    head = ["rule", "global: final acc", "local: final acc", "local vs global", f"rounds to {target} (global / local)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for global_label, local_label in MODES:
        g, l = by(rows, method=global_label), by(rows, method=local_label)
        if g and l:
            out.append(f"| {global_label.split('-')[1]} | {pm(g, 'final_accuracy')} | {pm(l, 'final_accuracy')} | "
                       f"{verdict(l, g)} | {rounds(g)} / {rounds(l)} |")
    candidates = [by(rows, method=m) for m in [*SCALINGS, "savic-adam-local", "savic-oasis-local"] if by(rows, method=m)]
    if not candidates:
        out += ["", "*No SAVIC run finished yet.*", ""]
        return
    best = max(candidates, key=lambda r: float(r["final_accuracy_mean"]))
    out += ["", f"Question 5 (baselines; against Local SGD and against the best SAVIC variant here, "
                f"{best['method']}):", ""]
    out += method_table(rows, ["fedavg", best["method"], *BASELINES], best["method"], target, sizes)
    out += ["", f"Figures: [accuracy](results/{problem}-methods/accuracy.png), "
                f"[accuracy vs MB](results/{problem}-methods/accuracy_vs_mb.png), "
                f"[Γ/α](results/{problem}-methods/gamma_over_alpha.png)"
            + (f", [f − f*](results/{problem}-methods/optimality_gap.png)" if gap_column(rows) else ""), ""]


def section_heterogeneity(problem: str, out: list[str]) -> None:
    rows, iid = load(problem, "heterogeneity"), load(problem, "iid")
    if rows is None:
        out.append(f"*{problem}: not run yet.*\n")
        return
    out += [f"#### {PROBLEMS[problem]}", ""]
    head = ["split", "fedavg final acc", "adam-local final acc", "adam-local vs fedavg",
            "fedavg worst-10 % clients", "adam-local worst-10 % clients"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    alphas = sorted({row["dirichlet-alpha"] for row in rows}, key=float)
    splits = [(f"Dirichlet {alpha}", rows, {"dirichlet-alpha": alpha}) for alpha in alphas]
    splits += [("iid", iid, {})] if iid else []
    for name, table, match in splits:
        f, s = by(table, method="fedavg", **match), by(table, method="savic-adam-local", **match)
        if f and s:
            out.append(f"| {name} | {pm(f, 'final_accuracy')} | {pm(s, 'final_accuracy')} | {verdict(s, f)} | "
                       f"{pm(f, 'final_worst10')} | {pm(s, 'final_worst10')} |")
    smaller = load(problem, "fedavg-smaller-step")
    if smaller:
        out += ["", "Local SGD with the runner-up step size of its grid (γ 0.3 instead of 1; "
                    f"`experiments/sweeps/{problem}-fedavg-smaller-step.toml`):", "",
                "| split | fedavg γ 0.3 final acc | fedavg γ 0.3 worst-10 % clients |", "|---|---|---|"]
        for row in sorted(smaller, key=lambda r: float(r["dirichlet-alpha"])):
            out.append(f"| Dirichlet {row['dirichlet-alpha']} | {pm(row, 'final_accuracy')} | {pm(row, 'final_worst10')} |")
    out += ["", f"Figures: [accuracy](results/{problem}-heterogeneity/accuracy.png), "
                f"[worst-10 % clients](results/{problem}-heterogeneity/client_worst10.png), "
                f"partitions in [results/{problem}-heterogeneity/partitions/](results/{problem}-heterogeneity/partitions/)",
            ""]


def section_epochs(problem: str, out: list[str]) -> None:
    rows = load(problem, "epochs")
    if rows is None:
        out.append(f"*{problem}: not run yet.*\n")
        return
    target = target_of(problem, "epochs")
    out += [f"#### {PROBLEMS[problem]}", ""]
    gap = gap_column(rows)
    head = ["local epochs", "method", "final acc", f"rounds to {target}", f"MB to {target}"] + (["final f − f*"] if gap else [])
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for epochs in ("1", "2", "5"):
        for method in ("fedavg", "savic-adam-local"):
            row = by(rows, method=method, **{"local-epochs": epochs})
            if row:
                extra = f" {pm(row, 'final_gap', 4)} |" if gap else ""
                out.append(f"| {epochs} | {method} | {pm(row, 'final_accuracy')} | {rounds(row)} | {mb(row)} |{extra}")
    smaller = load(problem, "fedavg-smaller-step-epochs")
    if smaller:
        out += ["", "Local SGD with the runner-up step size of its grid (γ 0.3 instead of 1; "
                    f"`experiments/sweeps/{problem}-fedavg-smaller-step-epochs.toml`):", "",
                "| local epochs | fedavg γ 0.3 final acc | rounds to target | MB to target |", "|---|---|---|---|"]
        for row in sorted(smaller, key=lambda r: int(r["local-epochs"])):
            out.append(f"| {row['local-epochs']} | {pm(row, 'final_accuracy')} | {rounds(row)} | {mb(row)} |")
    out += ["", f"Figures: [accuracy](results/{problem}-epochs/accuracy.png), "
                f"[accuracy vs MB](results/{problem}-epochs/accuracy_vs_mb.png)", ""]


def main() -> None:
    seconds, runs = study_seconds()
    tuning = tuning_seconds()
    findings = HERE / "findings.md"
    out = ["# Study: scaled Local SGD (SAVIC) against Local SGD and adaptive baselines", ""]
    out += [findings.read_text(encoding="utf-8").strip(), ""] if findings.is_file() else []
    out += [
        "## How it was run", "",
        "```bash",
        "experiments/run_study.sh     # everything below, skipping what is done",
        "python experiments/tune.py digits --seeds 0 --rounds 20   # step sizes on a validation split",
        "python experiments/tune.py a9a --seeds 0 --rounds 10      # (wider grids: tuning/*-wider*.md, their own commands)",
        "python experiments/tune.py mnist --seeds 0 --rounds 8",
        "python experiments/make_sweeps.py                         # sweep files with the chosen step sizes",
        "for f in experiments/sweeps/*.toml; do flwr-scaling sweep $f; done",
        "python experiments/make_report.py                         # this file",
        "```", "",
        f"{runs} runs, {seconds / 60:.0f} minutes of run time in all (sum of the runs' own times), plus "
        f"{tuning / 60:.0f} minutes of step-size tuning, on the 2-core development machine with one torch thread "
        "per run and up to eight sweeps at once beside other jobs (load average 5-10): each run's time "
        "includes waiting for the cores, so a quiet machine needs less. "
        "Every number is a mean ± sample standard deviation over 3 seeds (0, 1, 2), test accuracy of the "
        "server's model after the last round; step sizes are in `experiments/tuning/` and were chosen on a "
        "validation split carved from the training data, never on the test set.", "",
        "## Questions 1, 2 and 5: methods", "",
    ]
    for problem in PROBLEMS:
        section_methods(problem, out)
    out += ["## Question 3: heterogeneity", ""]
    for problem in PROBLEMS:
        section_heterogeneity(problem, out)
    out += ["## Question 4: local work", ""]
    for problem in PROBLEMS:
        section_epochs(problem, out)
    (HERE / "REPORT.md").write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'REPORT.md'}")


if __name__ == "__main__":
    main()
