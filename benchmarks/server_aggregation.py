"""Server-side cost of one round's aggregation: SAVIC against Flower's FedAvg.

What is measured
----------------
For a model of N float32 parameters (1e5, 1e6, 1e7, split over 4 arrays of
40/30/20/10 % of N) and R client replies (10, 100), per round:

* ``core``: the averaging alone. (a) Flower's FedAvg average
  ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` on R
  RecordDicts (the model ArrayRecord and a MetricRecord
  ``{"num-examples": n}``), serialised result included, against (b) what
  SAVIC's ``aggregate_train`` does with the same models and R statistics:
  ``record_views`` (zero-copy reads) of both records of every reply,
  ``checked_weighted_average`` of the models and of the statistics (with the
  per-reply sign check), ``state_from_average(rule=adam, mode="global")`` and
  the serialised model average.
* ``strategy``: ``Savic(precond="adam", precond_mode="global").aggregate_train``
  on R reply Messages (model + statistic + metrics), against
  ``FedAvg.aggregate_train`` on the same replies without the statistic. This
  is the real per-round server cost: it includes SAVIC's screening of every
  reply (layout, then NaN/Inf on the averages and the sign of every
  statistic), the byte count and FedAvg's own checks and metric average.
* ``breakdown``: the parts of ``Savic.aggregate_train`` timed alone: the
  screening of the layouts (``ReplyScreen.screen_replies(..., check_values=False)``
  with ``Savic.stats_layout()``), the layout of the state alone
  (``stats_layout``), ``record_views`` of models and statistics, the two
  checked averages, the state update (``state_from_average``), and Flower's
  model average for comparison.

Replies are built once, outside the timed region, as a running app would
receive them (``Message(..., reply_to=train_message)`` with ``TaskIdentity``
set, like ``tests/fakes.py``); each reply carries distinct random data (a
shared buffer would sit in cache and flatter small sizes). The server holds a
preconditioner state, as in every round after the warm-up. ``aggregate_train``
pops the statistic record from each reply, so it is put back (untimed) before
every SAVIC call. Every variant runs once per repeat, in a freshly shuffled
order; the tables give medians over repeats, and the ratios are medians of the
paired per-repeat ratios SAVIC / FedAvg. Target: SAVIC <= 1.3x FedAvg.

Memory: R replies hold R x 8N bytes (model + statistic, serialised); SAVIC
reads them through views (no copies), so a configuration needs about 8 N R
bytes plus a few N; those over ``--max-gb`` (default 8) are skipped and said so
(1e7 x 100 needs ~8.6 GB).

Run (from the repository root)::

    .venv/bin/python benchmarks/server_aggregation.py          # full, 15 repeats (a few minutes)
    .venv/bin/python benchmarks/server_aggregation.py --quick  # smoke run: N = 1e5, 3 repeats
    .venv/bin/python benchmarks/server_aggregation.py --sizes 1e6 --replies 10 --profile
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from flwr_scaling.core.server_update import state_from_average
from flwr_scaling.core.arrays import checked_weighted_average
from flwr_scaling.protocol.records import numpy_to_record, record_to_numpy, record_views
from flwr_scaling.core.rules import get_rule
from flwr_scaling.strategies import Savic

FRACTIONS = (0.4, 0.3, 0.2, 0.1)
BETA = 0.99
TARGET = 1.3
MAIN = ["fedavg-core", "savic-core", "fedavg-strategy", "savic-strategy"]
PARTS = ["screen", "stats-layout", "views", "averages", "state-update", "model-average"]


class Grid:
    """Just what ``configure_train`` uses of a Flower Grid (no warm-up happens here)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - never called
        raise RuntimeError("the benchmark sets a state, so no warm-up query is sent")


