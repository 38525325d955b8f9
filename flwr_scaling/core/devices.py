"""Which torch device a process trains and evaluates on: ``--device auto|cpu|cuda|cuda:N|mps``.

The name travels in the run configuration and is resolved by each process
for itself (``resolve_device``): with ``auto`` a server without a GPU
evaluates on the CPU while clients with one train on it. Models and batches
live on the device; what goes on the wire is always moved to the CPU first
(``core.arrays.torch_to_numpy``), so the bytes are the same on every device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flwr_scaling.errors import ConfigError

AUTO = "auto"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def device_problem(name: object) -> str | None:
    """Why ``name`` is not a device name (one line), or None: a check of its spelling only."""
    if not isinstance(name, str):
        return f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}"
    kind, colon, index = name.partition(":")
    if name in (AUTO, "cpu", "cuda", "mps") or (kind == "cuda" and colon and index.isdigit()):
        return None
    return f"device: unknown value {name!r}; one of {', '.join(DEVICE_CHOICES)} (N a GPU index, e.g. cuda:0)"


def unavailable(name: str) -> str | None:
    """Why this machine cannot use device ``name`` (one line), or None when it can (``auto`` always can)."""
    spelling = device_problem(name)
    if spelling:
        return spelling
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return (f"device {name}: this machine has no CUDA GPU (torch {torch.__version__} sees none); "
                    f"use --device cpu or auto")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            return f"device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    if kind == "mps" and not torch.backends.mps.is_available():
        return "device mps: Apple's Metal (MPS) backend is not available on this machine; use --device cpu or auto"
    return None


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means on this machine: ``auto`` is CUDA when available, else the CPU.

    Raises
    ------
    ConfigError
        For a misspelt name, or a device this machine does not have (one line).
    """
    problem = unavailable(name)
    if problem:
        raise ConfigError(problem)
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cuda_available() -> bool:
    """Whether this machine has a CUDA GPU torch can use."""
    return torch.cuda.is_available()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch's CPU kernels on ``count`` threads for the duration of the block, then restore the count.

    The models here are small: a second thread gains little on an idle machine,
    and on a busy one an OpenMP thread that waits for a core stalls every kernel
    (measured on the loaded 2-core development machine: an a9a logreg round took
    12-19 s with two threads against 0.25 s with one; one ``add_`` of 1e5 floats
    3.5 ms against 8 µs; the simulation's round 1 at 1,000 a9a clients, which
    solves f*, took 38.7 s before its server used one thread and 11.2 s after, the
    latter on a quieter machine: BENCHMARKS §4).
    """
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


def run_threads() -> int:
    """Torch threads of a run's server and clients: ``OMP_NUM_THREADS``, else 1 (what each simulation actor gets)."""
    return int(os.environ.get("OMP_NUM_THREADS", "1"))
