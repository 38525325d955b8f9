"""What a client does in a round, on NumPy arrays in and out: shared by the
ClientApp and the serial reference loop, and free of Flower types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from flwr_scaling.core.arrays import numpy_to_torch, torch_to_numpy
from flwr_scaling.errors import ConfigError
from flwr_scaling.run.config import RunConfig, parse_input_shape
from flwr_scaling.data.federated import Split, load_federated_data, load_partition, make_loader
from flwr_scaling.core.devices import resolve_device
from flwr_scaling.core.models import build_model
from flwr_scaling.core.seeding import client_streams, derived_seed
from flwr_scaling.clients.settings import train_settings
from flwr_scaling.core.local_sgd import compute_statistic
from flwr_scaling.methods import get_method

NumpyArrays = dict[str, np.ndarray]


@dataclass
class LocalRound:
    """A client's reply: its model, its statistic (global) or state (local), and metrics."""

    arrays: NumpyArrays
    payload: NumpyArrays | None
    num_examples: int
    train_loss: float


CLIENT_EVAL_FRACTION = 0.2

# Keys the server adds to the clients' configuration: the shape of the model's input and its number of classes.
INPUT_SHAPE_KEY = "model-input-shape"
NUM_CLASSES_KEY = "num-classes"
MODEL_KEYS = (INPUT_SHAPE_KEY, NUM_CLASSES_KEY)


@dataclass(frozen=True)
class ModelShape:
    """What building the model needs besides its name: the input shape of one example and the class count."""

    input_shape: tuple[int, ...]
    num_classes: int


def model_keys(input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The config entries that tell a client how to build the model (``model_shape`` reads them)."""
    return {INPUT_SHAPE_KEY: "x".join(str(n) for n in input_shape), NUM_CLASSES_KEY: int(num_classes)}


def model_shape(config: Mapping[str, Any]) -> ModelShape | None:
    """The model's shape from a client's config (``model_keys``), ``None`` when the server sent none."""
    if INPUT_SHAPE_KEY not in config:
        return None
    classes = config.get(NUM_CLASSES_KEY)
    if not isinstance(classes, int) or classes < 2:
        raise ConfigError(f"the server sent {NUM_CLASSES_KEY}={classes!r}; it must be an integer >= 2")
    return ModelShape(parse_input_shape(str(config[INPUT_SHAPE_KEY])), classes)


def run_model_shape(cfg: RunConfig, shape: ModelShape | None = None) -> ModelShape:
    """``shape``, or when not given (the serial loop, a server that sends none) the run dataset's, loaded."""
    if shape is not None:
        return shape
    data = load_federated_data(cfg.data_spec())
    return ModelShape(tuple(data.input_shape), data.num_classes)


def split_for_eval(split: Split, seed: int, partition_id: int) -> tuple[Split, Split]:
    """A seeded 80/20 split of a client's data into training and held-out parts."""
    order = np.random.default_rng(derived_seed(seed, partition_id, 0xE7A1)).permutation(len(split))
    held_out = max(1, int(round(CLIENT_EVAL_FRACTION * len(split))))
    train, evaluation = np.sort(order[held_out:]), np.sort(order[:held_out])
    return (Split(split.features[train], split.labels[train]), Split(split.features[evaluation], split.labels[evaluation]))


def client_partition(cfg: RunConfig, partition_id: int) -> Split:
    """The data this client trains on: its whole partition, or 80 % of it with client evaluation on."""
    split = load_partition(cfg.partition_spec(), partition_id)
    return split_for_eval(split, cfg.seed, partition_id)[0] if cfg.client_eval_every else split


def client_eval_partition(cfg: RunConfig, partition_id: int) -> Split:
    """The client's held-out 20 % (client evaluation on), else its whole partition."""
    split = load_partition(cfg.partition_spec(), partition_id)
    return split_for_eval(split, cfg.seed, partition_id)[1] if cfg.client_eval_every else split


@lru_cache(maxsize=4)
def _model(name: str, input_shape: tuple[int, ...], num_classes: int, device: str) -> torch.nn.Module:
    # One model object per process (and device), reloaded with the global arrays every round.
    return build_model(name, input_shape, num_classes).to(device)


def loaded_model(cfg: RunConfig, arrays: NumpyArrays, shape: ModelShape | None = None) -> torch.nn.Module:
    """This process's model object for ``cfg`` and ``shape`` (see ``run_model_shape``), holding the global ``arrays``."""
    shape = run_model_shape(cfg, shape)
    model = _model(cfg.model, shape.input_shape, shape.num_classes, str(resolve_device(cfg.device)))
    model.load_state_dict(numpy_to_torch(arrays))  # copies the CPU arrays onto the model's device
    return model


def local_round(
    cfg: RunConfig, split: Split, arrays: NumpyArrays, state: NumpyArrays | None, server_round: int, partition_id: int,
    shape: ModelShape | None = None,
) -> LocalRound:
    """Train from the global ``arrays`` (and state) for one round; ``cfg`` must be resolved."""
    model = loaded_model(cfg, arrays, shape)
    loader_seed, probes = client_streams(cfg.seed, server_round, partition_id)
    loader = make_loader(split, cfg.batch_size, loader_seed)
    settings = train_settings(cfg)
    # The method's trainer: scaled Local SGD (plain SGD with rule identity, FedProx's term when proximal), torch Adam, ...
    trainer = get_method(cfg.strategy).trainer
    result = trainer(model, loader, settings, numpy_to_torch(state) if state is not None else None, probes)
    payload = result.statistic if result.statistic is not None else result.state
    return LocalRound(
        arrays=torch_to_numpy(model.state_dict()),
        payload=torch_to_numpy(payload) if payload is not None else None,
        num_examples=result.num_examples,
        train_loss=result.train_loss,
    )


def local_statistic(cfg: RunConfig, split: Split, arrays: NumpyArrays, partition_id: int,
                    shape: ModelShape | None = None) -> NumpyArrays:
    """The warm-up statistic at the global ``arrays`` (no training)."""
    model = loaded_model(cfg, arrays, shape)
    loader_seed, probes = client_streams(cfg.seed, 0, partition_id)
    loader = make_loader(split, cfg.batch_size, loader_seed)
    statistic, _ = compute_statistic(model, loader, cfg.precond, cfg.warmup_batches, cfg.precond_probes, probes)
    return torch_to_numpy(statistic)
