"""Choose every method's step size on a validation split (never the test set), per problem.

For each method of the study and each value of its small grid, runs the
serial reference (the same client code, server updates, data and seeds as the
Flower runs; ``flwr_scaling/serial.py``) with ``eval-split = validation``:
20 % of the training data is held out and the test set is not touched. The
score is the mean validation accuracy over rounds 1..R (it rewards speed and
the final value alike), averaged over the seeds. Writes a table with every
score and the chosen values as a ``[method-options]`` block for the study's
sweep files.

    python experiments/tune.py digits   # or a9a, mnist; --seeds 0 1, --rounds R

Grids: SAVIC and Local SGD over the client step size γ; fedadam, fedyogi and
fedadagrad over the server step size η with the client step size fixed at
Local SGD's tuned γ (the FedOpt paper tunes both; one axis keeps this small);
fedprox over γ with μ = 0.01; local-adam over Adam's step size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from flwr_scaling.cli import parse_label
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.serial import run_serial

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"  # ../shared/data from the project root (see README, Study)

PROBLEMS = {
    "digits": dict(dataset="digits", model="cnn", rounds=30),
    "a9a": dict(dataset=f"libsvm:{DATA}/a9a/a9a", test_path=f"{DATA}/a9a/a9a.t", model="logreg", rounds=20),
    "mnist": dict(dataset=f"idx:{DATA}/mnist-t10k", model="cnn", rounds=15),
}

STEP = [0.001, 0.003, 0.01, 0.03]
SERVER_STEP = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
GRIDS = {  # method label -> (option tuned, values)
    "fedavg": ("lr", [0.03, 0.1, 0.3, 1.0, 3.0]),
    "savic-adagrad-global": ("lr", [0.001, 0.003, 0.01, 0.03, 0.1]),
    "savic-rmsprop-global": ("lr", STEP),
    "savic-adam-global": ("lr", STEP),
    "savic-adam-local": ("lr", STEP),
    "savic-oasis-global": ("lr", [0.01, 0.03, 0.1, 0.3]),
    "savic-oasis-local": ("lr", [0.01, 0.03, 0.1, 0.3]),
    "fedadam": ("server-lr", SERVER_STEP),
    "fedyogi": ("server-lr", SERVER_STEP),
    "fedadagrad": ("server-lr", SERVER_STEP),
    "fedprox": ("lr", [0.03, 0.1, 0.3, 1.0]),
    "local-adam": ("lr", [*STEP, 0.1]),
}
NEEDS_FEDAVG_LR = ("fedadam", "fedyogi", "fedadagrad")  # their client step is Local SGD's tuned γ


def score(options: dict, seeds: list[int]) -> tuple[float, float]:
    """(mean validation accuracy over rounds, final validation accuracy), averaged over ``seeds``."""
    means, finals = [], []
    for seed in seeds:
        cfg = RunConfig.from_mapping({**options, "seed": seed, "eval-split": "validation"})
        accuracies = [row.test_accuracy for row in run_serial(cfg)[0]]
        means.append(statistics.fmean(accuracies))
        finals.append(accuracies[-1])
    return statistics.fmean(means), statistics.fmean(finals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=sorted(PROBLEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, help="default: the study's rounds for the problem")
    parser.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--values", type=float, nargs="+",
                        help="replace the grids of --methods (to widen a grid whose best value was at its edge; "
                             "write to another --out, e.g. tuning/<problem>-wider.md, which make_sweeps.py reads after "
                             "<problem>.md)")
    parser.add_argument("--out", type=Path, help="default: experiments/tuning/<problem>.md")
    args = parser.parse_args()
    # One thread, as each simulation actor has: small models, and two threads thrash on a busy machine.
    torch.set_num_threads(1)
    problem = {**PROBLEMS[args.problem]}
    if args.rounds:
        problem["rounds"] = args.rounds
    problem = {key.replace("_", "-"): value for key, value in problem.items()}
    out = args.out or HERE / "tuning" / f"{args.problem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    lines = [f"# Step sizes for {args.problem}", "",
             f"`python experiments/tune.py {' '.join(sys.argv[1:])}`"
             f" ({problem['rounds']} rounds, validation split, seeds {args.seeds})", "",
             "| method | option | value | mean val acc over rounds | final val acc | chosen |", "|---|---|---|---|---|---|"]
    chosen: dict[str, tuple[str, float]] = {}
    methods = sorted(args.methods, key=lambda m: m in NEEDS_FEDAVG_LR)  # fedavg's γ first
    for method in methods:
        option, values = GRIDS[method]
        values = args.values or values
        fixed = {}
        if method in NEEDS_FEDAVG_LR:
            if "fedavg" not in chosen:
                sys.exit(f"{method} uses Local SGD's tuned step size: tune fedavg in the same call")
            fixed["lr"] = chosen["fedavg"][1]
        scores = {}
        for value in values:
            options = {**problem, **parse_label(method), **fixed, option: value}
            scores[value] = score(options, args.seeds)
            print(f"{method:22s} {option} {value:<6g} mean {scores[value][0]:.3f} final {scores[value][1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        best = max(scores, key=lambda v: scores[v][0])
        chosen[method] = (option, best)
        for value, (mean_acc, final) in scores.items():
            lines.append(f"| {method} | {option}{' (lr ' + format(fixed['lr'], 'g') + ')' if fixed else ''} | "
                         f"{value:g} | {mean_acc:.3f} | {final:.3f} | {'yes' if value == best else ''} |")
        edge = " (at the edge of the grid)" if best in (values[0], values[-1]) else ""
        print(f"-> {method}: {option} = {best:g}{edge}", flush=True)
    lines += ["", "Chosen values, as used by the sweep files in `experiments/sweeps/`:", "", "```toml"]
    for method, (option, value) in chosen.items():
        extra = f"\nlr = {chosen['fedavg'][1]:g}" if method in NEEDS_FEDAVG_LR else ""
        lines += [f"[method-options.{method}]", f"{option} = {value:g}{extra}", ""]
    lines += ["```", "", f"Took {time.perf_counter() - start:.0f} s on this machine."]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
