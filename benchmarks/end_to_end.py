"""End to end: wall time per round on Flower's simulation engine, SAVIC against FedAvg and
against the same algorithm run serially in one process; and the bytes a round moves.

What is measured
----------------
Two problems, 10 clients, all 10 trained every round, one local epoch, batch
32 (the package defaults):

* ``digits``: the default problem (scikit-learn digits, CNN, Dirichlet 0.5);
* ``a9a``: ``dataset="libsvm:/work/shared/data/a9a/a9a"``,
  ``test_path=".../a9a.t"``, ``model="logreg"`` (Dirichlet 0.5).

Three methods: ``fedavg``, ``savic-adam-global`` and ``savic-adam-local``
(the warm-up query in round 1, checkpoints every round: the defaults).

For each run:

* ``simulation``: ``flwr_scaling.run.simulation.simulate`` (Ray, one actor per
  core, one thread each). Per round: ``wall_s`` of ``metrics.csv`` (from the
  end of one round's server evaluation to the end of the next: sampling,
  messages, client work, aggregation, evaluation, metrics.csv and checkpoint).
  ``start-up``: from calling ``simulate`` to the round-0 evaluation (options,
  data, partitions, the heatmap, Ray, the actors, the node-info query that
  makes every actor import torch and load the data). ``shutdown``: from the
  last round to ``simulate`` returning.
* ``serial``: ``flwr_scaling.run.serial.run_serial`` on the same configuration:
  the identical client code (``clients.logic.local_round``), server updates,
  data and seeds, one client after another in this process, no Flower: the
  physical limit of a round on this machine. Its ``wall_s`` covers sampling,
  the clients, aggregation and the server evaluation (no files written).

Steady state = the median ``wall_s`` over rounds ``--skip + 1`` to the last
(round 1 carries the actors' first train messages and SAVIC's warm-up).

``--polling-ab`` (on by default; ``--no-polling-ab`` skips it): fedavg also
runs on Flower's runtime as installed (``simulate`` without its prompt
delivery: both sides poll every 0.1 s), to show what that costs.

How: in every repeat each method runs once on each backend, the methods in a
fresh random order, the serial run right after its simulation (interleaved, so
that load from other processes hits all alike). Ratios are medians over repeats
of the per-repeat ratios (paired). This process runs torch on ``--threads``
threads (default 1, as a simulated client), which the serial loop and the
server's evaluation use.

Bytes: the ``bytes_down`` / ``bytes_up`` columns of the simulation's
``metrics.csv`` (round 1 and a later round), and a check of what they count:
one round of each method through ``flwr_scaling.run.inprocess.InProcessGrid``
(the real ServerApp and ClientApp, messages through Flower's protobuf),
recording every message's array payload (``len(Array.data)``, the column's
definition), the size of ``flwr.common.serde.message_to_proto(msg)`` and the
bytes of the deflated object tree (``get_all_nested_objects(msg)``; what
Flower 1.42's deployment transport stores and sends, before gRPC framing).

Targets: steady-state SAVIC <= 1.10x FedAvg; steady-state simulation <= 1.5x
the serial loop.

Run (from the repository root; Ray needs a short temporary folder)::

    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/end_to_end.py          # 3 repeats x 2 problems, ~6 min
    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/end_to_end.py --quick  # digits, 1 repeat, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from flwr_scaling.run import recorder as recorder_module
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.serial import run_serial
from flwr_scaling.run.simulation import simulate

A9A = "/work/shared/data/a9a"
PROBLEMS = {
    "digits": {},
    "a9a": {"dataset": f"libsvm:{A9A}/a9a", "test_path": f"{A9A}/a9a.t", "model": "logreg"},
}
METHODS = {
    "fedavg": {"strategy": "fedavg"},
    "savic-adam-global": {"strategy": "savic", "precond": "adam", "precond_mode": "global"},
    "savic-adam-local": {"strategy": "savic", "precond": "adam", "precond_mode": "local"},
}
SAVIC_TARGET = 1.10
SERIAL_TARGET = 1.5


class Probe:
    """Timestamps of the parts of every round, taken by wrapping functions of this process for one run.

    ``spans[label]`` lists ``(end, seconds)`` of every call; ``ends`` are the
    ends of the rounds (``RunRecorder.add`` for a simulation, ``evaluate`` for
    the serial loop); ``initial`` is when the round-0 evaluation was recorded.
    """

    def __init__(self) -> None:
        self.initial: float | None = None
        self.ends: list[float] = []
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self._undo: list = []

    def wrap(self, owner, name: str, label: str, round_end: bool = False) -> None:
        original = getattr(owner, name)
        spans = self.spans.setdefault(label, [])
        ends = self.ends

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                spans.append((end, end - start))
                if round_end:
                    ends.append(end)

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def mark_initial(self, owner, name: str) -> None:
        original = getattr(owner, name)
        probe = self

        def timed(*args, **kwargs):
            probe.initial = time.perf_counter()
            return original(*args, **kwargs)

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def per_round(self, label: str) -> list[float]:
        """Seconds spent in ``label`` during each round (by the end times of the calls)."""
        totals = [0.0] * len(self.ends)
        for end, seconds in self.spans.get(label, []):
            for index, round_end in enumerate(self.ends):
                if end <= round_end + 1e-9:
                    totals[index] += seconds
                    break
        return totals


# The parts of a round the breakdown shows: (label, simulation: module/class and function, serial: same).
SIM_PARTS = ("train messages + clients", "aggregate_train", "server evaluation", "f_gap", "checkpoint", "metrics.csv")
SERIAL_PARTS = ("clients (local_round)", "server evaluation")


@contextlib.contextmanager
def flowers_own_polling():
    """``simulate`` without its prompt delivery: Flower's runtime as installed (0.1 s polling on both sides)."""

    @contextlib.contextmanager
    def untouched():
        yield False

    from flwr_scaling.run import simulation

    prompt = simulation._prompt_delivery
    simulation._prompt_delivery = untouched
    try:
        yield
    finally:
        simulation._prompt_delivery = prompt


