"""Ray's own start on this machine: the floor under every simulation's start-up.

``simulate`` starts Ray on a thread while it reads the data (``run/ray_start.py``),
so its start-up to the round-0 evaluation is Ray's start plus what is left
after it (``benchmarks/scale.py`` splits it). This script times Ray alone: a
fresh process calls ``ray.init`` with exactly the arguments ``simulate`` gives
it (``flower_ray_settings(backend_config(...)["init_args"])``) and nothing
else running, then runs one task. It also times the steps of ``ray.init``
that take the time, by wrapping these Ray 2.55.1 functions (private names,
read from ``ray/_private/node.py`` and ``services.py`` of that version; this
is a measurement script, the package does not use them):

* ``Node.start_gcs_server``: the GCS process;
* ``Node.start_api_server``: the dashboard head, started even with
  ``include_dashboard=False`` (a minimal one) and polled every 0.1 s until it
  answers: a Python process importing Ray's dashboard modules;
* ``services.get_node``: the driver asks the GCS whether the raylet has
  registered, in a loop whose attempts each take about 1 s while it has not
  (so this part is 1.0, 2.0 or 3.0 s, depending on how long the raylet and
  its agents took to come up);
* ``worker.connect``: the driver connecting as a Ray worker.

Run (from the repository root; Ray needs a short temporary folder)::

    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/ray_start.py              # 8 repeats, ~1 min
    RAY_TMPDIR=/tmp/raye .venv/bin/python benchmarks/ray_start.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import time_calls  # benchmarks/timing.py (this script's folder is on sys.path)

# (owner module, owner attribute or None, function name, label): Ray 2.55.1's private functions.
STEPS = (
    ("ray._private.node", "Node", "start_gcs_server", "gcs"),
    ("ray._private.node", "Node", "start_api_server", "dashboard_head"),
    ("ray._private.services", None, "get_node", "raylet_registered"),
    ("ray._private.worker", None, "connect", "driver_connect"),
)
LABELS = ("import_ray", "ray_init", *(step[3] for step in STEPS), "first_task")


def child() -> None:
    """One fresh process: time ``ray.init`` (and its steps) and one task; print one JSON line."""
    import importlib

    began = time.perf_counter()
    import ray

    imported = time.perf_counter() - began
    from flwr_scaling.protocol.flower_adapter import flower_ray_settings
    from flwr_scaling.run.config import RunConfig
    from flwr_scaling.run.simulation import backend_config

    parts: dict[str, float] = {"import_ray": imported}

    for module, attribute, name, label in STEPS:
        owner = importlib.import_module(module)
        time_calls(getattr(owner, attribute) if attribute else owner, name, label, parts)
    settings = flower_ray_settings(backend_config(RunConfig())["init_args"])
    start = time.perf_counter()
    ray.init(**settings)
    parts["ray_init"] = time.perf_counter() - start

    @ray.remote
    def one() -> int:
        return 1

    start = time.perf_counter()
    ray.get(one.remote())
    parts["first_task"] = time.perf_counter() - start
    ray.shutdown()
    print(json.dumps(parts))


def run_child() -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ray_start.py: a repeat failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="fresh processes, one after another (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    Path(os.environ.setdefault("RAY_TMPDIR", "/tmp/raye")).mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    results = []
    for repeat in range(1, args.repeats + 1):
        parts = run_child()
        results.append(parts)
        print(f"  repeat {repeat}/{args.repeats}: ray.init {parts['ray_init']:.2f} s "
              f"(raylet registered after {parts['raylet_registered']:.1f} s)", flush=True)
    print()
    print(f"ray.init with simulate's arguments, {args.repeats} fresh processes one after another, "
          f"{os.cpu_count()} CPU cores; load average before / after: {' '.join(f'{x:.1f}' for x in load)} / "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.")
    print()
    print("| part, s | median | lowest | highest |")
    print("|---|---:|---:|---:|")
    for label in LABELS:
        values = [parts.get(label, 0.0) for parts in results]
        print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print()
    print("ray_init: the whole ray.init call (gcs, dashboard_head, raylet_registered and driver_connect are")
    print("inside it); first_task: one task submitted and returned after ray.init (a worker process started).")


if __name__ == "__main__":
    main()
