"""A real two-node Ray cluster on this machine: a parallel sweep and a simulation run attached with --ray-address.

The head (``ray start --head``, 1 CPU) and a second node (1 CPU and its own
``node_b`` resource) each have their own temp dir, so no other Ray on the
machine finds them (``ray.init()`` with no address reads the default temp
dir's ``ray_current_cluster``). Both run with ``--block`` in their own process
group and carry a marker in their environment; the fixture stops them by those
groups and the marker, never with ``ray stop`` (which stops every Ray on the
machine). Slow: a cluster start, a serial and a parallel sweep of 4 runs x 2
rounds, a one-round `run --backend simulation` and a one-round `flwr run .`;
1.5 minutes at load 3.5 on 2 cores, 5 at load 12.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from flwr_scaling.studies.sweep import DONE, run_sweep
from test_parallel_sweep import NAMES, SWEEP as SWEEP_TEMPLATE

try:
    from .processes import kill_marked
except ImportError:  # tests run as top-level modules
    from processes import kill_marked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
SWEEP = SWEEP_TEMPLATE.format(extra="")  # the parallel-sweep tests' 4-run sweep
STARTED = "Ray runtime started"  # what `ray start` prints once the node has joined


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_node(arguments: list[str], temp_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, its output in ``temp_dir/start.txt``."""
    log = open(temp_dir / "start.txt", "w", encoding="utf-8")
    command = [str(RAY), "start", *arguments, "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
               "--num-cpus", "1", "--disable-usage-stats", "--block"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_started(node: subprocess.Popen, temp_dir: Path, deadline: float) -> None:
    while STARTED not in (temp_dir / "start.txt").read_text(encoding="utf-8", errors="replace"):
        output = (temp_dir / "start.txt").read_text(encoding="utf-8", errors="replace")
        assert node.poll() is None, f"ray start exited:\n{output[-2000:]}"
        assert time.monotonic() < deadline, f"ray start did not finish:\n{output[-2000:]}"
        time.sleep(0.2)


def cluster_nodes(address: str) -> dict[str, dict[str, float]]:
    """The cluster's alive nodes as {node id: resources}, asked from a separate driver."""
    script = ("import json, logging, ray; ray.init(address=%r, logging_level=logging.ERROR, log_to_driver=False); "
              "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % address)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    """(address, {node id: resources}, the two temp dirs) of a running two-node cluster; stopped afterwards."""
    # Short paths: Ray's Unix sockets live under the temp dir (about 100 characters at most).
    head_dir, other_dir = (Path(tempfile.mkdtemp(prefix=f"rc{name}", dir="/tmp")) for name in "ab")
    marker = f"FLWR_SCALING_TEST_CLUSTER={uuid.uuid4().hex}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",  # as docs/cluster.md
           marker.split("=")[0]: marker.split("=")[1]}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    nodes: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 180
        # Fixed default ports (client server 10001, dashboard 8265) could clash with another Ray on the machine.
        nodes.append(start_node(["--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
                                 "--include-dashboard", "false", "--dashboard-port", str(free_port())],
                                head_dir, env))
        wait_started(nodes[0], head_dir, deadline)
        address = f"127.0.0.1:{port}"
        nodes.append(start_node(["--address", address, "--resources", json.dumps({"node_b": 1})], other_dir, env))
        wait_started(nodes[1], other_dir, deadline)
        found = cluster_nodes(address)
        while len(found) < 2:
            assert time.monotonic() < deadline, f"the second node did not join: {found}"
            time.sleep(0.5)
            found = cluster_nodes(address)
        yield address, found, (head_dir, other_dir)
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its node's processes on SIGTERM
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        for node in nodes:  # anything left in the groups, then anything else that carries the marker
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_marked(marker)


def metrics_without_wall(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(handle)]


def cli(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "flwr_scaling.cli", *arguments], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


def test_a_sweep_on_two_nodes_gathers_the_serial_results_on_the_driver(cluster, tmp_path):
    address, nodes, _ = cluster
    path = tmp_path / "grid.toml"
    path.write_text(SWEEP, encoding="utf-8")
    with open(os.devnull, "w", encoding="utf-8") as quiet:
        serial = run_sweep(path, tmp_path / "serial", stream=quiet)

    done = cli("sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "2", "--ray-address", address)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    for name in NAMES:
        ours = out / "runs" / name
        assert metrics_without_wall(ours / "metrics.csv") == metrics_without_wall(serial / "runs" / name /
                                                                                  "metrics.csv")
        assert (ours / DONE).is_file() and (ours / "log.txt").is_file() and (ours / "partitions.png").is_file()
        assert json.loads((ours / "config.json").read_text())["out"] == str(ours)
    assert (out / "summary.md").read_text() == (serial / "summary.md").read_text()
    assert "attached in" in done.stdout and f"at {address}" in done.stdout

    # Each progress line names the node its run ran on (the id's first 8 characters); with one CPU per node
    # and two runs at a time, both nodes ran runs.
    progress = [line for line in done.stdout.splitlines() if line.startswith("[") and " done in " in line]
    assert len(progress) == 4
    used = {line.split(" on node ")[1].split()[0] for line in progress}
    assert len(used) == 2
    assert {next(node for node in nodes if node.startswith(prefix)) for prefix in used} == set(nodes)
    assert any("node_b" in nodes[node] for node in nodes)


def test_a_simulation_run_attaches_to_the_cluster(cluster, tmp_path):
    address, _, temp_dirs = cluster
    out = tmp_path / "sim"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "flwr_scaling.cli", "run", "--backend", "simulation", "--ray-address", address,
               "--rounds", "1", "--num-clients", "2", "--warmup-batches", "1", "--out", str(out)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stdout[-2000:] + stderr[-2000:]
    rows = metrics_without_wall(out / "metrics.csv")
    assert [row["round"] for row in rows][-1] == "1"
    # The driver joined the cluster (its core-worker log is in one of the cluster's sessions), no local Ray.
    logs = [log for temp_dir in temp_dirs for log in temp_dir.glob(f"session_*/logs/python-core-driver-*_{run.pid}.log")]
    assert logs, "the run did not attach to the cluster"


def driver_logs(temp_dirs: tuple[Path, ...]) -> set[Path]:
    """The core-worker logs of every driver that has joined the cluster (one per driver process)."""
    return {log for temp_dir in temp_dirs for log in temp_dir.glob("session_*/logs/python-core-driver-*.log")}


def test_flwr_run_attaches_through_ray_address(cluster, tmp_path):
    """`RAY_ADDRESS=ADDR flwr run .`: the local SuperLink that flwr run starts passes its environment to the
    simulation process, whose ray.init() (no address in Flower's init-args) reads RAY_ADDRESS. The federation
    options of docs/cluster.md (--federation-config, no init-args-num-cpus) are accepted."""
    address, _, temp_dirs = cluster
    home, out = tmp_path / "flwr-home", tmp_path / "flwr-out"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLWR_", "RAY_", "VIRTUAL_ENV"))}
    env.update(FLWR_HOME=str(home), RAY_ADDRESS=address, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{RAY.parent}:/usr/bin:/bin")
    before = driver_logs(temp_dirs)
    command = [str(RAY.parent / "flwr"), "run", ".", "--stream", "--federation-config",
               "num-supernodes=2 client-resources-num-cpus=1 init-args-logging-level='ERROR' "
               "init-args-log-to-driver=false", "-c", f"rounds=1 warmup-batches=1 out='{out}'"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    finally:
        kill_marked(f"FLWR_HOME={home}", signal.SIGTERM)  # the local SuperLink flwr run leaves running
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = metrics_without_wall(out / "metrics.csv")
    assert [row["round"] for row in rows] == ["1"] and rows[0]["clients_ok"] == "2"
    assert driver_logs(temp_dirs) - before, "the simulation did not join the cluster"
