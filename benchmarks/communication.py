"""Communication: what ``--precond-dtype`` and ``--precond-every`` cost in accuracy and save in bytes.

What is measured
----------------
For each problem and seed, ``fedavg`` and SAVIC (the default rule: adam,
global mode) with every combination of ``precond-dtype`` float32 / bfloat16 /
float16 and ``precond-every`` K = 1 / 2 / 5, all else at the package defaults
(10 clients, all trained every round, warm-up in round 1):

* ``digits``: the default problem (CNN, Dirichlet 0.5), ``--rounds 30``;
* ``a9a``: ``--dataset libsvm:DIR/a9a --test-path DIR/a9a.t --model logreg --rounds 20``.

Per run: the final test accuracy, its difference to SAVIC float32 K = 1 in
accuracy points, the megabytes communicated (the sum of the ``bytes_down`` and
``bytes_up`` columns of ``metrics.csv``: serialised array payloads, warm-up
included) and their ratio to ``fedavg``; for logistic regression also the
final optimality gap f(x) − f* when the run records it (column ``f_gap``).
With several seeds a last table gives the means over seeds.

Target (issue 6): bfloat16 with K = 1 within 0.5 accuracy points of float32,
total bytes <= 1.5x fedavg.

The runs go through ``flwr_scaling.run.inprocess`` by default: the real ServerApp
and ClientApp, every message through Flower's serialisation, without Ray
(``tests/test_inprocess.py`` checks it gives the simulation's accuracies and
bytes). ``--backend simulation`` uses Flower's simulation engine instead.

Run (from the repository root)::

    .venv/bin/python benchmarks/communication.py                      # 2 problems x 1 seed: 20 runs
    .venv/bin/python benchmarks/communication.py --seeds 0,1          # 40 runs
    RAY_TMPDIR=/tmp/rayc .venv/bin/python benchmarks/communication.py --backend simulation --problems digits

Runs already complete in ``--out`` (a full ``metrics.csv`` and the same
``config.json``) are read back, not repeated: an interrupted benchmark goes on
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr_scaling.run.config import RunConfig  # noqa: E402
from flwr_scaling.run.recorder import read_metrics  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
EVERY = (1, 2, 5)
REFERENCE = "savic float32 K=1"
DEFAULT_A9A = "/work/shared/data/a9a"


def problems(a9a_dir: str) -> dict[str, dict]:
    return {
        "digits": {"rounds": 30},
        "a9a": {"dataset": f"libsvm:{a9a_dir}/a9a", "test_path": f"{a9a_dir}/a9a.t", "model": "logreg", "rounds": 20},
    }


def variants() -> dict[str, dict]:
    """Run name -> options: fedavg, then SAVIC in every encoding and refresh period."""
    out = {"fedavg": {"strategy": "fedavg"}}
    for dtype in DTYPES:
        for every in EVERY:
            out[f"savic {dtype} K={every}"] = {"strategy": "savic", "precond_dtype": dtype, "precond_every": every}
    return out


@dataclass
class Outcome:
    problem: str
    seed: int | str  # a seed, or "mean of N"
    name: str
    accuracy: float
    last5: float  # mean test accuracy of the last five rounds: less noisy than the final one
    megabytes: float
    f_gap: float | None
    wall_s: float


def runner(backend: str):
    if backend == "inprocess":
        from flwr_scaling.run.inprocess import run_inprocess

        return run_inprocess
    from flwr_scaling.run.simulation import simulate

    return simulate


def run_one(cfg: RunConfig, backend: str) -> tuple[list[dict], float]:
    """The run's metrics rows, from its folder when it is already complete with this configuration."""
    out = Path(cfg.out)
    metrics, saved = out / "metrics.csv", out / "config.json"
    if metrics.exists() and saved.exists():
        rows = read_metrics(metrics)
        if len(rows) == cfg.rounds and json.loads(saved.read_text()) == json.loads(json.dumps(cfg.to_flower())):
            return rows, float("nan")
    start = time.perf_counter()
    rows = runner(backend)(cfg)
    return rows, time.perf_counter() - start


def outcome(problem: str, seed: int, name: str, rows: list[dict], wall_s: float) -> Outcome:
    total = sum(float(r["bytes_down"]) + float(r["bytes_up"]) for r in rows)
    gap = rows[-1].get("f_gap")
    gap = float(gap) if gap not in (None, "") else None
    gap = gap if gap is not None and math.isfinite(gap) else None  # recorded for logistic regression only
    last5 = statistics.fmean(float(r["test_accuracy"]) for r in rows[-5:])
    return Outcome(problem, seed, name, float(rows[-1]["test_accuracy"]), last5, total / 1e6, gap, wall_s)


