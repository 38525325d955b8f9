"""Every random stream of a run derives from its ``--seed`` through these functions."""

from __future__ import annotations

import numpy as np
import torch

from flwr_scaling.core.models import build_model


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one stream (e.g. ``(seed, round, partition)``), stable across runs."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def client_streams(seed: int, server_round: int, partition_id: int) -> tuple[int, torch.Generator]:
    """One client's round: the seed of its batch order and the generator of its probes.

    Round 0 is the warm-up. Both depend only on ``(seed, round, partition)``,
    never on which process or node runs the client.
    """
    probes = torch.Generator().manual_seed(derived_seed(seed, server_round, partition_id, 2))
    return derived_seed(seed, server_round, partition_id, 1), probes


def initial_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> torch.nn.Module:
    """The model x⁰, initialised from ``seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, 0xC0DE))
        return build_model(name, input_shape, num_classes)
