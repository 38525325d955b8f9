"""Real deployment on loopback: a SuperLink and SuperNodes as separate processes,
TLS and SuperNode authentication on, each node training on its own CSV file.

Every process is started through ``LocalFederation`` in its own process group;
the module fixture's finalizer stops them all, also when a test fails. The
``kill -9`` test starts ``flwr-scaling deploy-local`` itself, marks every
process it leads to, and SIGKILLs whatever still carries the mark at its end.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling.run.config import RunConfig
from flwr_scaling.data.federated import DataSpec, load_federated_data
from flwr_scaling.deploy.local import LocalFederation

sys.path.insert(0, str(Path(__file__).parent))
from processes import kill_marked  # noqa: E402  (tests/processes.py)

pytestmark = pytest.mark.slow

ROUNDS = 8
KILL_IN_ROUND = 2  # a middle round: the next one waits once for the node, the ones after do not
RESTART_IN_ROUND = 4  # the device comes back: later rounds sample it again
WAIT_S = 90.0  # wait-for-nodes-s: a bound no ordinary round of this run comes near (they take 15-50 s here)


def _write_csv(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"x{i}" for i in range(features.shape[1])] + ["label"])
        for row, label in zip(features, labels):
            writer.writerow([f"{v:.6g}" for v in row] + [int(label)])


@pytest.fixture(scope="module")
def node_files(tmp_path_factory) -> list[Path]:
    """Two disjoint halves of digits' training split, one CSV per node (pixels in [0, 1], labels 0..9)."""
    folder = tmp_path_factory.mktemp("node-data")
    train = load_federated_data(DataSpec("digits")).train
    order = np.random.default_rng(0).permutation(len(train))
    paths = []
    for index, part in enumerate(np.array_split(order, 2)):
        path = folder / f"node{index}.csv"
        _write_csv(path, train.features[part].reshape(len(part), -1), train.labels[part])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def federation(tmp_path_factory, node_files):
    """A secure SuperLink and two registered SuperNodes with their own files."""
    fed = LocalFederation(tmp_path_factory.mktemp("deploy"), secure=True)
    try:
        fed.start_superlink()
        for index, path in enumerate(node_files):
            fed.start_supernode({"data-path": f"csv:{path}", "partition-id": index}, f"supernode-{index}")
        fed.wait_for_nodes(2, timeout_s=120)
        yield fed
    finally:
        fed.stop()
        leftovers = [p.name for p in fed.processes if p.alive()]
        assert not leftovers


def _online(fed: LocalFederation) -> list[dict]:
    return [n for n in fed.list_nodes() if str(n.get("status", "")).lower() == "online"]


