"""What a client does in a round, on NumPy arrays in and out: shared by the
ClientApp and the serial reference loop, and free of Flower types."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..arrays import numpy_to_torch, torch_to_numpy
from ..config import RunConfig
from ..data import Split, load_federated_data, load_partition, make_loader
from ..models import build_model
from ..seeding import client_streams
from ..settings import train_settings
from ..training import compute_statistic, train_scaled

NumpyArrays = dict[str, np.ndarray]


@dataclass
class LocalRound:
    """A client's reply: its model, its statistic (global) or state (local), and metrics."""

    arrays: NumpyArrays
    payload: NumpyArrays | None
    num_examples: int
    train_loss: float


def client_partition(cfg: RunConfig, partition_id: int) -> Split:
    return load_partition(cfg.partition_spec(), partition_id)


@lru_cache(maxsize=4)
def _model(name: str, input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    # One model object per process, reloaded with the global arrays every round.
    return build_model(name, input_shape, num_classes)


def _loaded_model(cfg: RunConfig, arrays: NumpyArrays) -> torch.nn.Module:
    data = load_federated_data(cfg.data_spec())
    model = _model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(numpy_to_torch(arrays))
    return model


def local_round(
    cfg: RunConfig, split: Split, arrays: NumpyArrays, state: NumpyArrays | None, server_round: int, partition_id: int
) -> LocalRound:
    """Train from the global ``arrays`` (and state) for one round; ``cfg`` must be resolved."""
    model = _loaded_model(cfg, arrays)
    loader_seed, probes = client_streams(cfg.seed, server_round, partition_id)
    loader = make_loader(split, cfg.batch_size, loader_seed)
    result = train_scaled(model, loader, train_settings(cfg), numpy_to_torch(state) if state is not None else None, probes)
    payload = result.statistic if result.statistic is not None else result.state
    return LocalRound(
        arrays=torch_to_numpy(model.state_dict()),
        payload=torch_to_numpy(payload) if payload is not None else None,
        num_examples=result.num_examples,
        train_loss=result.train_loss,
    )


def local_statistic(cfg: RunConfig, split: Split, arrays: NumpyArrays, partition_id: int) -> NumpyArrays:
    """The warm-up statistic at the global ``arrays`` (no training)."""
    model = _loaded_model(cfg, arrays)
    loader_seed, probes = client_streams(cfg.seed, 0, partition_id)
    loader = make_loader(split, cfg.batch_size, loader_seed)
    statistic, _ = compute_statistic(model, loader, cfg.precond, cfg.warmup_batches, cfg.precond_probes, probes)
    return torch_to_numpy(statistic)
