"""Child processes that cannot outlive the process that started them.

``deploy-local`` starts a SuperLink, SuperNodes and ``flwr run``; Flower in
turn starts SuperExec and app processes, some in sessions of their own. All
of them must stop when ``deploy-local`` stops, also when it is killed with
SIGKILL and cannot clean up. Three layers, each covering what the one before
cannot:

1. Every child gets a **marker**, an environment variable unique to its
   federation, which Flower's own processes inherit (they are started with
   the parent's environment). Stopping the federation ends every process
   that carries the marker, wherever Flower put it.
2. On Linux every direct child asks the kernel for a **parent-death signal**
   (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): when the thread that started it
   dies, SIGKILL included, the child gets SIGTERM. Flower's SuperExec and
   apps watch their parent's pid and exit after it.
3. A **watchdog** process in a session of its own holds the read end of a
   pipe whose write end only the parent holds. When the parent dies the pipe
   reaches end-of-file without the ``exit`` word, and the watchdog sends
   SIGTERM, then SIGKILL after a grace period, to every marked process and
   every process group it was told about.

Run as ``python -c "from flwr_scaling.deploy.processes import watch; watch()"``
for the watchdog. Linux is the target (``/proc`` and ``prctl``); elsewhere
layers 1 and 3 fall back to process groups and layer 2 is skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MARKER_VARIABLE = "FLWR_SCALING_FEDERATION"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
GRACE_S = 5.0  # how long a SIGTERMed process may take before SIGKILL


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (Linux).

    Runs in the child between fork and exec. If the parent died before the
    request took effect (the child was reparented already), the child exits
    at once instead of running unsupervised. Elsewhere it does nothing.
    """
    parent = os.getpid()
    libc = _libc()

    def preexec() -> None:
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _libc():
    """libc through ctypes on Linux (for prctl), else None. Loaded in the parent: the child must not import."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@dataclass
class Proc:
    """A started process in its own process group, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; also reaps stray children."""
        _signal_group(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.pid, signal.SIGKILL)  # children (flwr-clientapp, ...) may outlive the leader
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once: a device losing power."""
        _signal_group(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def spawn(name: str, argv: Sequence[str], log: Path, cwd: Path, env: Mapping[str, str]) -> Proc:
    """Start ``argv`` in a new session (its own process group) with a parent-death signal,
    stdout and stderr appended to ``log``."""
    with open(log, "ab") as handle:
        popen = subprocess.Popen(list(argv), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=str(cwd), env=dict(env), start_new_session=True,
                                 preexec_fn=parent_death_signal())
    return Proc(name, popen, log)


# --------------------------------------------------------------- the marker
def marked_pids(marker: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``MARKER_VARIABLE=marker`` (Linux ``/proc``).

    The caller's own pid is left out; zombies have an empty environment and
    are not listed (they are dead already, waiting to be reaped).
    """
    entry = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for folder in proc.iterdir():
        if not folder.name.isdigit() or int(folder.name) == os.getpid():
            continue
        try:
            environment = (folder / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        if entry in environment.split(b"\0"):
            found.append(int(folder.name))
    return found


def end_processes(marker: str | None, groups: Iterable[int] = (), grace_s: float = GRACE_S) -> None:
    """SIGTERM every marked process and process group, then SIGKILL what is left after ``grace_s``."""
    groups = set(groups)

    def targets() -> tuple[list[int], list[int]]:
        pids = marked_pids(marker) if marker else []
        return pids, [g for g in groups if _signal_group(g, 0)]

    pids, live_groups = targets()
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    for group in live_groups:
        _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (pids or live_groups) and time.monotonic() < deadline:
        time.sleep(0.2)
        pids, live_groups = targets()
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    for group in live_groups:
        _signal_group(group, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(group: int, sig: int) -> bool:
    """Signal a process group; False if it has no process left (signal 0 only checks)."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -------------------------------------------------------------- the watchdog
class Watchdog:
    """The parent's side of the watchdog: start it, tell it each new process group, dismiss it.

    Parameters
    ----------
    marker : str
        The federation's marker; the watchdog ends every process carrying it.
    env : mapping
        Environment for the watchdog process.
    """

    def __init__(self, marker: str, env: Mapping[str, str]) -> None:
        code = "from flwr_scaling.deploy.processes import watch; watch()"
        # Its own session: a kill of deploy-local's process group (a closed terminal) does not reach it.
        self.popen = subprocess.Popen([sys.executable, "-c", code, marker], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(env),
                                      start_new_session=True)
        self.pipe: IO[bytes] = self.popen.stdin

    def _send(self, line: str) -> None:
        try:
            self.pipe.write(f"{line}\n".encode())
            self.pipe.flush()
        except (BrokenPipeError, ValueError):  # the watchdog is gone, or dismissed
            pass

    def watch_group(self, group: int) -> None:
        self._send(f"+{group}")

    def forget_group(self, group: int) -> None:
        """The group was stopped cleanly: never signal it again (its number may be reused)."""
        self._send(f"-{group}")

    def dismiss(self) -> None:
        """Everything was stopped cleanly: the watchdog exits without signalling anything."""
        self._send("exit")
        try:
            self.pipe.close()
        except BrokenPipeError:
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def watch(stream: IO[bytes] | None = None, marker: str | None = None, grace_s: float = GRACE_S) -> None:
    """The watchdog's loop: read ``+group`` / ``-group`` / ``exit`` lines until end-of-file.

    End-of-file without ``exit`` means the parent died: end every process
    carrying ``marker`` (default: ``sys.argv[1]``) and every group still listed.
    """
    stream = stream if stream is not None else sys.stdin.buffer
    marker = marker if marker is not None else sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent's death ends it
    groups: set[int] = set()
    for raw in stream:
        line = raw.strip().decode(errors="replace")
        if line == "exit":
            return
        if line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    end_processes(marker, groups, grace_s)


__all__ = ["MARKER_VARIABLE", "Proc", "Watchdog", "end_processes", "marked_pids", "parent_death_signal", "spawn", "watch"]