def test_unregistered_key_and_missing_ca_are_refused(federation):
    fed = federation
    before = {n["node-id"] for n in _online(fed)}
    registered_before = {n["node-id"] for n in fed.list_nodes()}
    unregistered = fed.start_supernode({"partition-id": 0, "num-partitions": 2}, "supernode-unregistered", register=False)
    no_ca = fed.start_supernode({"partition-id": 1, "num-partitions": 2}, "supernode-no-ca", root_certificates=False)
    try:
        time.sleep(20)
        nodes = fed.list_nodes()
        assert {n["node-id"] for n in _online(fed)} == before, nodes  # neither came online
        new = [n for n in nodes if n["node-id"] not in registered_before]
        # only the no-CA node's (registered) key is known, and it never got past "registered"
        assert [n["status"] for n in new] == ["registered"], nodes
        assert "Failed to activate SuperNode" in unregistered.log_text(), unregistered.log_text()
        assert "No SuperNode found with the given public key" in (fed.workdir / "superlink.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in no_ca.log_text(), no_ca.log_text()
    finally:
        fed.release(unregistered)
        fed.release(no_ca)
    assert not unregistered.alive() and not no_ca.alive()


def test_secure_run_survives_a_node_killed_mid_round_and_uses_it_again_when_it_comes_back(federation, node_files,
                                                                                         tmp_path):
    """A node killed in round 2 costs one wait of wait-for-nodes-s (round 3), not one per round;
    the same device started again (a new key: a new node id) trains in the rounds after it is online."""
    fed = federation
    out = tmp_path / "out"
    cfg = RunConfig.from_mapping({
        "strategy": "savic", "precond": "adam", "rounds": ROUNDS, "num-clients": 2,
        "dataset": "digits", "out": str(out), "wait-for-nodes-s": WAIT_S,
    }).resolved()
    lines: list[str] = []
    killed = threading.Event()
    victim = next(p for p in fed.processes if p.name == "supernode-1")
    restart: dict = {}

    def note_when_online() -> None:
        # Polls only: the SuperNode itself is started by the main thread, as its parent-death
        # signal would stop it together with a thread that started it.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "online_during_round" not in restart:
            try:
                if len(_online(fed)) >= 2:
                    restart["online_during_round"] = latest_round(lines)
            except Exception as error:  # the SuperLink stopped: the assertion below reports it
                restart["error"] = repr(error)
                return
            time.sleep(1.0)

    watcher = threading.Thread(target=note_when_online, daemon=True)

    def on_line(line: str) -> None:
        lines.append(line)
        if f"[ROUND {KILL_IN_ROUND}/" in line and not killed.is_set():
            time.sleep(2)  # the message is out; the node is training or about to
            victim.kill()
            killed.set()
        if f"[ROUND {RESTART_IN_ROUND}/" in line and "proc" not in restart:
            restart["proc"] = fed.start_supernode({"data-path": f"csv:{node_files[1]}", "partition-id": 1},
                                                  "supernode-1-again")
            watcher.start()

    started = time.monotonic()
    try:
        proc = fed.run(cfg, on_line=on_line, timeout_s=900)
    finally:
        if watcher.ident is not None:
            watcher.join(timeout=240)
    elapsed = time.monotonic() - started
    log = "\n".join(lines)
    assert proc.popen.returncode == 0, log[-4000:]
    assert killed.is_set() and not victim.alive(), log[-4000:]
    assert "error" not in restart and "online_during_round" in restart, (restart, log[-4000:])

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["round"]) for r in rows] == list(range(1, ROUNDS + 1)), rows
    assert (out / "config.json").exists()
    for row in rows:
        assert np.isfinite(float(row["test_loss"])), row
    assert all(int(row["clients_ok"]) == 2 for row in rows[: KILL_IN_ROUND - 1]), rows
    # The SuperLink answers for the dead node once its heartbeat lapses: one reply is missing or an error.
    assert int(rows[KILL_IN_ROUND - 1]["clients_ok"]) == 1, rows
    waited = rows[KILL_IN_ROUND]  # the first round without the node waits for it, once
    assert int(waited["clients_ok"]) == 1 and int(waited["clients_failed"]) == 0, waited
    assert float(waited["wall_s"]) >= WAIT_S, waited
    # The next round goes on at once with the connected node: its time is a round's, not a wait's.
    after = rows[KILL_IN_ROUND + 1]
    assert int(after["clients_failed"]) == 0 and float(after["wall_s"]) < WAIT_S, after
    # A round sampled after the restarted node was online trains it again.
    again = [row for row in rows if int(row["round"]) > restart["online_during_round"]]
    assert again and all(int(row["clients_ok"]) == 2 for row in again), (restart, rows)
    print(f"node killed in round {KILL_IN_ROUND}, back during round {restart['online_during_round']}: "
          f"{elapsed:.0f} s; rows {rows}")


def latest_round(lines: list[str]) -> int:
    """The last round the ServerApp announced (``[ROUND k/N]``), 0 before the first."""
    found = [int(match) for line in lines for match in re.findall(r"\[ROUND (\d+)/", line)]
    return max(found, default=0)


# ------------------------------------------------------------------ kill -9
def _marked(marker: str) -> dict[int, str]:
    """Running processes whose environment holds ``marker``: pid -> command line (zombies left out)."""
    found = {}
    entry = f"FLWR_SCALING_TEST_MARKER={marker}".encode()
    for folder in Path("/proc").iterdir():
        if not folder.name.isdigit():
            continue
        try:
            if entry not in (folder / "environ").read_bytes().split(b"\0"):
                continue
            found[int(folder.name)] = (folder / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return found


def _wait_until(condition, bound_s: float) -> bool:
    """Poll ``condition`` until it holds or ``bound_s`` passed (a bound on waiting, not a timing claim)."""
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes through /proc (Linux)")
def test_kill_9_of_deploy_local_leaves_no_process_behind(tmp_path):
    """SIGKILL gives deploy-local no chance to clean up: its SuperLink, SuperNodes, Flower's
    SuperExec and app processes, and its watchdog must all end anyway."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, FLWR_SCALING_TEST_MARKER=marker)
    out_log = tmp_path / "deploy-local.out"
    deploy = None
    argv = [str(Path(sys.executable).parent / "flwr-scaling"), "deploy-local", "--insecure", "--nodes", "2",
            "--rounds", "200", "--dataset", "digits", "--out", str(tmp_path / "out"),
            "--workdir", str(tmp_path / "work")]
    try:
        with open(out_log, "wb") as handle:
            deploy = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        # round 1 streamed: the ServerApp and at least one ClientApp have run
        started = _wait_until(lambda: "[ROUND 1/" in out_log.read_text(errors="replace") or deploy.poll() is not None,
                              300)
        assert started and deploy.poll() is None, out_log.read_text(errors="replace")[-3000:]
        running = _marked(marker)
        commands = " | ".join(running.values())
        for program in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                        "flwr run", "flwr_scaling.deploy.processes import watch"):
            assert program in commands, commands
        os.kill(deploy.pid, signal.SIGKILL)
        deploy.wait()
        _wait_until(lambda: not _marked(marker), 90)
    finally:
        left = _marked(marker)  # empty, unless the run failed before the kill or something survived it
        kill_marked(marker)
        if deploy is not None and deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert left == {}, left
