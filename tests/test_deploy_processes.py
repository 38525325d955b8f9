"""Children of ``deploy-local`` die with it, also when it is killed with SIGKILL.

Stand-ins for Flower's processes (``sleep`` under ``sh``): a leader with a
child in its process group (a SuperNode and its ClientApp), one whose child
starts a session of its own (the SuperLink's SuperExec), one that ignores
SIGTERM. A parent process starts them the way ``LocalFederation`` does and is
then killed with ``kill -9``. Every test process carries a marker of its own,
and each test's ``finally`` SIGKILLs whatever still carries it, so a failing
test leaves nothing running. Fast: no Flower process is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from flwr_scaling.cli import main
from flwr_scaling.deploy.local import INSECURE_WARNING, LocalFederation
from flwr_scaling.deploy.processes import MARKER_VARIABLE, Watchdog, marked_pids, spawn, watch

sys.path.insert(0, str(Path(__file__).parent))
from processes import kill_marked  # noqa: E402  (tests/processes.py)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl (Linux)")

DEADLINE_S = 60.0  # a bound on waiting, not a timing claim: the watchdog's grace is 5 s

PARENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from flwr_scaling.deploy.processes import MARKER_VARIABLE, Watchdog, spawn

    marker, folder, with_watchdog = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    env = dict(os.environ, **{MARKER_VARIABLE: marker})
    watchdog = Watchdog(marker, os.environ) if with_watchdog else None
    children = {
        "group": "sleep 300 & sleep 300",            # a child in the leader's group
        "session": "setsid sleep 300 & sleep 300",   # a child in a session of its own
        "stubborn": "trap '' TERM; sleep 300",       # ignores SIGTERM: needs SIGKILL
    }
    for name, script in children.items():
        proc = spawn(name, ["sh", "-c", script], folder / f"{name}.log", folder, env)
        if watchdog is not None:
            watchdog.watch_group(proc.pid)
    (folder / "ready").write_text(str(watchdog.popen.pid if watchdog else 0))
    time.sleep(300)
""")


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {DEADLINE_S:g} s")
        time.sleep(0.2)


def _start_parent(tmp_path: Path, marker: str, test_marker: str, with_watchdog: bool) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, FLWR_SCALING_TEST_MARKER=test_marker)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, marker, str(tmp_path), "1" if with_watchdog else "0"],
                              env=env, start_new_session=True)
    _wait_for(lambda: (tmp_path / "ready").exists() or parent.poll() is not None, "the parent got ready")
    assert parent.poll() is None, "the parent exited early"
    # sh forks its background jobs after it started: wait until all six sleeps exist
    _wait_for(lambda: len(marked_pids(marker)) >= 6, "the children and their children started")
    return parent, int((tmp_path / "ready").read_text())


def _commands(pids: list[int]) -> list[str]:
    commands = []
    for pid in pids:
        try:
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            pass
    return sorted(commands)


def test_kill_9_of_the_parent_ends_every_child_grandchild_and_the_watchdog(tmp_path):
    marker, test_marker = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        parent, watchdog_pid = _start_parent(tmp_path, marker, test_marker, with_watchdog=True)
        started = _commands(marked_pids(marker))
        assert started.count("sleep 300") == 5 and len(started) >= 6, started
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        _wait_for(lambda: not marked_pids(marker), f"every marked process gone (left: {_commands(marked_pids(marker))})")
        _wait_for(lambda: not _alive(watchdog_pid), "the watchdog exited after its sweep")
    finally:
        kill_marked(test_marker)


def test_without_the_watchdog_the_kernel_still_ends_the_direct_children(tmp_path):
    """Layer 2 alone (prctl PR_SET_PDEATHSIG): each leader gets SIGTERM when the parent dies.
    The leaders' own children are the watchdog's job, so they are not asserted here."""
    marker, test_marker = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        parent, _ = _start_parent(tmp_path, marker, test_marker, with_watchdog=False)
        # the "group" and "session" leaders; "stubborn" ignores SIGTERM, so only the watchdog's SIGKILL ends it
        leaders = [pid for pid in marked_pids(marker) if _commands([pid])[0].endswith("& sleep 300")]
        assert len(leaders) == 2, _commands(marked_pids(marker))
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        _wait_for(lambda: not any(_alive(pid) for pid in leaders), "the leaders ended by their parent-death signal")
    finally:
        kill_marked(test_marker)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_dismissed_watchdog_exits_and_signals_nothing(tmp_path):
    marker = uuid.uuid4().hex
    watchdog = Watchdog(marker, os.environ)
    proc = spawn("sleeper", ["sleep", "300"], tmp_path / "sleeper.log", tmp_path,
                 dict(os.environ, **{MARKER_VARIABLE: marker}))
    try:
        watchdog.watch_group(proc.pid)
        watchdog.dismiss()
        assert watchdog.popen.returncode == 0
        assert proc.alive()
    finally:
        proc.stop()
    assert not proc.alive() and not marked_pids(marker)


def test_watch_reads_groups_and_exit_without_signalling(tmp_path):
    import io

    watch(io.BytesIO(b"+999999\n-999999\nexit\n+1\n"), marker="unused")  # returns at "exit": pid 1 untouched


def test_stopping_a_federation_ends_processes_that_left_its_groups(tmp_path):
    """``LocalFederation.stop`` also ends what Flower starts in sessions of its own (found by the marker)."""
    federation = LocalFederation(tmp_path / "work", secure=False)
    test_marker = uuid.uuid4().hex
    try:
        federation.spawn("superlink-like", ["sh", "-c", f"setsid sleep 300 & sleep 300 # {test_marker}"])
        _wait_for(lambda: len(marked_pids(federation.marker)) >= 2, "both sleeps started")
        assert federation.node_count == 0 and not (tmp_path / "work/certs").exists()  # insecure: no certificates
    finally:
        federation.stop()
        leftovers = marked_pids(federation.marker)
        kill_marked(federation.marker)
    assert leftovers == []
    assert federation.watchdog.popen.returncode == 0  # dismissed, not triggered


def test_deploy_local_insecure_warns_on_the_terminal(tmp_path, monkeypatch, capsys):
    """The warning reaches stderr before anything starts (here the work folder is a file, so nothing does)."""
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy-local", "--insecure", "--nodes", "1", "--rounds", "1", "--out", "out", "--workdir", "afile"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert err[0] == INSECURE_WARNING
    assert err[1].startswith(f"flwr-scaling: error: work folder '{tmp_path}/afile' cannot be used: "), err
    assert err[1].endswith("choose another --workdir"), err
    assert len(err) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_deploy_local_secure_does_not_warn(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x\n")
    with pytest.raises(SystemExit):
        main(["deploy-local", "--nodes", "1", "--rounds", "1", "--out", "out", "--workdir", "afile"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "warning" not in err[0], err