def layout(n: int) -> dict[str, int]:
    sizes = [int(n * f) for f in FRACTIONS]
    sizes[0] += n - sum(sizes)
    return {f"layer{i}": s for i, s in enumerate(sizes)}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class Setup:
    """R replies for one (N, R), both strategies, and the timed callables."""

    def __init__(self, n: int, replies: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        shapes = layout(n)
        self.weights = [float(w) for w in rng.integers(50, 200, replies)]
        x0 = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
        state = {k: rng.random(s, dtype=np.float32) * 1e-2 + 1e-4 for k, s in shapes.items()}

        self.savic = Savic(precond="adam", precond_mode="global", precond_beta=BETA,
                           sampling_seed=0, min_train_nodes=2, min_available_nodes=2)
        self.savic.precond_state = state  # as after the warm-up: no query is sent
        self.fedavg = FedAvg(min_train_nodes=2, min_available_nodes=2)
        nodes = list(range(1, replies + 1))
        train = list(self.savic.configure_train(1, to_record(x0), ConfigRecord({"lr": 0.01}), Grid(nodes)))

        self.model_records, self.stats_records = [], []
        self.savic_replies, self.fedavg_replies = [], []
        for message, weight in zip(train, self.weights, strict=True):
            model = to_record({k: v + 0.01 * rng.standard_normal(v.size, dtype=np.float32) for k, v in x0.items()})
            stats = to_record({k: rng.random(s, dtype=np.float32) * 1e-2 for k, s in shapes.items()})
            metrics = {"num-examples": weight, "train_loss": float(rng.random())}
            self.model_records.append(model)
            self.stats_records.append(stats)
            # Same model arrays in both replies: FedAvg only lacks the statistic.
            self.savic_replies.append(Message(
                content=RecordDict({"arrays": model, "stats": stats, "metrics": MetricRecord(metrics)}),
                reply_to=message))
            self.fedavg_replies.append(Message(
                content=RecordDict({"arrays": model, "metrics": MetricRecord(metrics)}), reply_to=message))
        self.fedavg_contents = [m.content for m in self.fedavg_replies]
        self.rule = get_rule("adam")
        # For the parts timed alone: the views and both averages, made once.
        self.model_views = [record_views(r) for r in self.model_records]
        self.stats_views = [record_views(r) for r in self.stats_records]
        self.stats_average = checked_weighted_average(self.stats_views, self.weights).arrays
        self._check()

    def restore_stats(self) -> None:
        """``Savic.aggregate_train`` pops the statistic from each reply; put it back."""
        for message, stats in zip(self.savic_replies, self.stats_records, strict=True):
            if "stats" not in message.content.array_records:
                message.content["stats"] = stats

    def _check(self) -> None:
        self.restore_stats()
        arrays_s, metrics = self.savic.aggregate_train(1, self.savic_replies)
        arrays_f, _ = self.fedavg.aggregate_train(1, self.fedavg_replies)
        assert metrics["clients-ok"] == len(self.savic_replies), "SAVIC rejected replies: the benchmark is wrong"
        for key, value in record_to_numpy(arrays_f).items():
            np.testing.assert_allclose(record_to_numpy(arrays_s)[key], value, rtol=1e-4, atol=1e-5)

    # ---- timed callables -----------------------------------------------------------
    def fedavg_core(self) -> None:
        aggregate_arrayrecords(self.fedavg_contents, "num-examples")

    def savic_core(self) -> None:
        models = checked_weighted_average([record_views(r) for r in self.model_records], self.weights)
        stats = checked_weighted_average([record_views(r) for r in self.stats_records], self.weights, find_lowest=True)
        numpy_to_record(models.arrays)
        state_from_average(self.rule, "global", self.savic.precond_state, stats.arrays, BETA)

    def fedavg_strategy(self) -> None:
        self.fedavg.aggregate_train(1, self.fedavg_replies)

    def savic_strategy(self) -> None:
        self.savic.aggregate_train(1, self.savic_replies)

    def screen(self) -> None:
        self.savic.screen.screen_replies(self.savic_replies, stats_layout=self.savic.stats_layout(),
                                         parameter_layout=self.savic.model_layout(), check_values=False)

    def stats_layout(self) -> None:
        self.savic.stats_layout()

    def views(self) -> None:
        [record_views(r) for r in self.model_records]
        [record_views(r) for r in self.stats_records]

    def averages(self) -> None:
        checked_weighted_average(self.model_views, self.weights)
        checked_weighted_average(self.stats_views, self.weights, find_lowest=True)

    def state_update(self) -> None:
        state_from_average(self.rule, "global", self.savic.precond_state, self.stats_average, BETA)

    def model_average(self) -> None:
        aggregate_arrayrecords(self.fedavg_contents, "num-examples")

    def callables(self, breakdown: bool) -> dict[str, Callable[[], None]]:
        names = MAIN + (PARTS if breakdown else [])
        return {name: getattr(self, name.replace("-", "_")) for name in names}


def measure(setup: Setup, repeats: int, breakdown: bool, seed: int) -> dict[str, list[float]]:
    """Milliseconds per call, one entry per repeat; all variants interleaved in shuffled order."""
    calls = setup.callables(breakdown)
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for repeat in range(repeats + 1):  # repeat 0 is a warm-up, not recorded
        rng.shuffle(order)
        for name in order:
            setup.restore_stats()
            gc.collect()
            gc.disable()
            start = time.perf_counter_ns()
            calls[name]()
            elapsed = time.perf_counter_ns() - start
            gc.enable()
            if repeat:
                times[name].append(elapsed / 1e6)
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def needed_gb(n: int, replies: int) -> float:
    return (8 * n * replies + 64 * n) / 1e9


def fmt_n(n: int) -> str:
    return f"1e{int(round(np.log10(n)))}" if n == 10 ** int(round(np.log10(n))) else str(n)


def profile(n: int, replies: int, seed: int) -> None:
    import cProfile
    import pstats

    setup = Setup(n, replies, seed)
    prof = cProfile.Profile()
    for _ in range(5):
        setup.restore_stats()
        prof.enable()
        setup.savic_strategy()
        prof.disable()
    print(f"== cProfile: Savic.aggregate_train, N = {fmt_n(n)}, R = {replies}, 5 calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 1e5, R = 10 and 100, 3 repeats")
    parser.add_argument("--sizes", type=float, nargs="+", help="model sizes N (default 1e5 1e6 1e7)")
    parser.add_argument("--replies", type=int, nargs="+", help="replies per round R (default 10 100)")
    parser.add_argument("--repeats", type=int, help="repeats (default 15; 3 with --quick)")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip configurations needing more memory")
    parser.add_argument("--no-breakdown", action="store_true", help="time only the four main variants")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of Savic.aggregate_train instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ([1e5] if args.quick else [1e5, 1e6, 1e7]))]
    replies_list = args.replies or [10, 100]
    repeats = args.repeats or (3 if args.quick else 15)

    logging.getLogger("flwr").setLevel(logging.ERROR)  # per-round INFO logs and the fraction_evaluate warning
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as inside a ServerApp

    if args.profile:
        for n in sizes:
            for r in replies_list:
                profile(n, r, args.seed)
        return

    results, skipped = [], []
    for n in sizes:
        for r in replies_list:
            if needed_gb(n, r) > args.max_gb:
                skipped.append(f"N = {fmt_n(n)} x R = {r}: needs ~{needed_gb(n, r):.0f} GB > --max-gb {args.max_gb:g}")
                continue
            setup = Setup(n, r, args.seed)
            results.append((n, r, measure(setup, repeats, not args.no_breakdown, args.seed)))
            del setup
            gc.collect()

    print(f"{repeats} repeats; ms = median per round; ratios = median of paired per-repeat ratios SAVIC / FedAvg\n")
    print("| N params | replies | FedAvg core ms | SAVIC core ms | core ratio "
          "| FedAvg.aggregate_train ms | Savic.aggregate_train ms | strategy ratio | target <= 1.3x | met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for n, r, t in results:
        med = {k: statistics.median(v) for k, v in t.items()}
        core, strat = paired(t, "savic-core", "fedavg-core"), paired(t, "savic-strategy", "fedavg-strategy")
        print(f"| {fmt_n(n)} | {r} | {med['fedavg-core']:.2f} | {med['savic-core']:.2f} | {core:.2f} "
              f"| {med['fedavg-strategy']:.2f} | {med['savic-strategy']:.2f} | {strat:.2f} | "
              f"core {'yes' if core <= TARGET else '**NO**'} | strategy {'yes' if strat <= TARGET else '**NO**'} |")
    for line in skipped:
        print(f"\nskipped {line}")

    if not args.no_breakdown and results:
        print("\nBreakdown of Savic.aggregate_train (ms, median; % of the median Savic.aggregate_train):\n")
        print("| N params | replies | screen layouts | stats layout | views | checked averages | state update "
              "| model average (Flower) | Savic.aggregate_train |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, r, t in results:
            med = {k: statistics.median(v) for k, v in t.items()}
            total = med["savic-strategy"]
            cells = " | ".join(f"{med[p]:.2f} ({100 * med[p] / total:.0f} %)" for p in PARTS)
            print(f"| {fmt_n(n)} | {r} | {cells} | {total:.2f} |")


if __name__ == "__main__":
    main()