def run_simulation(cfg: RunConfig, quiet: bool, flower_polling: bool = False) -> dict:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from flwr_scaling import server_app
    from flwr_scaling.strategies import Savic

    if flower_polling:
        with flowers_own_polling():
            return run_simulation(cfg, quiet)
    probe = Probe()
    probe.mark_initial(recorder_module.RunRecorder, "initial")
    probe.wrap(recorder_module.RunRecorder, "add", "metrics.csv", round_end=True)
    probe.wrap(InMemoryGrid, "send_and_receive", "messages")
    probe.wrap(Savic, "aggregate_train", "aggregate_train")
    probe.wrap(server_app, "evaluate", "server evaluation")
    probe.wrap(server_app, "save_checkpoint", "checkpoint")
    if hasattr(server_app, "optimality_gap"):  # logreg runs: f(x) - f* on the whole training split every round
        probe.wrap(server_app, "optimality_gap", "f_gap")
    out = io.StringIO() if quiet else sys.stdout
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            rows = simulate(cfg)
    finally:
        probe.restore()
    end = time.perf_counter()
    # The train send_and_receive of round r is the first call that ends in round r
    # (the evaluate one sends nothing; round 1 of SAVIC also has the warm-up query).
    messages = probe.spans.get("messages", [])
    train = []
    for index, round_end in enumerate(probe.ends):
        begin = probe.ends[index - 1] if index else probe.initial
        inside = [seconds for stamp, seconds in messages if begin < stamp <= round_end]
        train.append(max(inside) if inside else float("nan"))
    return {
        "walls": [r["wall_s"] for r in rows],
        "rows": rows,
        "startup": probe.initial - start,
        "shutdown": end - probe.ends[-1],
        "total": end - start,
        "parts": {
            "train messages + clients": train,
            **{label: probe.per_round(label) for label in SIM_PARTS[1:]},
        },
    }


def run_plain(cfg: RunConfig) -> dict:
    from flwr_scaling.run import serial

    probe = Probe()
    probe.wrap(serial, "local_round", "clients (local_round)")
    probe.wrap(serial, "evaluate", "server evaluation", round_end=True)
    try:
        rows, _ = run_serial(cfg)
    finally:
        probe.restore()
    return {
        "walls": [r.wall_s for r in rows],
        "parts": {label: probe.per_round(label) for label in SERIAL_PARTS},
    }


def steady(walls: list[float], skip: int) -> float:
    return statistics.median(walls[skip:])


def median(values) -> float:
    return statistics.median(list(values))


