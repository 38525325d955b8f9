"""Diagonal scaling rules: small pure functions over dicts of arrays.

Each rule is data, in the spirit of optax's gradient transformations: which
statistic it consumes, how the state absorbs a statistic, and how the state
becomes the diagonal ``D(v)``. Every function works element-wise on a dict of
arrays keyed like the model's trainable parameters, and accepts NumPy arrays
(server) or torch tensors (client) alike, because it only uses arithmetic
operators. The clipped diagonal ``D̂ = max(alpha, D(v))`` is the paper's
truncation and gives the lower bound ``alpha`` of its analysis.

Adding a rule is one ``ScalingRule(...)`` line in ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = Mapping[str, Any]  # dict of np.ndarray or torch.Tensor, keyed like the model

# The statistic a rule consumes, computed by the client at each step / probe.
STAT_NONE = "none"
STAT_GRAD_SQUARED = "grad-squared"  # g ⊙ g
STAT_HUTCHINSON = "hutchinson"  # z ⊙ (∇²f(x) z), z Rademacher


def _clip_min(array: Any, alpha: float) -> Any:
    """Element-wise ``max(alpha, array)`` for NumPy arrays and torch tensors."""
    if hasattr(array, "clamp"):  # torch.Tensor
        return array.clamp(min=alpha)
    # NumPy: a 0-d array comes back from arithmetic as a NumPy scalar.
    array = np.asarray(array)
    return np.maximum(array, np.asarray(alpha, dtype=array.dtype))


def _accumulate(state: Arrays, statistic: Arrays, beta: float) -> dict[str, Any]:
    # AdaGrad ignores beta: it sums every statistic it is given.
    del beta
    return {k: state[k] + statistic[k] for k in state}


def _moving_average(state: Arrays, statistic: Arrays, beta: float) -> dict[str, Any]:
    return {k: beta * state[k] + (1.0 - beta) * statistic[k] for k in state}


def _keep(state: Arrays, statistic: Arrays, beta: float) -> dict[str, Any]:
    del statistic, beta
    return dict(state)


def _sqrt(value: Any) -> Any:
    return value**0.5


def _abs(value: Any) -> Any:
    return abs(value)


def _one(value: Any) -> Any:
    return value * 0 + 1


@dataclass(frozen=True)
class ScalingRule:
    """One diagonal scaling rule.

    Parameters
    ----------
    name : str
        Registry name (``--precond``).
    statistic : str
        Which statistic the client computes: ``"none"``, ``"grad-squared"`` or
        ``"hutchinson"``.
    update_fn : callable
        ``(state, statistic, beta) -> state``, element-wise.
    diagonal_fn : callable
        ``D(v)`` for one array, element-wise.
    first_moment : bool
        Whether the client steps with a bias-corrected first moment (Adam).
    nonnegative : bool
        Whether the statistic and the state can never be negative (a negative
        value from a client is then a fault, not data).
    """

    name: str
    statistic: str
    update_fn: Callable[[Arrays, Arrays, float], dict[str, Any]]
    diagonal_fn: Callable[[Any], Any]
    first_moment: bool = False
    nonnegative: bool = True

    @property
    def has_state(self) -> bool:
        """Whether the rule keeps a preconditioner state at all."""
        return self.statistic != STAT_NONE

    def update(self, state: Arrays, statistic: Arrays, beta: float) -> dict[str, Any]:
        """Return the new state after absorbing ``statistic``."""
        return self.update_fn(state, statistic, beta)

    def diagonal(self, state: Arrays, alpha: float) -> dict[str, Any]:
        """Return the clipped diagonal ``D̂ = max(alpha, D(v))`` for every key."""
        return {k: _clip_min(self.diagonal_fn(v), alpha) for k, v in state.items()}


RULES: dict[str, ScalingRule] = {
    rule.name: rule
    for rule in (
        ScalingRule("identity", STAT_NONE, _keep, _one),
        ScalingRule("adagrad", STAT_GRAD_SQUARED, _accumulate, _sqrt),
        ScalingRule("rmsprop", STAT_GRAD_SQUARED, _moving_average, _sqrt),
        ScalingRule("adam", STAT_GRAD_SQUARED, _moving_average, _sqrt, first_moment=True),
        ScalingRule("oasis", STAT_HUTCHINSON, _moving_average, _abs, nonnegative=False),
    )
}


def get_rule(name: str) -> ScalingRule:
    """Look a rule up by name, with the list of known names on failure."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown scaling rule {name!r}; choose one of {', '.join(RULES)}"
        ) from None


def ones_like(arrays: Arrays) -> dict[str, Any]:
    """The ``precond-init = "ones"`` state: v = 1, so that D̂ = max(alpha, 1)."""
    return {k: v * 0 + 1 for k, v in arrays.items()}


def diagonal_bounds(diagonal: Arrays) -> tuple[float, float]:
    """Empirical ``(alpha_eff, Gamma_eff) = (min D̂, max D̂)`` over all arrays."""
    lows = [float(v.min()) for v in diagonal.values()]
    highs = [float(v.max()) for v in diagonal.values()]
    return min(lows), max(highs)
