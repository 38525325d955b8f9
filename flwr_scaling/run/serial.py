"""The same algorithm in one process, without Flower: a reference for tuning and benchmarks.

It runs the identical client code (``local_round``), the identical server
updates (``aggregation``) and the identical data and seeds as the Flower
simulation, serially: the "physical limit" of a round on this machine.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from flwr_scaling.core.server_update import next_model_with_momentum, next_state, warmup_state
from flwr_scaling.core.arrays import numpy_to_torch, torch_to_numpy, weighted_average
from flwr_scaling.protocol.wire import decode, encode
from flwr_scaling.clients.logic import client_partition, local_round, local_statistic
from flwr_scaling.run.config import RunConfig
from flwr_scaling.methods import get_method
from flwr_scaling.data.federated import load_federated_data
from flwr_scaling.core.rules import diagonal_bounds, get_rule
from flwr_scaling.core.seeding import derived_seed, initial_model
from flwr_scaling.core.local_sgd import evaluate


@dataclass
class SerialRound:
    round: int
    test_loss: float
    test_accuracy: float
    train_loss: float
    precond_min: float
    precond_max: float
    wall_s: float


def over_the_wire(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """What the receiver of ``arrays`` gets with ``precond-dtype`` ``dtype`` (float32: the arrays themselves)."""
    encoded = encode(arrays, dtype=dtype)
    return decode(encoded.arrays, dtype=dtype, exponents=encoded.exponents)


def run_serial(config: RunConfig, exclude: frozenset[int] = frozenset()) -> tuple[list[SerialRound], dict[str, np.ndarray]]:
    """Run ``config`` serially; return one row per round and the final model.

    Partitions in ``exclude`` are sampled as usual but their training replies
    are dropped, as the server drops a faulty client's reply (their warm-up
    statistics still count).

    ``precond-dtype`` and ``precond-every`` act as in the simulation: the state
    and the statistics pass through the encoding, and clients train with the
    state of the last refresh round (1, 1 + K, ...). Every client here holds
    that version, as the strategy makes sure a sampled node does.
    """
    cfg = config.resolved()
    data = load_federated_data(cfg.data_spec())
    model = initial_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    rule = get_rule(cfg.precond)
    partitions = [client_partition(cfg, pid) for pid in range(cfg.num_clients)]
    test_x, test_y = data.test.tensors()
    sampler = random.Random(derived_seed(cfg.seed, 0x5A))
    global_arrays = torch_to_numpy(model.state_dict())
    state = None
    sent = None  # the state as the clients hold it: of the last refresh round, through the encoding
    server_step = None
    velocity = None  # the server heavy ball's m (server-momentum > 0)
    optimizer = get_method(cfg.strategy).server_optimizer
    if optimizer is not None:  # Flower's own FedAdam / FedYogi / FedAdagrad update
        from flwr_scaling.strategies.fedopt import FlowerServerStep

        server_step = FlowerServerStep(optimizer, eta=cfg.server_lr, tau=cfg.server_tau, eta_l=cfg.lr)
    rows = []
    for server_round in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        chosen = sorted(sampler.sample(range(cfg.num_clients), cfg.clients_per_round))
        if rule.has_state and state is None and cfg.precond_init == "warmup":
            stats = [over_the_wire(local_statistic(cfg, partitions[pid], global_arrays, pid), cfg.precond_dtype)
                     for pid in chosen]
            state = warmup_state(stats, [len(partitions[pid]) for pid in chosen])
        if (server_round - 1) % cfg.precond_every == 0:
            sent = over_the_wire(state, cfg.precond_dtype) if state is not None else None
        chosen = [pid for pid in chosen if pid not in exclude]
        weights = [len(partitions[pid]) for pid in chosen]
        low, high = diagonal_bounds(rule.diagonal(sent, cfg.precond_alpha)) if sent is not None else (1.0, 1.0)
        replies = [local_round(cfg, partitions[pid], global_arrays, sent, server_round, pid) for pid in chosen]
        average = weighted_average([r.arrays for r in replies], weights)
        if server_step is not None:
            global_arrays = server_step.step(server_round, global_arrays, average)
        else:
            global_arrays, velocity = next_model_with_momentum(global_arrays, average, cfg.server_lr,
                                                               cfg.server_momentum, velocity)
        if rule.has_state:
            payloads = [over_the_wire(r.payload, cfg.precond_dtype) for r in replies]
            state = next_state(rule, cfg.precond_mode, state, payloads, weights, cfg.precond_beta)
        model.load_state_dict(numpy_to_torch(global_arrays))
        test_loss, test_acc = evaluate(model, test_x, test_y)
        train_loss = float(np.average([r.train_loss for r in replies], weights=weights))
        rows.append(SerialRound(server_round, test_loss, test_acc, train_loss, low, high, time.perf_counter() - start))
    return rows, global_arrays
