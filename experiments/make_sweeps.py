"""Write the study's sweep files from the tuned step sizes (``experiments/tuning/<problem>.md``).

Four sweeps per problem, each answering questions of ``experiments/REPORT.md``:

- ``<problem>-methods``: Local SGD, four scalings (global), adam and oasis local, and the five
  baselines (questions 1, 2 and 5);
- ``<problem>-heterogeneity``: Dirichlet alpha 0.05 / 0.1 / 0.5 / 1.0 with client evaluation
  (question 3), and ``<problem>-iid`` the same on an iid split;
- ``<problem>-epochs``: 1, 2 and 5 local epochs (question 4).

Every method runs with the step size chosen for it on the validation split; the
sweeps run on the in-process backend (the same ServerApp and ClientApp code
as the simulation engine, without Ray's start-up per run).

    python experiments/make_sweeps.py      # rewrites experiments/sweeps/*.toml
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = [0, 1, 2]
# Rounds are what 2 CPU cores afford for 78 runs per problem (a9a's logreg is near its optimum after
# 10 rounds of one epoch; see the gap column).
PROBLEMS = {  # base options, target accuracy, what it is
    "digits": ({"dataset": "digits", "model": "cnn", "rounds": 20}, 0.9, "digits + CNN (offline default)"),
    "a9a": ({"dataset": "libsvm:../shared/data/a9a/a9a", "test-path": "../shared/data/a9a/a9a.t",
             "model": "logreg", "rounds": 10}, 0.84, "a9a + logistic regression (convex)"),
    "mnist": ({"dataset": "idx:../shared/data/mnist-t10k", "model": "cnn", "rounds": 10}, 0.95,
              "MNIST test set split 8,000 / 2,000 + CNN"),
}
METHODS = ["fedavg", "savic-adagrad-global", "savic-rmsprop-global", "savic-adam-global", "savic-adam-local",
           "savic-oasis-global", "savic-oasis-local", "fedadam", "fedyogi", "fedadagrad", "fedprox", "local-adam"]
ALPHAS = {"digits": [0.05, 0.1, 0.5, 1.0], "mnist": [0.05, 0.1, 0.5, 1.0],
          # a9a has two classes: at alpha 0.05 some of 10 clients get fewer than 10 examples (the
          # partitioner refuses, with a one-line error), and at 0.1 for some seeds, so its most heterogeneous split is 0.2.
          "a9a": [0.2, 0.5, 1.0]}
PAIR = ["fedavg", "savic-adam-local"]  # Local SGD against the scaling the paper recommends


def tuned(problem: str) -> dict[str, str]:
    """``{method: "[method-options.<method>]\\n<option> = <value>..."}``: for each method the value with
    the best mean validation accuracy over every table for the problem: ``tuning/<problem>.md`` and
    any ``tuning/<problem>-*.md`` (wider grids, run where the first grid's best value was at its edge)."""
    scores: dict[str, dict[float, tuple[float, bool]]] = {}
    options: dict[str, tuple[str, str]] = {}  # method -> (option, fixed "lr = x" line or "")
    for path in [HERE / "tuning" / f"{problem}.md", *sorted((HERE / "tuning").glob(f"{problem}-*.md"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if len(cells) != 6 or cells[0] in ("method", "---") or not re.fullmatch(r"[\w-]+", cells[0]):
                continue
            method, option, value, mean = cells[0], cells[1], float(cells[2]), float(cells[3])
            fixed = re.search(r"\(lr ([\d.e-]+)\)", option)
            options[method] = (option.split()[0], f"lr = {fixed.group(1)}" if fixed else "")
            # The table shows 3 decimals; its own "chosen" mark breaks a tie at that precision.
            scores.setdefault(method, {})[value] = (mean, cells[5] == "yes")
    chosen = {}
    for method, by_value in scores.items():
        best = max(by_value, key=lambda v: (*by_value[v], -v))  # then the smaller step
        option, fixed = options[method]
        chosen[method] = "\n".join(filter(None, [f"[method-options.{method}]", f"{option} = {best:g}", fixed]))
    return chosen


def toml_value(value) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value).replace("'", '"')


def sweep(problem: str, kind: str, note: str, grid: dict, extra_base: dict | None = None) -> str:
    base, target, title = PROBLEMS[problem]
    # flwr-scaling tune's [method-options] tables (experiments/run_study.sh writes them), else the old tables.
    included = (HERE / "tuning" / f"{problem}-tuned.toml").is_file()
    options = {} if included else tuned(problem)
    source = f"{problem}-tuned.toml (flwr-scaling tune)" if included else f"{problem}.md"
    lines = [f"# {title}: {note}", "# Written by experiments/make_sweeps.py from experiments/tuning/"
             f"{source} (step sizes chosen on a validation split).",
             f'out = "experiments/results/{problem}-{kind}"', f"target-accuracy = {target}", 'backend = "inprocess"',
             *([f'include = "../tuning/{problem}-tuned.toml"'] if included else []),
             "", "[base]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in {**base, **(extra_base or {})}.items()]
    lines.append("")
    for method in grid["method"] if options else []:
        lines += [options[method], ""]
    lines.append("[grid]")
    for key, values in grid.items():
        lines.append(f"{key} = [{', '.join(toml_value(v) for v in values)}]")
    return "\n".join(lines) + "\n"


def main() -> None:
    folder = HERE / "sweeps"
    for problem in PROBLEMS:
        if not any((HERE / "tuning" / name).is_file() for name in (f"{problem}.md", f"{problem}-tuned.toml")):
            print(f"skipped {problem}: run experiments/tune.py {problem} first")
            continue
        files = {
            "methods": sweep(problem, "methods", "Local SGD, SAVIC scalings (global and local) and baselines "
                             "(questions 1, 2, 5)", {"method": METHODS, "seed": SEEDS}),
            "heterogeneity": sweep(problem, "heterogeneity", "Dirichlet concentration, with client evaluation "
                                   "(question 3)", {"method": PAIR, "dirichlet-alpha": ALPHAS[problem],
                                                    "seed": SEEDS}, {"client-eval-every": 5}),
            "iid": sweep(problem, "iid", "iid split, with client evaluation (question 3)",
                         {"method": PAIR, "seed": SEEDS}, {"partitioner": "iid", "client-eval-every": 5}),
            "epochs": sweep(problem, "epochs", "local epochs per round (question 4)",
                            {"method": PAIR, "local-epochs": [1, 2, 5], "seed": SEEDS}),
        }
        for kind, text in files.items():
            (folder / f"{problem}-{kind}.toml").write_text(text, encoding="utf-8")
            print(f"wrote {folder / f'{problem}-{kind}.toml'}")


if __name__ == "__main__":
    main()
