"""Client side: the ClientApp and the plain training functions it runs."""

from flwr_scaling.core.local_sgd import TrainResult, TrainSettings, compute_statistic, evaluate, train_scaled
from flwr_scaling.clients.client_app import app
from flwr_scaling.clients.logic import LocalRound, local_round, local_statistic

__all__ = [
    "app",
    "LocalRound",
    "local_round",
    "local_statistic",
    "TrainResult",
    "TrainSettings",
    "compute_statistic",
    "evaluate",
    "train_scaled",
]
