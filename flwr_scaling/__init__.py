"""Scaled Local SGD (SAVIC) as a plugin for Flower.

The public names below load on first use: ``import flwr_scaling.cli`` (or any
submodule) stays as light as before, and no submodule imports this package's
top level, so no import cycle can pass through here.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "Preconditioner": "flwr_scaling.core.optimizer",
    "ScaledSGD": "flwr_scaling.core.optimizer",
    "preconditioner_from_message": "flwr_scaling.clients.preconditioner_message",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flwr_scaling' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
