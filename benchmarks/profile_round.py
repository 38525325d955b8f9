"""Where a client round's time goes: cProfile of the serial loop (``run/serial.py``), one method against FedAvg.

What is measured
----------------
``run_serial`` on a9a logreg (10 clients, all trained every round, the package
defaults: Dirichlet 0.5, one local epoch, batch 32: about 100 steps per
client round), one torch thread, for ``--method`` and ``fedavg``. Round 1
(SAVIC's warm-up, the first data loads) is run before profiling starts, by a
first ``run_serial`` call of one round; the profile covers a second call of
``--rounds`` rounds. Prints the steady seconds per round of each method (the
median ``wall_s`` of the profiled rounds, under the profiler: slower than
without it), then for ``--method`` the functions with the most own time and
the most cumulative time, and the per-call difference to FedAvg of the
functions both runs call.

Run (from the repository root)::

    .venv/bin/python benchmarks/profile_round.py                         # savic-adam-local on a9a, 5 rounds
    .venv/bin/python benchmarks/profile_round.py --method savic-adam-global --rounds 10
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
from dataclasses import replace

import torch

A9A = "/work/shared/data/a9a"
METHODS = {
    "fedavg": {"strategy": "fedavg"},
    "savic-adam-global": {"strategy": "savic", "precond": "adam", "precond_mode": "global"},
    "savic-adam-local": {"strategy": "savic", "precond": "adam", "precond_mode": "local"},
}


def profile(method: str, rounds: int) -> tuple[float, pstats.Stats]:
    from flwr_scaling.run.config import RunConfig
    from flwr_scaling.run.serial import run_serial

    cfg = RunConfig(dataset=f"libsvm:{A9A}/a9a", test_path=f"{A9A}/a9a.t", model="logreg", num_clients=10,
                    rounds=1, out="/tmp/profile-round", **METHODS[method])
    run_serial(cfg)  # data, partitions and the warm-up outside the profile
    profiler = cProfile.Profile()
    profiler.enable()
    rows, _ = run_serial(replace(cfg, rounds=rounds + 1))
    profiler.disable()
    return statistics.median(row.wall_s for row in rows[1:]), pstats.Stats(profiler)


def table(stats: pstats.Stats, key: str, count: int) -> str:
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats(key).print_stats(count)
    return text.getvalue().split("ncalls", 1)[-1]


def per_function(stats: pstats.Stats) -> dict[str, tuple[int, float]]:
    """``file:line(function)`` -> (calls, own seconds)."""
    return {f"{path.rsplit('/', 1)[-1]}:{line}({name})": (calls, own)
            for (path, line, name), (_, calls, own, _, _) in stats.stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="savic-adam-local", choices=[m for m in METHODS if m != "fedavg"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base_s, base = profile("fedavg", args.rounds)
    ours_s, ours = profile(args.method, args.rounds)
    print(f"steady s/round under the profiler: fedavg {base_s:.3f}, {args.method} {ours_s:.3f} "
          f"({ours_s / base_s:.2f}x)")
    print(f"\n{args.method}: most own time\n   ncalls" + table(ours, "tottime", args.top))
    print(f"{args.method}: most cumulative time\n   ncalls" + table(ours, "cumulative", args.top))
    mine, theirs = per_function(ours), per_function(base)
    rows = [(own - theirs.get(name, (0, 0.0))[1], name, calls, theirs.get(name, (0, 0.0))[0])
            for name, (calls, own) in mine.items()]
    print(f"own time {args.method} - fedavg over {args.rounds} rounds (s), largest first:")
    for extra, name, calls, base_calls in sorted(rows, reverse=True)[:args.top]:
        print(f"  {extra:+8.3f}  {name}  calls {calls} (fedavg {base_calls})")


if __name__ == "__main__":
    main()
