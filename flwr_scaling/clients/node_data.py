"""Which data a node trains on, read from its node config.

A SuperNode (or a simulated node) is started with either

- ``partition-id=I num-partitions=N``: the demo split, partition ``I`` of the
  run's dataset divided among ``N`` clients (``N`` must equal ``num-clients``);
- ``data-path="SPEC"``: the device's own data, any dataset spec that
  the source registry (:mod:`flwr_scaling.data.sources`) understands (``libsvm:/data/local.svm``,
  ``csv:/data/local.csv``, ``parquet:...``, ``idx:DIR``), optionally with
  ``eval-path="SPEC"`` for a held-out part used by the ``evaluate`` handler,
  ``partition-id=I`` to fix the node's rank and seed (else a hash of the path),
  and ``standardize=true|false`` (default: true for tabular runs).

A node file must be in the feature space of the run's ``dataset``; reading it
is :mod:`flwr_scaling.data.node_files`' job, this module picks which data a
node uses from its node config and the run configuration.

The client's code is the same in simulation and deployment; only the node
config differs.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from flwr_scaling.clients.logic import client_eval_partition, client_partition, split_for_eval
from flwr_scaling.data.federated import Split, load_federated_data
from flwr_scaling.data.node_files import STANDARDIZE, load_node_file, standardize_setting
from flwr_scaling.errors import ConfigError
from flwr_scaling.run.config import RunConfig, class_names

DATA_PATH = "data-path"
EVAL_PATH = "eval-path"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


def uses_own_data(node_config: Mapping[str, Any]) -> bool:
    """Whether the node trains on its own file (``data-path``) rather than a demo partition."""
    return bool(node_config.get(DATA_PATH))


def node_key(node_config: Mapping[str, Any], cfg: RunConfig) -> int:
    """The node's rank and seed: ``partition-id`` (checked), or for a node with
    its own file and no ``partition-id``, a stable hash of its ``data-path``."""
    if uses_own_data(node_config):
        if PARTITION_ID in node_config:
            return int(node_config[PARTITION_ID])
        return zlib.crc32(str(node_config[DATA_PATH]).encode()) & 0x7FFFFFFF
    if PARTITION_ID not in node_config:
        raise ConfigError(
            "this node has neither 'data-path' nor 'partition-id' in its node config; start the SuperNode with "
            "--node-config 'data-path=\"libsvm:/path/to/file\"' (its own data) or "
            "--node-config \"partition-id=0 num-partitions=N\" (a demo partition)"
        )
    partitions = int(node_config.get(NUM_PARTITIONS, cfg.num_clients))
    if partitions != cfg.num_clients:
        raise ConfigError(
            f"the node config says num-partitions={partitions} but the run has num-clients={cfg.num_clients}; make them equal"
        )
    return int(node_config[PARTITION_ID])


def train_split(node_config: Mapping[str, Any], cfg: RunConfig) -> Split:
    """The examples this node trains on: its demo partition (as ``logic.client_partition``),
    or its file (less a seeded 20 % when ``client-eval-every`` is on and there is no ``eval-path``)."""
    key = node_key(node_config, cfg)
    if not uses_own_data(node_config):
        return client_partition(cfg, key)
    split = _node_file(cfg, node_config, str(node_config[DATA_PATH]))
    if cfg.client_eval_every and not node_config.get(EVAL_PATH):
        return split_for_eval(split, cfg.seed, key)[0]
    return split


def eval_split(node_config: Mapping[str, Any], cfg: RunConfig) -> Split:
    """The examples the ``evaluate`` handler scores: ``eval-path`` if given, else the held-out
    20 % of the node's data with ``client-eval-every`` on, else all of it."""
    key = node_key(node_config, cfg)
    if not uses_own_data(node_config):
        return client_eval_partition(cfg, key)
    if node_config.get(EVAL_PATH):
        return _node_file(cfg, node_config, str(node_config[EVAL_PATH]))
    split = _node_file(cfg, node_config, str(node_config[DATA_PATH]))
    return split_for_eval(split, cfg.seed, key)[1] if cfg.client_eval_every else split


def _node_file(cfg: RunConfig, node_config: Mapping[str, Any], spec: str) -> Split:
    data = load_federated_data(cfg.data_spec())
    shape = tuple(data.input_shape)
    # Text labels go through the run config's mapping, so every node numbers the classes alike.
    return load_node_file(spec, cfg.label_column, shape, data.num_classes, standardize_setting(node_config, shape),
                          class_names(cfg.label_names))


__all__ = ["STANDARDIZE", "eval_split", "node_key", "train_split", "uses_own_data"]
