"""The training objective of the convex case and its minimum: the optimality gap f(x) - f*.

For ``logreg`` the federated objective is convex: f(x) = mean cross-entropy over
the pooled training data (the clients' objectives weighted by their sizes, as
FedAvg weights them). f* comes from a full-batch solver run once per run:
L-BFGS in float64 on the same model and data, from zero, until the gradient
norm is below ``GRADIENT_TOLERANCE``. The paper's theory bounds f(x_t) - f*,
so this column is what its rates can be checked against.

When the data are linearly separable the infimum is 0 and is not attained;
the solver then returns a small positive value and the gap is only
meaningful while it is much larger than that (a9a is not separable).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from flwr_scaling.data.federated import DataSpec, load_federated_data

GRADIENT_TOLERANCE = 1e-7
MAX_ITERATIONS = 500
BATCH = 8192  # rows per chunk when evaluating f in float64


def _flat(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(features.reshape(len(features), -1)).double()


def objective(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the linear model ``features @ weight.T + bias`` (float64)."""
    total = features.new_zeros(())
    for start in range(0, len(labels), BATCH):
        logits = features[start:start + BATCH] @ weight.T + bias
        total = total + F.cross_entropy(logits, labels[start:start + BATCH], reduction="sum")
    return total / len(labels)


@lru_cache(maxsize=4)
def _training_tensors(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled training split as float64 rows and labels, converted once per process (the gap is
    evaluated every round)."""
    data = load_federated_data(spec)
    return _flat(data.train.features), torch.from_numpy(data.train.labels)


@lru_cache(maxsize=4)
def optimal_objective(spec: DataSpec) -> float:
    """f*: the minimum of the mean training cross-entropy of multinomial logistic regression on ``spec``."""
    data = load_federated_data(spec)
    features, labels = _training_tensors(spec)
    weight = torch.zeros(data.num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(data.num_classes, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITERATIONS, tolerance_grad=GRADIENT_TOLERANCE,
                               tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = objective(weight, bias, features, labels)
        loss.backward()
        return loss

    solver.step(closure)
    with torch.no_grad():
        return float(objective(weight, bias, features, labels))


def training_objective(arrays: dict[str, np.ndarray], spec: DataSpec) -> float:
    """f(x) for the global ``logreg`` model ``arrays`` (its one Linear layer), in float64."""
    weight_key = next(key for key in arrays if key.endswith("weight"))
    bias_key = next(key for key in arrays if key.endswith("bias"))
    weight = torch.from_numpy(np.asarray(arrays[weight_key], dtype=np.float64))
    bias = torch.from_numpy(np.asarray(arrays[bias_key], dtype=np.float64))
    with torch.no_grad():
        return float(objective(weight, bias, *_training_tensors(spec)))


def optimality_gap(arrays: dict[str, np.ndarray], spec: DataSpec) -> float:
    """f(x) - f* (>= 0 up to the solver's tolerance)."""
    return training_objective(arrays, spec) - optimal_objective(spec)
