"""Choose each method's default step size on a validation split (never the test set).

Runs the serial reference (same client code, data and seeds as the Flower
simulation) on the default problem with ``eval-split = validation`` for a
small grid per method and prints, per method, the step size with the best
mean validation accuracy over rounds 1..R (rewarding both speed and the final
value), averaged over seeds. The chosen values are the rules' ``default_lr``
in ``flwr_scaling/core/rules.py``.

    python experiments/tune_defaults.py [--rounds 30] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import statistics

from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.serial import run_serial

GRID = {
    ("fedavg", "identity", "global"): [0.1, 0.2, 0.4, 0.8],
    ("savic", "adam", "global"): [0.001, 0.003, 0.01, 0.03],
    ("savic", "adam", "local"): [0.001, 0.003, 0.01, 0.03],
    ("savic", "rmsprop", "global"): [0.001, 0.003, 0.01, 0.03],
    ("savic", "rmsprop", "local"): [0.001, 0.003, 0.01, 0.03],
    ("savic", "adagrad", "global"): [0.0003, 0.001, 0.003, 0.01],
    ("savic", "adagrad", "local"): [0.001, 0.003, 0.01, 0.03],
    ("savic", "oasis", "global"): [0.01, 0.03, 0.1],
    ("savic", "oasis", "local"): [0.01, 0.03, 0.1],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print("| method | lr | mean val acc over rounds | final val acc | chosen |")
    print("|---|---|---|---|---|")
    for (strategy, precond, mode), rates in GRID.items():
        scores = {}
        for lr in rates:
            means, finals = [], []
            for seed in args.seeds:
                cfg = RunConfig(
                    strategy=strategy, precond=precond, precond_mode=mode, lr=lr, seed=seed,
                    rounds=args.rounds, eval_split="validation",
                )
                accs = [row.test_accuracy for row in run_serial(cfg)[0]]
                means.append(statistics.fmean(accs))
                finals.append(accs[-1])
            scores[lr] = (statistics.fmean(means), statistics.fmean(finals))
        best = max(scores, key=lambda lr: scores[lr][0])
        for lr, (mean_acc, final) in scores.items():
            mark = "yes" if lr == best else ""
            print(f"| {strategy} {precond} {mode} | {lr:g} | {mean_acc:.3f} | {final:.3f} | {mark} |", flush=True)


if __name__ == "__main__":
    main()