def table(outcomes: list[Outcome]) -> str:
    """One markdown table: accuracy, its difference to float32 K=1, MB and MB / fedavg, per problem and seed."""
    with_gap = any(o.f_gap is not None for o in outcomes)
    head = ("| problem | seed | run | final acc | Δ acc vs float32 K=1 (points) | acc, mean of last 5 rounds "
            "| MB total | MB / fedavg |")
    rule = "|---|---|---|---|---|---|---|---|"
    if with_gap:
        head, rule = head + " final f − f* |", rule + "---|"
    lines = [head, rule]
    for o in outcomes:
        group = [g for g in outcomes if g.problem == o.problem and g.seed == o.seed]
        ref = next((g for g in group if g.name == REFERENCE), None)
        base = next((g for g in group if g.name == "fedavg"), None)
        delta = f"{100 * (o.accuracy - ref.accuracy):+.2f}" if ref is not None else ""
        ratio = f"{o.megabytes / base.megabytes:.3f}" if base is not None else ""
        line = (f"| {o.problem} | {o.seed} | {o.name} | {o.accuracy:.4f} | {delta} | {o.last5:.4f} "
                f"| {o.megabytes:.2f} | {ratio} |")
        if with_gap:
            line += f" {o.f_gap:.4g} |" if o.f_gap is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def means(outcomes: list[Outcome]) -> list[Outcome]:
    """The mean outcome over seeds of every (problem, run)."""
    merged = []
    keys = list(dict.fromkeys((o.problem, o.name) for o in outcomes))
    for problem, name in keys:
        group = [o for o in outcomes if o.problem == problem and o.name == name]
        gaps = [o.f_gap for o in group if o.f_gap is not None]
        merged.append(Outcome(problem, f"mean of {len(group)}", name, statistics.fmean(o.accuracy for o in group),
                              statistics.fmean(o.last5 for o in group), statistics.fmean(o.megabytes for o in group),
                              statistics.fmean(gaps) if gaps else None, float("nan")))
    return merged


def verdict(outcomes: list[Outcome]) -> list[str]:
    """The issue's target for every problem, on the means over seeds."""
    lines = []
    for problem in dict.fromkeys(o.problem for o in outcomes):
        group = {o.name: o for o in outcomes if o.problem == problem}
        if not {"fedavg", REFERENCE, "savic bfloat16 K=1"} <= set(group):
            continue
        bf16, ref, base = group["savic bfloat16 K=1"], group[REFERENCE], group["fedavg"]
        points = 100 * (bf16.accuracy - ref.accuracy)
        ratio = bf16.megabytes / base.megabytes
        lines.append(
            f"{problem}: bfloat16 K=1 is {points:+.2f} points from float32 (target |Δ| <= 0.5: "
            f"{'met' if abs(points) <= 0.5 else 'missed'}) and sends {ratio:.3f}x fedavg's bytes "
            f"(target <= 1.5: {'met' if ratio <= 1.5 else 'missed'})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--problems", default="digits,a9a", help="comma-separated: digits, a9a")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--backend", choices=("inprocess", "simulation"), default="inprocess",
                        help="the in-process grid (flwr_scaling.run.inprocess: the real ServerApp and ClientApp, "
                             "messages through Flower's serialisation, no Ray; the default) or Flower's "
                             "simulation engine (same accuracies and bytes, ~10 s of Ray start-up a run)")
    parser.add_argument("--a9a-dir", default=DEFAULT_A9A, help=f"folder with a9a and a9a.t (default: {DEFAULT_A9A})")
    parser.add_argument("--out", default="runs/bench-communication", help="folder of the runs (reused when complete)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TMPDIR", "/tmp/rayc")
    chosen = [p.strip() for p in args.problems.split(",") if p.strip()]
    known = problems(args.a9a_dir)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"unknown problems {unknown}; choose from {', '.join(known)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    outcomes = []
    for seed in seeds:  # seed by seed: the first seed's tables are complete first
        for problem in chosen:
            for name, options in variants().items():
                folder = Path(args.out) / problem / f"seed{seed}" / name.replace(" ", "-").replace("=", "")
                cfg = RunConfig(**known[problem], **options, seed=seed, out=str(folder))
                rows, wall = run_one(cfg, args.backend)
                outcomes.append(outcome(problem, seed, name, rows, wall))
                done = outcomes[-1]
                print(f"{problem} seed {seed} {name}: acc {done.accuracy:.4f}, {done.megabytes:.2f} MB"
                      f"{'' if wall != wall else f', {wall:.0f} s'}", flush=True)
    outcomes.sort(key=lambda o: (chosen.index(o.problem), seeds.index(o.seed)))
    print()
    print(table(outcomes))
    if len(seeds) > 1:
        print()
        print(table(means(outcomes)))
    print()
    for line in verdict(means(outcomes)):
        print(line)


if __name__ == "__main__":
    main()
