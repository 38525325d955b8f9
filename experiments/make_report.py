"""Build ``experiments/REPORT.md`` from the study's committed results (reads files only; runs nothing).

    python experiments/make_report.py

Reads every sweep's ``experiments/results/<sweep>/results.csv`` (one row per
run and round, written by ``flwr-scaling sweep``) and ``sweep.json``, the
tuned step sizes in ``experiments/tuning/<setting>-tuned.toml`` and the
tuning scores in ``experiments/tuning/<setting>/tune/tuning.md``, and the
wall times in ``experiments/results/timings.csv`` (one line per study step,
written by ``experiments/run_study.sh``). The findings at the top come from
``experiments/findings.md``, written by hand from these tables.

Statistics (``flwr_scaling.studies.statistics``): rounds and MB to a target
are medians over **all** seeds, a seed that never reached the target counting
as more than the horizon (with how many seeds reached it); a comparison
between two methods is the mean of their per-seed differences (same seed:
same split, partition and initial model) with a percentile bootstrap 95 %
interval, and "better"/"worse" only when that interval excludes 0.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tomllib
from pathlib import Path

from flwr_scaling.studies.statistics import honest_summary, paired_comparison, tuning_score

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TUNING = HERE / "tuning"
PROBLEMS = {"digits": "digits + CNN, 10 clients", "a9a": "a9a + logistic regression, 10 clients"}
PARTIAL = "mnist-partial"
PARTIAL_TITLE = "MNIST 8k/2k + CNN, 100 clients, 10 per round, 50 rounds"
SETTINGS = ("digits", "digits-server-step", "a9a", "a9a-server-step", PARTIAL, f"{PARTIAL}-server-step")  # tuned
SCALINGS = ["savic-adagrad-global", "savic-rmsprop-global", "savic-adam-global", "savic-oasis-global"]
MODES = [("savic-adam-local", "savic-adam-global"), ("savic-oasis-local", "savic-oasis-global")]
BASELINES = ["fedadam", "fedyogi", "fedadagrad", "fedprox", "local-adam"]
SAVIC = "savic-adam-local"
SERVER_STEP = "savic-adam-local + server step"  # the label of the server-step sweep's runs in the tables
NUMERIC = ("round", "test_accuracy", "bytes_down", "bytes_up", "client_acc_worst10", "f_gap")

Runs = dict[int, list[dict[str, float]]]  # seed -> that run's rows, in round order


# ------------------------------------------------------------------ reading
def sweep_runs(name: str) -> tuple[dict[tuple, Runs], dict] | None:
    """``{(method, setting...): {seed: rows}}`` and the sweep's ``sweep.json``, or None when not run."""
    folder = RESULTS / name
    if not (folder / "results.csv").is_file():
        return None
    spec = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    settings = [key for key in spec["grid"] if key not in ("method", "seed")]
    runs: dict[tuple, Runs] = {}
    with open(folder / "results.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = (row["method"], *(float(row[s]) for s in settings))
            values = {k: float(row[k]) if row.get(k) not in (None, "") else math.nan for k in NUMERIC}
            runs.setdefault(key, {}).setdefault(int(row["seed"]), []).append(values)
    for by_seed in runs.values():
        for rows in by_seed.values():
            rows.sort(key=lambda r: r["round"])
    return runs, spec


def target_for(spec: dict, alpha: float | None = None) -> float:
    target = spec["target-accuracy"]
    if not isinstance(target, dict):
        return float(target)
    for key, value in target.items():
        if key != "default" and alpha is not None and math.isclose(float(key), alpha):
            return float(value)
    return float(target.get("default", 0.9))


# ------------------------------------------------------------------ measures
def final(rows: list[dict[str, float]], key: str = "test_accuracy") -> float:
    return rows[-1][key]


def last_value(rows: list[dict[str, float]], key: str) -> float:
    """The last round's finite ``key`` (client evaluation runs every few rounds), or NaN."""
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return values[-1] if values else math.nan


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def median_mb(middle: float) -> str:
    return "never" if math.isinf(middle) else f"{middle:.2f}"


def paired(method: str, runs: Runs, baseline: str, base: Runs, measure) -> str:
    """``+0.012 [+0.004, +0.020] better`` for ``method`` minus ``baseline``, seed by seed."""
    comparison = paired_comparison(method, {s: measure(r) for s, r in runs.items()}, baseline,
                                   {s: measure(r) for s, r in base.items()})
    return f"{comparison.text()} {comparison.verdict}"


# ------------------------------------------------------------------ tables
def summary_table(entries: list[tuple[str, Runs]], target: float, *, gap: bool = False,
                  worst: bool = False) -> list[str]:
    """One row per method: final acc, mean acc over rounds, rounds and MB to target (medians), optional columns."""
    head = ["method", "seeds", "final acc", "mean acc over rounds", f"rounds to {target:g}", f"MB to {target:g}",
            "MB total"]
    head += ["final f − f*"] if gap else []
    head += ["worst-10 % clients (last eval)"] if worst else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in entries:
        rows = list(runs.values())
        honest = honest_summary(rows, target)  # the sweeps' own summary: tuning score, medians over all seeds
        score = f"{honest['tuning_score_mean']:.3f}" + (
            "" if honest["tuning_score_std"] is None else f" ± {honest['tuning_score_std']:.3f}")
        cells = [label, str(len(rows)), mean_std([final(r) for r in rows]), score, honest["reach_text"],
                 median_mb(honest["mb_to_target_median"]),
                 f"{statistics.fmean(sum(x['bytes_down'] + x['bytes_up'] for x in r) / 1e6 for r in rows):.2f}"]
        cells += [mean_std([final(r, "f_gap") for r in rows], 4)] if gap else []
        cells += [mean_std([last_value(r, "client_acc_worst10") for r in rows])] if worst else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_table(pairs: list[tuple[str, str, Runs, str, Runs]]) -> list[str]:
    """Paired differences: ``(setting, method, runs, baseline, baseline runs)`` per row."""
    lines = ["| setting | method − baseline | pairs | final acc: mean diff [95 % CI] | "
             "mean acc over rounds: mean diff [95 % CI] |", "|---|---|---|---|---|"]
    for setting, method, runs, baseline, base in pairs:
        both = len(set(runs) & set(base))
        lines.append(f"| {setting} | {method} − {baseline} | {both} | "
                     f"{paired(method, runs, baseline, base, final)} | "
                     f"{paired(method, runs, baseline, base, tuning_score)} |")
    return lines


def links(name: str) -> str:
    return (f"Per-round curves: [accuracy](results/{name}/accuracy.png), [accuracy against MB]"
            f"(results/{name}/accuracy_vs_mb.png); every run: [summary](results/{name}/summary.md).")


# ------------------------------------------------------------------ sections
def section_methods(problem: str, out: list[str]) -> None:
    loaded = sweep_runs(f"{problem}-methods")
    out += [f"### {PROBLEMS[problem]}", ""]
    if loaded is None:
        out += ["*Not run yet.*", ""]
        return
    runs, spec = loaded
    target = target_for(spec)
    by_method = {key[0]: value for key, value in runs.items()}
    order = ["fedavg", *SCALINGS, *[m for m, _ in MODES], *BASELINES]
    out += summary_table([(m, by_method[m]) for m in order if m in by_method], target, gap=problem == "a9a")
    out += ["", links(f"{problem}-methods"), "",
            "Question 1, each scaling against Local SGD (fedavg):", ""]
    out += comparison_table([("Dirichlet 0.5", m, by_method[m], "fedavg", by_method["fedavg"])
                             for m in [*SCALINGS, *[m for m, _ in MODES]] if m in by_method])
    out += ["", "Question 2, local against global scaling:", ""]
    out += comparison_table([("Dirichlet 0.5", local, by_method[local], glob, by_method[glob])
                             for local, glob in MODES if local in by_method and glob in by_method])
    out += ["", "Question 5, SAVIC adam-local against each baseline:", ""]
    out += comparison_table([("Dirichlet 0.5", SAVIC, by_method[SAVIC], b, by_method[b])
                             for b in BASELINES if b in by_method and SAVIC in by_method])
    out.append("")


def section_heterogeneity(problem: str, out: list[str]) -> None:
    out += [f"### {PROBLEMS[problem]}", ""]
    loaded, iid = sweep_runs(f"{problem}-heterogeneity"), sweep_runs(f"{problem}-iid")
    if loaded is None:
        out += ["*Not run yet.*", ""]
        return
    runs, spec = loaded
    settings: dict[str, dict[str, Runs]] = {}
    for (method, alpha), by_seed in sorted(runs.items(), key=lambda item: item[0][1]):
        settings.setdefault(f"Dirichlet {alpha:g}", {})[method] = by_seed
    targets = {f"Dirichlet {alpha:g}": target_for(spec, alpha) for _, alpha in runs}
    if iid is not None:
        settings["iid"] = {key[0]: value for key, value in iid[0].items()}
        targets["iid"] = target_for(iid[1])
    pairs = []
    for setting, methods in settings.items():
        out += [f"**{setting}**", ""]
        out += summary_table(list(methods.items()), targets[setting], worst=True)
        out.append("")
        for baseline in ("fedavg", "fedyogi"):
            if SAVIC in methods and baseline in methods:
                pairs.append((setting, SAVIC, methods[SAVIC], baseline, methods[baseline]))
    out += [links(f"{problem}-heterogeneity"), "", "SAVIC adam-local against Local SGD and FedYogi, per split:", ""]
    out += comparison_table(pairs)
    out.append("")


def section_epochs(problem: str, out: list[str]) -> None:
    out += [f"### {PROBLEMS[problem]}", ""]
    loaded = sweep_runs(f"{problem}-epochs")
    if loaded is None:
        out += ["*Not run yet.*", ""]
        return
    runs, spec = loaded
    target = target_for(spec)
    by_epochs: dict[int, dict[str, Runs]] = {}
    for (method, epochs), by_seed in runs.items():
        by_epochs.setdefault(int(epochs), {})[method] = by_seed
    pairs = []
    for epochs in sorted(by_epochs):
        out += [f"**{epochs} local epoch{'s' if epochs > 1 else ''}**", ""]
        out += summary_table(list(by_epochs[epochs].items()), target, gap=problem == "a9a")
        out.append("")
        methods = by_epochs[epochs]
        if SAVIC in methods and "fedavg" in methods:
            setting = f"{epochs} epoch{'s' if epochs > 1 else ''}"
            pairs.append((setting, SAVIC, methods[SAVIC], "fedavg", methods["fedavg"]))
    out += [links(f"{problem}-epochs"), ""]
    out += comparison_table(pairs)
    out.append("")


def section_server_step(problem: str, out: list[str]) -> None:
    server_step_table(f"{problem}-server-step", f"{problem}-methods", PROBLEMS[problem], "Dirichlet 0.5", out)


def server_step_table(step_sweep: str, methods_sweep: str, title: str, setting: str, out: list[str]) -> None:
    """Question 6: ``step_sweep``'s SAVIC with its tuned server step against SAVIC and FedYogi of ``methods_sweep``."""
    out += [f"### {title}", ""]
    step, methods = sweep_runs(step_sweep), sweep_runs(methods_sweep)
    if step is None or methods is None:
        out += ["*Not run yet.*", ""]
        return
    by_method = {key[0]: value for key, value in methods[0].items()}
    with_step = next(iter(step[0].values()))
    options = tuned_options(step_sweep).get(SAVIC, {})
    out += [f"Tuned jointly on the validation split: {describe(options)}.", ""]
    entries = [(SERVER_STEP, with_step),
               *[(m, by_method[m]) for m in (SAVIC, "fedyogi", "local-adam", "fedavg") if m in by_method]]
    out += summary_table(entries, target_for(methods[1]), gap="a9a" in step_sweep)
    out += ["", links(step_sweep), ""]
    out += comparison_table([(setting, SERVER_STEP, with_step, other, by_method[other])
                             for other in (SAVIC, "fedyogi", "local-adam") if other in by_method])
    out.append("")


def section_partial(out: list[str]) -> None:
    out += [f"### {PARTIAL_TITLE}", ""]
    loaded = sweep_runs(PARTIAL)
    if loaded is None:
        out += ["*Not run yet.*", ""]
        return
    runs, spec = loaded
    by_method = {key[0]: value for key, value in runs.items()}
    out += summary_table(list(by_method.items()), target_for(spec))
    out += ["", links(PARTIAL), ""]
    pairs = [("100 clients, 10/round", m, by_method[m], "fedavg", by_method["fedavg"])
             for m in by_method if m != "fedavg"]
    pairs += [("100 clients, 10/round", SAVIC, by_method[SAVIC], b, by_method[b])
              for b in ("savic-adam-global", "fedyogi", "local-adam") if b in by_method and SAVIC in by_method]
    out += comparison_table(pairs)
    out.append("")


# ------------------------------------------------------------------ tuning and timings
def tuned_options(setting: str) -> dict[str, dict]:
    path = TUNING / f"{setting}-tuned.toml"
    if not path.is_file():
        return {}
    return tomllib.loads(path.read_text(encoding="utf-8")).get("method-options", {})


def describe(options: dict) -> str:
    return ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in options.items()) or "package defaults"


