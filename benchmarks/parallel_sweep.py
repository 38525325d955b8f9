"""Parallel sweeps: throughput of ``flwr-scaling sweep --workers 1`` against ``--workers 2``, a two-node
Ray cluster against the local one-node Ray, and the share of Ray's start-up.

What is measured
----------------
Two 12-run digits sweeps (in-process runs inside Ray tasks, 3 methods x 4
seeds, 10 rounds, the methods' tuned step sizes):

* ``10-clients``: the package defaults (10 clients, all trained every round);
* ``100-clients``: 100 clients, 10 sampled per round (partial participation,
  the scale path through the study tools), split iid (Dirichlet 0.5 cannot
  give 100 clients 10 examples each from digits' 1,437 training rows).

Each sweep is one ``flwr-scaling sweep`` command (a fresh process, a fresh
output folder), timed from start to exit. Variants:

* ``workers-1``: ``--workers 1`` (a local Ray with 1 CPU, one run at a time);
* ``workers-2``: ``--workers 2`` (a local Ray with 2 CPUs);
* ``cluster-2-nodes``: ``--workers 2 --ray-address`` on a two-node Ray
  cluster on loopback (two ``ray start`` nodes of 1 CPU each, each with its
  own temp dir; started before and stopped after, not timed);
* ``cluster-1-node``: ``--workers 2 --ray-address`` on the head node alone
  (1 CPU: the second run waits).

Throughput is runs per minute of the whole command; "Ray start-up" is what
the sweep prints (``Ray started|attached in X s``), given as a share of the
command's time. The load average (1 min) is printed before and after each
sweep: other processes on the machine take cores too.

Run (from the repository root; ~10 min on 2 cores)::

    .venv/bin/python benchmarks/parallel_sweep.py
    .venv/bin/python benchmarks/parallel_sweep.py --configs 10-clients --variants workers-1,workers-2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHODS = {"fedavg": 1.0, "savic-adam-global": 0.003, "savic-adam-local": 0.01}  # experiments/sweeps/digits-methods
SEEDS = [0, 1, 2, 3]
CONFIGS = {"10-clients": "", "100-clients": "num-clients = 100\nclients-per-round = 10\npartitioner = \"iid\"\n"}
VARIANTS = ("workers-1", "workers-2", "cluster-2-nodes", "cluster-1-node")


def sweep_text(config: str, rounds: int) -> str:
    options = "".join(f"\n[method-options.{method}]\nlr = {lr}\n" for method, lr in METHODS.items())
    return (f'backend = "inprocess"\n\n[base]\ndataset = "digits"\nmodel = "cnn"\nrounds = {rounds}\n'
            f"{CONFIGS[config]}{options}\n[grid]\nmethod = {json.dumps(list(METHODS))}\nseed = {SEEDS}\n")


def load() -> float:
    return os.getloadavg()[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """Ray nodes on loopback, each ``ray start --block`` in its own process group (stopped by that group)."""

    def __init__(self) -> None:
        self.nodes: list[subprocess.Popen] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Workers at niceness 0, as the local Ray a sweep starts (studies/parallel.py); Ray's default is 15.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def add(self, head: bool) -> None:
        temp_dir = Path(tempfile.mkdtemp(prefix="rcbench", dir="/tmp"))  # short: Ray's socket paths
        role = (["--head", "--port", str(self.port), "--ray-client-server-port", str(free_port()),
                 "--include-dashboard", "false", "--dashboard-port", str(free_port())] if head
                else ["--address", self.address, "--resources", json.dumps({"node_b": 1})])
        log = temp_dir / "start.txt"
        with open(log, "w", encoding="utf-8") as handle:
            node = subprocess.Popen([str(BIN / "ray"), "start", *role, "--temp-dir", str(temp_dir),
                                     "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
                                     "--block"], stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.nodes.append(node)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        time.sleep(2.0)  # the node registers with the GCS right after printing

    def remove_last(self) -> None:
        node = self.nodes.pop()
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        try:
            os.killpg(node.pid, signal.SIGKILL)  # anything left in its group
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        while self.nodes:
            self.remove_last()


def run_sweep(path: Path, out: Path, arguments: list[str]) -> dict:
    """One sweep command, timed; its Ray start-up line parsed."""
    shutil.rmtree(out, ignore_errors=True)
    before = load()
    began = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([str(BIN / "flwr-scaling"), "sweep", str(path), "--out", str(out), *arguments],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"sweep failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    startup = re.search(r"Ray (?:started|attached) in ([0-9.]+) s", done.stdout)
    nodes = set(re.findall(r" on node (\w+)", done.stdout))
    runs = sum(1 for line in done.stdout.splitlines() if line.startswith("[") and " done in " in line)
    per_run = [float(s) for s in re.findall(r" done in ([0-9.]+) s", done.stdout)]
    return {"seconds": seconds, "runs": runs, "run_s_median": statistics.median(per_run) if per_run else 0.0, "ray_startup_s": float(startup.group(1)) if startup else 0.0,
            "nodes": len(nodes), "load_before": before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the cluster (finally) on kill too
    configs, variants = args.configs.split(","), args.variants.split(",")
    work = Path(tempfile.mkdtemp(prefix="parallel-sweep-"))
    results: list[dict] = []
    cluster = Cluster() if any(v.startswith("cluster") for v in variants) else None
    try:
        for config in configs:
            path = work / f"{config}.toml"
            path.write_text(sweep_text(config, args.rounds), encoding="utf-8")
            for variant in variants:
                if variant.startswith("workers-"):
                    arguments = ["--workers", variant.split("-")[1]]
                else:
                    wanted = 2 if variant == "cluster-2-nodes" else 1
                    while len(cluster.nodes) > wanted:
                        cluster.remove_last()
                    while len(cluster.nodes) < wanted:
                        cluster.add(head=not cluster.nodes)
                    arguments = ["--workers", "2", "--ray-address", cluster.address]
                result = {"config": config, "variant": variant, **run_sweep(path, work / "out", arguments)}
                result["runs_per_min"] = 60 * result["runs"] / result["seconds"]
                results.append(result)
                print(f"{config:12s} {variant:16s} {result['runs']} runs in {result['seconds']:6.1f} s "
                      f"({result['runs_per_min']:.2f} runs/min), Ray start-up {result['ray_startup_s']:.1f} s "
                      f"({100 * result['ray_startup_s'] / result['seconds']:.1f} %), median run {result['run_s_median']:.1f} s, "
                      f"{result['nodes']} node(s), "
                      f"load {result['load_before']:.1f} -> {result['load_after']:.1f}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["config"], r["variant"]): r for r in results}
    for config in configs:
        pairs = (("workers-2", "workers-1"), ("cluster-2-nodes", "cluster-1-node"), ("cluster-2-nodes", "workers-2"))
        for faster, slower in pairs:
            if (config, faster) in by and (config, slower) in by:
                ratio = by[(config, faster)]["runs_per_min"] / by[(config, slower)]["runs_per_min"]
                print(f"{config}: throughput {faster} / {slower} = {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
