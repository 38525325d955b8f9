"""Client side: the ClientApp and the plain training functions it runs."""

from ..training import TrainResult, TrainSettings, compute_statistic, evaluate, train_scaled
from .client_app import app
from .logic import LocalRound, local_round, local_statistic

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