def section_tuning(out: list[str]) -> None:
    out += ["| setting | method | chosen on the validation split |", "|---|---|---|"]
    for setting in SETTINGS:
        for method, options in tuned_options(setting).items():
            out.append(f"| {setting} | {method} | {describe(options)} |")
    out += ["", "Every grid point's score (mean validation accuracy over rounds, averaged over the tuning seeds): "
            + ", ".join(f"[{s}](tuning/{s}/tune/tuning.md)" for s in SETTINGS) + ".", ""]


def timings() -> list[str]:
    path = RESULTS / "timings.csv"
    if not path.is_file():
        return ["(No `results/timings.csv`: the study's wall time was not recorded.)"]
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    tuning = sum(float(r["seconds"]) for r in rows if r["step"].startswith("tune "))
    sweeps = sum(float(r["seconds"]) for r in rows if r["step"].startswith("sweep "))
    runs = sum(len(json.loads(spec.read_text(encoding="utf-8"))["runs"]) for spec in RESULTS.glob("*/sweep.json"))
    return [f"Wall time of the whole study on the 2-core development machine, 2 runs at a time (`--workers 2`): "
            f"**{(tuning + sweeps) / 60:.0f} minutes** ({tuning / 60:.0f} min tuning, {sweeps / 60:.0f} min for the "
            f"{runs} runs of the sweeps; per step in [results/timings.csv](results/timings.csv))."]


