"""Server-side updates of the model and the preconditioner, shared by the Flower
strategy and the serial reference loop so that both follow one definition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flwr_scaling.core.arrays import weighted_average
from flwr_scaling.core.rules import ScalingRule

NumpyArrays = dict[str, np.ndarray]


def warmup_state(statistics: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> NumpyArrays:
    """``v⁰ = Σ w_m s_m``: the weighted mean of the clients' statistics at x⁰."""
    return weighted_average(statistics, weights)


def next_state(
    rule: ScalingRule,
    mode: str,
    state: Mapping[str, np.ndarray] | None,
    payloads: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    beta: float,
) -> NumpyArrays:
    """The preconditioner state after one synchronisation.

    ``global``: ``v_{p+1} = update(v_p, Σ w_m s_m)`` (payloads are statistics);
    ``local``: ``v_{p+1} = Σ w_m v_m`` (payloads are the clients' states).
    A ``None`` state stands for v = 1 (``precond-init = "ones"``).
    """
    return state_from_average(rule, mode, state, weighted_average(payloads, weights), beta)


def state_from_average(
    rule: ScalingRule,
    mode: str,
    state: Mapping[str, np.ndarray] | None,
    average: Mapping[str, np.ndarray],
    beta: float,
) -> NumpyArrays:
    """``next_state`` from the payloads' weighted average ``Σ w_m p_m``, already computed.

    The strategy averages the payloads together with its value checks, so it
    hands the average over instead of the payloads.
    """
    if mode == "local":
        return dict(average)
    current = dict(state) if state is not None else rule.init(average)
    updated = rule.update(current, average, beta)
    return {k: np.asarray(v, dtype=np.float32) for k, v in updated.items()}


def next_model(
    current: Mapping[str, np.ndarray],
    average: Mapping[str, np.ndarray],
    server_lr: float,
) -> NumpyArrays:
    """``x_{p+1} = x_p + η (Σ w_m x_m − x_p)``; η = 1 is plain FedAvg."""
    if server_lr == 1.0:
        return dict(average)
    return {
        k: (current[k] + server_lr * (average[k].astype(np.float64) - current[k])).astype(current[k].dtype)
        for k in average
    }


def next_model_with_momentum(
    current: Mapping[str, np.ndarray],
    average: Mapping[str, np.ndarray],
    server_lr: float,
    momentum: float,
    velocity: Mapping[str, np.ndarray] | None,
) -> tuple[NumpyArrays, NumpyArrays | None]:
    """Server heavy ball on the averaged model change: ``m ← μ m + (Σ w_m x_m − x)``, ``x ← x + η m``.

    ``velocity`` is ``m`` before the round (``None``: zeros, the first round).
    Returns the new model and the new ``m``. ``momentum`` μ = 0 is exactly
    ``next_model`` (and keeps no ``m``: ``None``), so runs without server
    momentum are unchanged bit for bit. ``m`` is kept in float64 (the update
    is a small difference of float32 models); the model keeps its dtype.
    """
    if momentum == 0.0:
        return next_model(current, average, server_lr), None
    new_velocity = {}
    model = {}
    for key in average:
        change = average[key].astype(np.float64) - current[key]
        previous = velocity[key] if velocity is not None else 0.0
        new_velocity[key] = momentum * previous + change
        model[key] = (current[key] + server_lr * new_velocity[key]).astype(current[key].dtype)
    return model, new_velocity
