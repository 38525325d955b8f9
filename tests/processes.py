"""Stopping what a test started, found by a marker in the processes' environment."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_marked(marker: str, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process whose environment holds ``marker`` (e.g. a run and its Ray workers,
    or the SuperLink that `flwr run` leaves running)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc_dir / "environ").read_bytes():
                os.kill(int(proc_dir.name), sig)
        except OSError:
            continue
