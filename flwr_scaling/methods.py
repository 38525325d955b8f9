"""The method registry: one entry per ``--strategy`` value, carrying everything about it.

A method is what a label in a comparison names (``fedavg``, ``fedadam``,
``savic-adam-global``): how a client trains (its ``trainer``), what the
server does with the replies (plain averaging with ``server-lr``, the SAVIC
preconditioner on top when the method takes one, or a Flower FedOpt step
named by ``server_optimizer``), and its defaults (client step size, server
step size, scaling rule). ``RunConfig`` fills its ``None`` options from the
entry, the client and the server app choose their code from it, and the
command line lists the registered names; adding a method is one call,
``register_method(Method(...))``.

Labels: a method without a preconditioner is labelled by its name; one with
(``savic``) by ``<name>-<rule>-<mode>`` (``savic-adam-global``), except that
with the identity rule it is the method named by ``identity_label``.
``parse_label`` turns a label back into run options.

This module sits between the math (``flwr_scaling.core``) and everything that
runs it: it imports neither Flower nor the run configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from flwr_scaling.core.local_sgd import TrainResult, TrainSettings, train_local_adam, train_scaled
from flwr_scaling.core.rules import MODES, RULES, ScalingRule
from flwr_scaling.errors import ConfigError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# (model, loader, settings, state or None, probe generator) -> TrainResult; trains ``model`` in place.
ClientTrainer = Callable[[nn.Module, Batches, TrainSettings, "dict[str, torch.Tensor] | None", "torch.Generator | None"],
                         TrainResult]

# The server optimizers strategies/fedopt.py runs with Flower's own code (Reddi et al. 2020).
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")
# What ``compare`` runs when no --configs is given.
DEFAULT_COMPARE = ("fedavg", "savic-adam-global", "savic-adam-local", "savic-oasis-global")


def scaled_sgd(model: nn.Module, loader: Batches, settings: TrainSettings,
               state: dict[str, torch.Tensor] | None, generator: torch.Generator | None) -> TrainResult:
    """Scaled Local SGD (``train_scaled``); with the identity rule, plain Local SGD."""
    return train_scaled(model, loader, settings, state, generator)


def torch_adam(model: nn.Module, loader: Batches, settings: TrainSettings,
               state: dict[str, torch.Tensor] | None, generator: torch.Generator | None) -> TrainResult:
    """``torch.optim.Adam`` from a fresh state every round (``train_local_adam``); no preconditioner."""
    del state, generator  # nothing is exchanged but the model, and Adam draws no probes
    return train_local_adam(model, loader, settings)


@dataclass(frozen=True)
class Method:
    """One ``--strategy`` value.

    Parameters
    ----------
    name : str
        The ``--strategy`` value and, for a method without preconditioner, its label.
    summary : str
        A few words for the command line's help.
    trainer : callable (default: ``scaled_sgd``)
        The client's round: ``(model, loader, settings, state, generator) -> TrainResult``.
    scaled : bool (default: False)
        Whether the method takes a scaling rule (``--precond``) and exchanges its state.
    default_precond : str (default: "identity")
        The rule a run gets without ``--precond``; "identity" unless ``scaled``.
    lr : float, optional
        The client step size a run gets without ``--lr``; ``None``: the rule's
        ``default_lr`` for the run's mode.
    server_lr : float (default: 1.0)
        The server step size a run gets without ``--server-lr`` (1 is FedAvg's
        mean; Flower's ``eta`` for a server optimizer).
    server_optimizer : str, optional
        One of ``SERVER_OPTIMIZERS``: the server follows the average with that
        Flower FedOpt step. ``None``: the average itself (times ``server-lr``).
    proximal : bool (default: False)
        Whether the client adds FedProx's proximal term ``proximal-mu``.
    identity_label : str, optional
        The label of a ``scaled`` method run with the identity rule (savic: fedavg).
    """

    name: str
    summary: str
    trainer: ClientTrainer = scaled_sgd
    scaled: bool = False
    default_precond: str = "identity"
    lr: float | None = None
    server_lr: float = 1.0
    server_optimizer: str | None = None
    proximal: bool = False
    identity_label: str | None = None

    def default_lr(self, rule: ScalingRule, mode: str) -> float:
        """The client step size without ``--lr``: the method's own, else the rule's for ``mode``."""
        if self.lr is not None:
            return self.lr
        if rule.default_lr is None:
            raise ConfigError(f"scaling rule {rule.name!r} has no default step size; give one with --lr")
        return rule.default_lr[mode]

    def label(self, precond: str, mode: str) -> str:
        """The short name of a run of this method, e.g. ``fedadam`` or ``savic-adam-global``."""
        if not self.scaled:
            return self.name
        if precond == "identity" and self.identity_label:
            return self.identity_label
        return f"{self.name}-{precond}-{mode}"


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to ``METHODS`` (``--strategy method.name``), checking the entry first.

    Returns ``method``. ``replace=True`` allows replacing a registered method of the same name.
    """
    name = method.name
    if not name or any(c.isspace() for c in name) or "," in name:
        raise ValueError(f"a method name must be a non-empty word without spaces or commas, got {name!r}")
    if name in METHODS and not replace:
        raise ValueError(f"a method named {name!r} is registered already; pass replace=True to replace it")
    if method.default_precond not in RULES:
        raise ValueError(f"method {name!r}: unknown default_precond {method.default_precond!r}; "
                         f"choose one of {', '.join(RULES)}")
    if not method.scaled and method.default_precond != "identity":
        raise ValueError(f"method {name!r} takes no preconditioner, so its default_precond must be 'identity'")
    if method.server_optimizer is not None and method.server_optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"method {name!r}: unknown server_optimizer {method.server_optimizer!r}; "
                         f"choose one of {', '.join(SERVER_OPTIMIZERS)}")
    if method.scaled and method.server_optimizer is not None:
        raise ValueError(f"method {name!r}: a server optimizer's moments take the place of the preconditioner state; "
                         "a method cannot have both")
    for option, value in (("lr", method.lr), ("server_lr", method.server_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"method {name!r}: {option} must be finite and > 0, got {value}")
    METHODS[name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove the method ``name`` from ``METHODS`` and return it (tests and plugins clean up with it)."""
    try:
        return METHODS.pop(name)
    except KeyError:
        raise ValueError(f"no method named {name!r} is registered") from None


def get_method(name: str) -> Method:
    """Look a method up by name, with the list of known names on failure."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(METHODS)}") from None


def parse_label(label: str) -> dict[str, str]:
    """A label (``fedavg``, ``fedadam``, ``savic-<rule>-<mode>``) -> the run options it stands for."""
    method = METHODS.get(label)
    if method is not None and not method.scaled:
        return {"strategy": label}
    for method in METHODS.values():
        if method.scaled and label.startswith(f"{method.name}-"):
            rule, _, mode = label[len(method.name) + 1:].rpartition("-")
            if rule in RULES and mode in MODES:
                return {"strategy": method.name, "precond": rule, "precond-mode": mode}
    plain = "|".join(name for name, m in METHODS.items() if not m.scaled)
    scaled = " or ".join(f"{name}-<{'|'.join(RULES)}>-<{'|'.join(MODES)}>" for name, m in METHODS.items() if m.scaled)
    raise ConfigError(f"unknown configuration {label!r}; use {plain} or {scaled}, e.g. {', '.join(DEFAULT_COMPARE)}")


# Client step sizes of the baselines: those of the measured baselines in the
# design notes (targets.md); fedavg and savic take their rule's tuned step size.
# Registered in the order the command line lists them.
for _method in (
    Method("fedavg", "Local SGD"),
    Method("savic", "scaled Local SGD", scaled=True, default_precond="adam", identity_label="fedavg"),
    Method("fedadam", "FedAvg + Flower's FedAdam server step", lr=0.05, server_lr=0.1, server_optimizer="fedadam"),
    Method("fedyogi", "FedAvg + Flower's FedYogi server step", lr=0.05, server_lr=0.1, server_optimizer="fedyogi"),
    Method("fedadagrad", "FedAvg + Flower's FedAdagrad server step", lr=0.05, server_lr=0.1,
           server_optimizer="fedadagrad"),
    Method("fedprox", "Local SGD with a proximal term", lr=0.4, proximal=True),
    Method("local-adam", "torch Adam on the clients, FedAvg on the server", trainer=torch_adam, lr=0.01),
):
    register_method(_method)
del _method
