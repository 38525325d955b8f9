"""Scale: 1,000 clients with 10 sampled per round against 100 clients with 10 per round,
on Flower's simulation engine: round time, start-up and peak memory.

What is measured
----------------
a9a (``dataset="libsvm:/work/shared/data/a9a/a9a"``, ``test_path=".../a9a.t"``,
``model="logreg"``) split iid (``partitioner="iid"``: the Dirichlet split
cannot give 1,000 clients 10 examples each at alpha 0.5), SAVIC adam global,
``clients_per_round=10``, ``num_clients`` 100 or 1,000. ``batch_size=1024``:
every client takes exactly one step on all its data (325 or 32 examples), so
both federations do the same work per round and the comparison shows what
the number of clients costs, not how much data each holds.

Each run is a fresh child process (``--child``) calling
``flwr_scaling.run.simulation.simulate``; it reports

* ``wall_s`` per round from ``metrics.csv``: steady state = median over rounds
  ``--skip + 1`` to the last;
* start-up: from calling ``simulate`` to the round-0 evaluation (options,
  data, partition check, Ray, the node ranks; the heatmap and the actors'
  start overlap it);
* the server process's peak resident memory (``ru_maxrss``: the driver holds
  the ServerApp, Flower's in-memory LinkState with one entry per node, and the
  simulation runtime's per-node contexts).

While the child runs, this process samples every process in its tree (the
driver, Ray's GCS, raylet and helpers, the client actors) every 0.25 s from
``/proc``: the peak of the summed RSS and of the summed PSS (proportional set
size: shared libraries such as torch counted once across processes, so it is
the honest total), and the peak RSS of the actors alone.

The start-up is also split into its parts: ``prepare_output`` (options,
data, the partition check), ``ray_init`` (Ray's own start, on a thread that
began before ``prepare_output``), ``ray_wait`` (how much of it was left when
``prepare_output`` ended), ``wait_for_nodes`` (Ray, the actors
and the runtime registering every node) and ``describe_nodes`` (the node
ranks: in simulation from the runtime's node -> partition map, no message;
it used to ask every node, one message per node through Ray). Round 1 holds
the actors' first train messages and, for logreg, the server's one-off
solve of f* for the optimality-gap column.

``--polling-ab`` adds 1,000 clients on Flower's runtime as installed
(``simulate`` without its prompt delivery: the extractor asks every node for
messages every 0.1 s and the grid polls replies every 0.1 s).

How: repeats run the sizes in a fresh random order each time; the tables give
medians, and the ratios are medians of the per-repeat ratios to 100 clients.
Targets: round time and peak memory within 1.2x.

Run (from the repository root; Ray needs a short temporary folder)::

    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/scale.py               # 3 repeats, 15 rounds: ~12 min
    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/scale.py --polling-ab  # also Flower's own polling
    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/scale.py --quick       # 1 repeat, 8 rounds: ~5 min
    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/scale.py --quick --rounds 4  # mainly the start-up
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from timing import time_calls  # benchmarks/timing.py (this script's folder is on sys.path)

A9A = "/work/shared/data/a9a"
SIZES = (100, 1000)
TARGET = 1.2
PAGE = os.sysconf("SC_PAGE_SIZE")


def config(num_clients: int, rounds: int, out: str):
    from flwr_scaling.run.config import RunConfig

    return RunConfig(
        strategy="savic", precond="adam", precond_mode="global",
        dataset=f"libsvm:{A9A}/a9a", test_path=f"{A9A}/a9a.t", model="logreg",
        partitioner="iid", num_clients=num_clients, clients_per_round=10, batch_size=1024,
        rounds=rounds, out=out,
    )


# ------------------------------------------------------------------ child side
def child(num_clients: int, rounds: int, out: str, flower_polling: bool = False) -> None:
    """Run one simulation; print one JSON line (last line of stdout)."""
    import contextlib
    import io
    import resource

    from flwr_scaling.run import recorder, simulation
    from flwr_scaling.run.simulation import simulate

    if flower_polling:  # Flower's runtime as installed: every node asked every 0.1 s

        @contextlib.contextmanager
        def untouched():
            yield False

        simulation._prompt_delivery = untouched

    from flwr_scaling import server_app

    marks: dict[str, float] = {}
    initial = recorder.RunRecorder.initial
    parts: dict[str, float] = {}

    def timed_initial(self, *args, **kwargs):
        marks["initial"] = time.perf_counter()
        return initial(self, *args, **kwargs)

    recorder.RunRecorder.initial = timed_initial
    # The start-up's parts: options, data and partition check; Ray, actors and nodes up; node ranks.
    time_calls(simulation, "prepare_output", "prepare_output", parts)
    time_calls(simulation.RayStart, "wait", "ray_wait", parts)
    ray_wait = simulation.RayStart.wait

    def ray_init_seconds(self):  # how long ray.init itself took (RayStart.wait returns it)
        seconds = ray_wait(self)
        parts["ray_init"] = seconds
        return seconds

    simulation.RayStart.wait = ray_init_seconds
    import flwr.simulation  # simulate imports run_simulation from it at each call

    original_run = flwr.simulation.run_simulation

    def marked_run(*args, **kwargs):
        marks.setdefault("run_simulation", time.perf_counter())
        return original_run(*args, **kwargs)

    flwr.simulation.run_simulation = marked_run
    original_wait = server_app.wait_for_nodes

    def marked_wait(*args, **kwargs):
        marks.setdefault("server_app", time.perf_counter())
        return original_wait(*args, **kwargs)

    server_app.wait_for_nodes = marked_wait
    time_calls(server_app, "wait_for_nodes", "wait_for_nodes", parts)
    time_calls(server_app, "describe_nodes", "describe_nodes", parts)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rows = simulate(config(num_clients, rounds, out))
    end = time.perf_counter()
    print(json.dumps({
        "walls": [r["wall_s"] for r in rows],
        "startup": marks["initial"] - start,
        "startup_parts": parts,
        "startup_marks": {name: mark - start for name, mark in marks.items()},
        "total": end - start,
        "driver_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


# ------------------------------------------------------------------ parent side
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; ppid is the 2nd field after it.
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(root: int) -> list[int]:
    children = _children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_pss(pid: int) -> tuple[int, int, str]:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * PAGE
        pss = rss
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        return rss, pss, command
    except OSError:
        return 0, 0, ""


class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS of a process tree, sampled every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.peak_actors_rss = 0
        self.max_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss_total = pss_total = actors = 0
            pids = _tree(self.root)
            for pid in pids:
                rss, pss, command = _rss_pss(pid)
                rss_total += rss
                pss_total += pss
                if "ClientAppActor" in command:
                    actors += rss
            self.peak_rss = max(self.peak_rss, rss_total)
            self.peak_pss = max(self.peak_pss, pss_total)
            self.peak_actors_rss = max(self.peak_actors_rss, actors)
            self.max_processes = max(self.max_processes, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_child(num_clients: int, rounds: int, workdir: Path, flower_polling: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"clients-{num_clients}-", dir=workdir))  # a fresh folder per repeat
    command = [sys.executable, __file__, "--child", str(num_clients), "--rounds", str(rounds), "--out", str(out)]
    if flower_polling:
        command.append("--flower-polling")
    env = dict(os.environ)
    env.setdefault("RAY_TMPDIR", "/tmp/raye")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{num_clients} clients: child failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(tree_rss=sampler.peak_rss, tree_pss=sampler.peak_pss, actors_rss=sampler.peak_actors_rss,
                  processes=sampler.max_processes)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 8 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 15)")
    parser.add_argument("--skip", type=int, default=3, help="rounds left out of the steady state (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--polling-ab", action="store_true",
                        help="also run 1,000 clients on Flower's own polling (every node asked every 0.1 s)")
    parser.add_argument("--flower-polling", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (8 if args.quick else 15)
    if args.child:
        child(args.child, args.rounds, args.out, args.flower_polling)
        return
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.rounds <= args.skip:
        parser.error(f"--rounds must exceed --skip ({args.skip})")
    Path(os.environ.setdefault("RAY_TMPDIR", "/tmp/raye")).mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    # (label, clients, Flower's own polling)
    setups = [("100", 100, False), ("1,000", 1000, False)]
    if args.polling_ab:
        setups.append(("1,000, Flower's polling", 1000, True))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in setups}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for repeat in range(args.repeats):
            order = list(setups)
            rng.shuffle(order)
            for label, n, flower_polling in order:
                result = run_child(n, args.rounds, Path(tmp), flower_polling)
                result["steady"] = statistics.median(result["walls"][args.skip:])
                runs[label].append(result)
                print(f"  repeat {repeat + 1}/{args.repeats} {label} clients: {result['steady']:.3f} s/round, "
                      f"start-up {result['startup']:.1f} s, server peak RSS {result['driver_maxrss'] / 2**20:.0f} MiB, "
                      f"tree peak PSS {result['tree_pss'] / 2**20:.0f} MiB", flush=True)

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    def ratio(label: str, key: str) -> str:
        """Median (lowest-highest) of the per-repeat ratios to 100 clients."""
        ratios = [big[key] / small[key] for small, big in zip(runs["100"], runs[label])]
        if len(ratios) == 1:
            return f"{ratios[0]:.2f}"
        return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    mib = 2**20
    print()
    print(f"a9a logreg, iid, SAVIC adam global, 10 clients per round, batch 1024 (one step per client), "
          f"{args.rounds} rounds; steady state = median wall_s of rounds {args.skip + 1}-{args.rounds}; "
          f"medians over {args.repeats} repeat(s); ratios are medians (lowest-highest) of per-repeat ratios to "
          f"100 clients. Load average before / after: {load_before} / "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    print()
    print("| clients | steady s/round | round 1 s | start-up s | server peak RSS MiB | tree peak RSS MiB "
          "| tree peak PSS MiB | actors peak RSS MiB | processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, _, _ in setups:
        print(f"| {label} | {med(label, 'steady'):.3f} | {statistics.median(r['walls'][0] for r in runs[label]):.2f} "
              f"| {med(label, 'startup'):.1f} | {med(label, 'driver_maxrss') / mib:.0f} "
              f"| {med(label, 'tree_rss') / mib:.0f} | {med(label, 'tree_pss') / mib:.0f} "
              f"| {med(label, 'actors_rss') / mib:.0f} | {med(label, 'processes'):.0f} |")
    for label, _, _ in setups[1:]:
        print(f"| {label} / 100 | {ratio(label, 'steady')} | | {ratio(label, 'startup')} "
              f"| {ratio(label, 'driver_maxrss')} | {ratio(label, 'tree_rss')} | {ratio(label, 'tree_pss')} "
              f"| {ratio(label, 'actors_rss')} | |")
    print()
    names = sorted({name for runs_ in runs.values() for r in runs_ for name in r.get("startup_parts", {})})
    print("| start-up part, s | " + " | ".join(label for label, _, _ in setups) + " |")
    print("|---|" + "---:|" * len(setups))
    for name in names:
        print(f"| {name} | " + " | ".join(
            f"{statistics.median(r['startup_parts'].get(name, 0.0) for r in runs[label]):.1f}" for label, _, _ in setups
        ) + " |")
    marks = sorted({name for runs_ in runs.values() for r in runs_ for name in r.get("startup_marks", {})},
                   key=lambda name: statistics.median(r["startup_marks"].get(name, 0.0) for r in runs[setups[0][0]]))
    for name in marks:
        print(f"| at {name} (s after calling simulate) | " + " | ".join(
            f"{statistics.median(r['startup_marks'].get(name, 0.0) for r in runs[label]):.1f}" for label, _, _ in setups
        ) + " |")
    print()
    print("prepare_output: options, data and the partition check; ray_init: ray.init on its thread, begun before")
    print("prepare_output; ray_wait: waiting for that Ray after prepare_output (the heatmap is drawn on a thread")
    print("from then on); run_simulation: Flower's simulation called; server_app: the ServerApp's first step;")
    print("initial: the round-0 evaluation recorded; wait_for_nodes: from the ServerApp's")
    print("start until the simulation runtime has registered every node; describe_nodes: the node ranks from the")
    print("runtime's node -> partition map (no query per node in simulation; the actors then import the client code")
    print("with their first train message, in round 1).")
    print()
    print(f"Targets: round time and peak memory of 1,000 clients within {TARGET}x of 100 clients.")


if __name__ == "__main__":
    main()
