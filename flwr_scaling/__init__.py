"""Scaled Local SGD (SAVIC) as a plugin for Flower.

The public names below load on first use (``flwr_scaling.run``, ``compare`` and
``sweep`` are the Python API of ``flwr_scaling/api.py``): ``import flwr_scaling.cli`` (or any
submodule) stays as light as before, and no submodule imports this package's
top level, so no import cycle can pass through here.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

# The package flwr_scaling/run (its __init__ imports nothing, so this stays light).
from flwr_scaling import run as _run_package


class _CallableRunPackage(types.ModuleType):
    """``flwr_scaling.run`` is the package of the backends, and, called, the Python API's ``run``.

    Python binds a subpackage to its parent's attribute of the same name, so
    a plain ``run`` function here would be replaced by the package as soon as
    any ``flwr_scaling.run.*`` module is imported; the package itself is made
    callable instead. ``flwr_scaling.api.run`` is the same function, by name.
    """

    def __call__(self, *args: Any, **kwargs: Any):
        from flwr_scaling.api import run

        return run(*args, **kwargs)


_run_package.__class__ = _CallableRunPackage

# Public name -> the module that defines it.
_EXPORTS = {
    "compare": "flwr_scaling.api",
    "sweep": "flwr_scaling.api",
    "RunConfig": "flwr_scaling.run.config",
    "ConfigError": "flwr_scaling.errors",
    "Preconditioner": "flwr_scaling.core.optimizer",
    "ScaledSGD": "flwr_scaling.core.optimizer",
    "preconditioner_from_message": "flwr_scaling.clients.preconditioner_message",
}

__all__ = sorted([*_EXPORTS, "run"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flwr_scaling' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {"run"})
