"""Server side: the SAVIC strategy (a Flower ``FedAvg`` subclass), the FedOpt baselines and their collaborators."""

from flwr_scaling.strategies.savic import WARMUP_MESSAGE_TYPE, Savic

__all__ = ["Savic", "WARMUP_MESSAGE_TYPE"]