def main() -> None:
    findings = HERE / "findings.md"
    out = ["# Study: scaled Local SGD (SAVIC) against Local SGD and fairly tuned baselines", ""]
    out += [findings.read_text(encoding="utf-8").strip(), ""] if findings.is_file() else []
    out += [
        "## How it was run", "",
        "```bash",
        "flwr-scaling data all --out ../shared/data   # a9a and MNIST, SHA256-checked (digits comes with scikit-learn)",
        "experiments/run_study.sh                        # everything below, skipping what is done",
        "```", "",
        "`run_study.sh` tunes every method with `flwr-scaling tune experiments/tuning/<setting>.toml` (joint grids "
        "on a validation split carved from the training data, widened when the best value sits on an edge; the test "
        "split is never read), writes the sweep files (`experiments/make_sweeps.py`, which include the tuned "
        "`[method-options]`), runs them with `flwr-scaling sweep --workers 2` on the in-process backend (the real "
        "ServerApp and ClientApp with Flower's message serialisation), and writes this file "
        "(`experiments/make_report.py`, from the committed `results/*/results.csv`).", "",
        *timings(), "",
        "Seeds 0-4 for every table (the seed fixes the split, the partition, the initial model and the batch order, "
        "so each method meets the same five federations). Accuracy is the server model's test accuracy. "
        "\"Mean acc over rounds\" is the tuning score (it rewards speed and the final value). Rounds and MB to the "
        "target are medians over all five seeds, a seed that never reached the target counting as more than the "
        "horizon (\"> 20 (2/5)\": the median seed never got there, 2 of 5 did). Comparisons are paired: the mean of "
        "the per-seed differences with a percentile bootstrap 95 % interval (10,000 resamples); \"better\"/\"worse\" "
        "only when the interval excludes 0, else \"no clear difference\". With 5 seeds the interval is coarse, so a "
        "small real difference can read as no clear difference.", "",
        "## Tuned step sizes", "",
    ]
    section_tuning(out)
    per_problem = [
        ("Questions 1, 2 and 5: methods (Dirichlet 0.5, all 10 clients every round)", [], section_methods),
        ("Question 3: heterogeneity", [
            "Step sizes tuned at Dirichlet 0.5 and held fixed across splits (the same for every method). "
            "Worst-10 % clients: the mean accuracy of the worst tenth of clients on their own test data, at the "
            "last client evaluation (every 5 rounds). With client evaluation each client holds out 20 % of its "
            "partition and trains on the rest, so the Dirichlet 0.5 rows here differ from the methods tables.", ""],
         section_heterogeneity),
        ("Question 4: local work", [], section_epochs),
        ("Question 6: a server step on top of SAVIC", [
            "SAVIC adam-local with a server step size η and heavy-ball server momentum μ (`--server-lr`, "
            "`--server-momentum`: m ← μ m + (mean x_m − x), x ← x + η m), its client step, η and μ tuned jointly "
            "(`experiments/tuning/<problem>-server-step.toml`), against SAVIC at η = 1, the jointly tuned "
            "FedYogi and local Adam (same seeds, from the methods sweep).", ""], section_server_step),
    ]
    for title, intro, section in per_problem:
        out += [f"## {title}", "", *intro]
        for problem in PROBLEMS:
            section(problem, out)
    out += ["## Partial participation (questions 1 and 5 in the realistic setting)", "",
            "100 clients (Dirichlet 0.5 over the 8,000 training images of the MNIST test set), 10 sampled per round, "
            "50 rounds; step sizes tuned for this setting (`experiments/tuning/mnist-partial.toml`: one seed, "
            "25 rounds, the same budget for every method).", ""]
    section_partial(out)
    server_step_table(f"{PARTIAL}-server-step", PARTIAL, f"{PARTIAL_TITLE}: question 6", "100 clients, 10/round", out)
    (HERE / "REPORT.md").write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'REPORT.md'}")


if __name__ == "__main__":
    main()
