"""Write the study's sweep files (``experiments/sweeps/*.toml``) around the tuned step sizes.

Every sweep reads its step sizes from the ``[method-options]`` tables that
``flwr-scaling tune`` wrote (``experiments/tuning/<setting>-tuned.toml``,
chosen on a validation split; ``include =``), so no step size is typed here.
Two settings of 10 clients, all trained every round:

- ``<problem>-methods``: Local SGD, four scalings (global), adam and oasis local,
  and the five baselines (questions 1, 2 and 5);
- ``<problem>-heterogeneity``: Dirichlet alpha from 0.05 (digits) or 0.2 (a9a) to 1.0,
  with client evaluation, Local SGD / SAVIC adam-local / FedYogi (question 3), and
  ``<problem>-iid`` the same on an iid split;
- ``<problem>-epochs``: 1, 2 and 5 local epochs (question 4);
- ``<problem>-server-step``: SAVIC adam-local with its own tuned server step and
  momentum (question 6; ``<problem>-server-step-tuned.toml``), compared seed by
  seed with the methods sweep (same seeds: same split, partition and initial model);

and the partial-participation setting (``mnist-partial``): 100 clients, 10
sampled per round, 50 rounds, with its own tuning (``mnist-partial-tuned.toml``),
and its ``mnist-partial-server-step`` (question 6 there).

    python experiments/make_sweeps.py      # rewrites experiments/sweeps/*.toml
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = [0, 1, 2, 3, 4]
MNIST = "idx:../shared/data/mnist-t10k"
A9A = {"dataset": "libsvm:../shared/data/a9a/a9a", "test-path": "../shared/data/a9a/a9a.t", "model": "logreg"}
# Rounds are what 2 CPU cores afford (a9a's logreg is near its optimum after 10 rounds of one epoch: see the gap).
PROBLEMS = {  # base options, target accuracy (one number, or per Dirichlet alpha), what it is
    "digits": ({"dataset": "digits", "model": "cnn", "rounds": 20},
               {"0.05": 0.8, "0.1": 0.85, "default": 0.9}, "digits + CNN, 10 clients (offline default)"),
    "a9a": ({**A9A, "rounds": 10}, {"0.2": 0.83, "default": 0.84}, "a9a + logistic regression, 10 clients (convex)"),
}
PARTIAL = ({"dataset": MNIST, "model": "cnn", "num-clients": 100, "clients-per-round": 10, "rounds": 50}, 0.9,
           "MNIST test set split 8,000 / 2,000 + CNN, 100 clients (Dirichlet 0.5), 10 sampled per round")
METHODS = ["fedavg", "savic-adagrad-global", "savic-rmsprop-global", "savic-adam-global", "savic-adam-local",
           "savic-oasis-global", "savic-oasis-local", "fedadam", "fedyogi", "fedadagrad", "fedprox", "local-adam"]
PARTIAL_METHODS = ["fedavg", "savic-adam-global", "savic-adam-local", "fedyogi", "local-adam"]
ALPHAS = {"digits": [0.05, 0.1, 0.5, 1.0],
          # a9a has two classes: at alpha 0.05 some of 10 clients get fewer than 10 examples (the
          # partitioner refuses, with a one-line error), and at 0.1 for some seeds, so its most heterogeneous split is 0.2.
          "a9a": [0.2, 0.5, 1.0]}
PAIR = ["fedavg", "savic-adam-local"]  # Local SGD against the scaling the paper recommends
TRIO = [*PAIR, "fedyogi"]              # ... and the strongest tuned server-optimizer baseline


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{key}" = {toml_value(v)}' for key, v in value.items()) + "}"
    return f'"{value}"' if isinstance(value, str) else repr(value).replace("'", '"')


def sweep(name: str, tuned: str, setting: tuple, note: str, grid: dict, extra_base: dict | None = None) -> str:
    """One sweep file: ``experiments/results/<name>``, step sizes from ``tuning/<tuned>-tuned.toml``."""
    base, target, title = setting
    lines = [f"# {title}: {note}", "# Written by experiments/make_sweeps.py; step sizes from experiments/tuning/"
             f"{tuned}-tuned.toml (flwr-scaling tune, validation split).",
             f'out = "experiments/results/{name}"', f"target-accuracy = {toml_value(target)}", 'backend = "inprocess"',
             f'include = "../tuning/{tuned}-tuned.toml"', "", "[base]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in {**base, **(extra_base or {})}.items()]
    lines += ["", "[grid]"]
    lines += [f"{key} = [{', '.join(toml_value(v) for v in values)}]" for key, values in grid.items()]
    return "\n".join(lines) + "\n"


def study_sweeps() -> dict[str, str]:
    """``{sweep name: file text}`` for every sweep of the study."""
    files = {}
    for problem, setting in PROBLEMS.items():
        files[f"{problem}-methods"] = sweep(
            f"{problem}-methods", problem, setting, "Local SGD, SAVIC scalings (global and local) and baselines "
            "(questions 1, 2, 5)", {"method": METHODS, "seed": SEEDS})
        files[f"{problem}-heterogeneity"] = sweep(
            f"{problem}-heterogeneity", problem, setting, "Dirichlet concentration, with client evaluation "
            "(question 3)", {"method": TRIO, "dirichlet-alpha": ALPHAS[problem], "seed": SEEDS},
            {"client-eval-every": 5})
        files[f"{problem}-iid"] = sweep(
            f"{problem}-iid", problem, setting, "iid split, with client evaluation (question 3)",
            {"method": TRIO, "seed": SEEDS}, {"partitioner": "iid", "client-eval-every": 5})
        files[f"{problem}-epochs"] = sweep(
            f"{problem}-epochs", problem, setting, "local epochs per round (question 4)",
            {"method": PAIR, "local-epochs": [1, 2, 5], "seed": SEEDS})
        files[f"{problem}-server-step"] = sweep(
            f"{problem}-server-step", f"{problem}-server-step", setting, "SAVIC adam-local with a tuned server "
            "step and server momentum (question 6)", {"method": ["savic-adam-local"], "seed": SEEDS})
    files["mnist-partial"] = sweep("mnist-partial", "mnist-partial", PARTIAL, "partial participation "
                                   "(questions 1 and 5 in the realistic setting)",
                                   {"method": PARTIAL_METHODS, "seed": SEEDS})
    files["mnist-partial-server-step"] = sweep(
        "mnist-partial-server-step", "mnist-partial-server-step", PARTIAL, "SAVIC adam-local with a tuned "
        "server step and server momentum (question 6 in the realistic setting)",
        {"method": ["savic-adam-local"], "seed": SEEDS})
    return files


def main() -> None:
    folder = HERE / "sweeps"
    folder.mkdir(exist_ok=True)
    for name, text in study_sweeps().items():
        (folder / f"{name}.toml").write_text(text, encoding="utf-8")
        print(f"wrote {folder / f'{name}.toml'}")


if __name__ == "__main__":
    main()