def spread(ratios: list[float]) -> str:
    """``median (lowest-highest)`` of per-repeat ratios; just the ratio for one repeat."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def timing_tables(problems: list[str], args, workdir: Path) -> dict:
    """Run every (problem, method) on both backends, interleaved; print the table; return the raw results."""
    results: dict[tuple[str, str], list[dict]] = {}
    rng = random.Random(args.seed)
    for repeat in range(args.repeats):
        for problem in problems:
            order = list(METHODS)
            rng.shuffle(order)
            for method in order:
                cfg = RunConfig(
                    rounds=args.rounds, num_clients=10, out=str(workdir / f"{problem}-{method}-repeat{repeat}"),
                    **PROBLEMS[problem], **METHODS[method],
                )
                sim = run_simulation(cfg, quiet=not args.verbose)
                plain = run_plain(cfg)
                run = {"sim": sim, "serial": plain}
                if method == "fedavg" and args.polling_ab:
                    polling = replace(cfg, out=cfg.out + "-flower-polling")  # a fresh folder: finished runs are never overwritten
                    run["flower"] = run_simulation(polling, quiet=not args.verbose, flower_polling=True)
                results.setdefault((problem, method), []).append(run)
                print(
                    f"  repeat {repeat + 1}/{args.repeats} {problem:6s} {method:18s} "
                    f"simulation {steady(sim['walls'], args.skip):.3f} s/round  "
                    f"serial {steady(plain['walls'], args.skip):.3f} s/round  start-up {sim['startup']:.1f} s",
                    flush=True,
                )
    print()
    print(f"Steady state = median wall_s of rounds {args.skip + 1}-{args.rounds}; medians over {args.repeats} "
          f"repeat(s); ratios are medians of per-repeat ratios (lowest-highest). torch threads in this process: "
          f"{args.threads}. Load average before / after: {args.load_before} / {' '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    for problem in problems:
        print()
        print(f"### {problem}")
        print()
        print("| method | simulation s/round | serial s/round | simulation / serial | x fedavg (simulation) "
              "| x fedavg (serial) | round 1 s (simulation) | start-up s | shutdown s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = results[(problem, "fedavg")]
        for method in METHODS:
            runs = results[(problem, method)]
            sim = [steady(r["sim"]["walls"], args.skip) for r in runs]
            ser = [steady(r["serial"]["walls"], args.skip) for r in runs]
            vs_fedavg = [s / steady(b["sim"]["walls"], args.skip) for s, b in zip(sim, base)]
            vs_fedavg_serial = [s / steady(b["serial"]["walls"], args.skip) for s, b in zip(ser, base)]
            print(
                f"| {method} | {median(sim):.3f} | {median(ser):.3f} | {spread([a / b for a, b in zip(sim, ser)])} "
                f"| {spread(vs_fedavg)} | {spread(vs_fedavg_serial)} "
                f"| {median(r['sim']['walls'][0] for r in runs):.2f} "
                f"| {median(r['sim']['startup'] for r in runs):.1f} | {median(r['sim']['shutdown'] for r in runs):.1f} |"
            )
    if args.polling_ab:
        print()
        print("fedavg on Flower's runtime as installed (both sides poll every 0.1 s) against this package's simulate:")
        print()
        print("| problem | Flower's polling s/round | simulate s/round | Flower's polling / serial | simulate / serial |")
        print("|---|---:|---:|---:|---:|")
        for problem in problems:
            runs = results[(problem, "fedavg")]
            flower = [steady(r["flower"]["walls"], args.skip) for r in runs]
            sim = [steady(r["sim"]["walls"], args.skip) for r in runs]
            ser = [steady(r["serial"]["walls"], args.skip) for r in runs]
            print(f"| {problem} | {median(flower):.3f} | {median(sim):.3f} "
                  f"| {spread([a / b for a, b in zip(flower, ser)])} | {spread([a / b for a, b in zip(sim, ser)])} |")
    print()
    print(f"Targets: savic <= {SAVIC_TARGET:.2f}x fedavg; simulation <= {SERIAL_TARGET:.1f}x serial (steady state).")
    breakdown(problems, args, results)
    return results


def breakdown(problems: list[str], args, results: dict) -> None:
    """Where a steady round goes: medians over steady rounds and repeats, in milliseconds."""
    print()
    print("### Where a steady round goes (ms; medians over the steady rounds of all repeats)")
    print()
    head = [f"sim: {p}" for p in SIM_PARTS] + ["sim: rest", "sim: round"]
    head += [f"serial: {p}" for p in SERIAL_PARTS] + ["serial: rest", "serial: round"]
    print("| problem | method | " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * len(head))
    for problem in problems:
        for method in METHODS:
            cells = []
            for backend, parts in (("sim", SIM_PARTS), ("serial", SERIAL_PARTS)):
                per_part = {p: [] for p in parts}
                rest, walls = [], []
                for run in results[(problem, method)]:
                    r = run[backend]
                    for index in range(args.skip, len(r["walls"])):
                        values = {p: r["parts"][p][index] for p in parts}
                        for p in parts:
                            per_part[p].append(values[p])
                        rest.append(r["walls"][index] - sum(values.values()))
                        walls.append(r["walls"][index])
                cells += [median(per_part[p]) for p in parts] + [median(rest), median(walls)]
            print(f"| {problem} | {method} | " + " | ".join(f"{1e3 * c:.1f}" for c in cells) + " |")
    print()
    print("sim: train messages + clients = the strategy's send_and_receive of the train messages (Flower's runtime,")
    print("Ray and the clients' work on two actors); f_gap = the optimality gap f(x) - f* of logreg runs (the")
    print("serial loop does not compute it); checkpoint and metrics.csv are written every round; rest = sampling,")
    print("configure_train, logging, threads. serial: clients = local_round, one after another.")


def bytes_from_metrics(problems: list[str], results: dict) -> None:
    print()
    print("### Bytes per round (metrics.csv of the simulation runs: array payload, all 10 clients)")
    print()
    print("| problem | method | round 1 down | round 1 up | later rounds down | later rounds up | later: x fedavg |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for problem in problems:
        base = None
        for method in METHODS:
            rows = results[(problem, method)][0]["sim"]["rows"]
            first, later = rows[0], rows[-1]
            total = later["bytes_down"] + later["bytes_up"]
            base = base or total
            print(
                f"| {problem} | {method} | {kb(first['bytes_down'])} | {kb(first['bytes_up'])} "
                f"| {kb(later['bytes_down'])} | {kb(later['bytes_up'])} | {total / base:.2f} |"
            )


def kb(n: float) -> str:
    return f"{n / 1e3:,.1f} kB"


def wire_check(problems: list[str], workdir: Path) -> None:
    """One round of each method through InProcessGrid, every message measured three ways."""
    from flwr.app import Message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from flwr_scaling.run import inprocess
    from flwr_scaling.protocol.records import content_bytes

    def sizes(message: Message) -> tuple[int, int, int]:
        arrays = content_bytes(message.content) if message.has_content() else 0
        proto = message_to_proto(message).ByteSize()
        objects = sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
        return arrays, proto, objects

    log: list[tuple[str, str, tuple[int, int, int]]] = []

    class Recording(inprocess.InProcessGrid):
        def _handle(self, message: Message) -> Message:
            reply = super()._handle(message)
            kind = message.metadata.message_type
            log.append((kind, "down", sizes(message)))
            log.append((kind, "up", sizes(reply)))
            return reply

    print()
    print("### What the bytes columns count: one round's messages, measured three ways (sums over 10 clients)")
    print()
    print("| problem | method | message | direction | array payload (column) | protobuf message | "
          "object tree (1.42 transport) | protobuf / payload |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    original = inprocess.InProcessGrid
    inprocess.InProcessGrid = Recording
    try:
        for problem in problems:
            for method in METHODS:
                log.clear()
                cfg = RunConfig(rounds=2, num_clients=10, out=str(workdir / f"wire-{problem}-{method}"),
                                checkpoint_every=0, **PROBLEMS[problem], **METHODS[method])
                with contextlib.redirect_stdout(io.StringIO()):
                    rows = inprocess.run_inprocess(cfg)
                # Round 2 only (round 1 adds the warm-up query): the last 20 train entries.
                trains = [entry for entry in log if entry[0] == "train"][-20:]
                for direction in ("down", "up"):
                    picked = [s for _, d, s in trains if d == direction]
                    arrays, proto, objects = (sum(s[i] for s in picked) for i in range(3))
                    column = rows[-1][f"bytes_{direction}"]
                    assert column == arrays, (problem, method, direction, column, arrays)
                    print(f"| {problem} | {method} | train (round 2) | {direction} | {arrays:,} | {proto:,} | "
                          f"{objects:,} | {proto / arrays:.3f} |")
    finally:
        inprocess.InProcessGrid = original
    print()
    print("The column equals the array payload of the round's messages exactly (checked above): len(Array.data) of")
    print("every Array (float32: the .npy bytes, data plus a 128-byte header), without the ConfigRecord, MetricRecord")
    print("and metadata that the protobuf message and the object tree add.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 1 repeat, 8 rounds")
    parser.add_argument("--problem", choices=list(PROBLEMS), action="append", help="default: both")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 15)")
    parser.add_argument("--skip", type=int, default=3, help="rounds left out of the steady state (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    parser.add_argument("--no-wire", action="store_true", help="skip the serialisation check")
    parser.add_argument("--no-polling-ab", dest="polling_ab", action="store_false",
                        help="skip the fedavg run on Flower's own 0.1 s polling")
    parser.add_argument("--verbose", action="store_true", help="show the runs' progress lines")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problems = args.problem or (["digits"] if args.quick else list(PROBLEMS))
    args.rounds = args.rounds or (8 if args.quick else 15)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.rounds <= args.skip:
        parser.error(f"--rounds must exceed --skip ({args.skip})")
    torch.set_num_threads(args.threads)
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    os.environ.setdefault("RAY_TMPDIR", "/tmp/raye")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        workdir = Path(tmp)
        results = timing_tables(problems, args, workdir)
        bytes_from_metrics(problems, results)
        if not args.no_wire:
            wire_check(problems, workdir)


if __name__ == "__main__":
    main()
