"""Which data a node trains on, read from its node config.

A SuperNode (or a simulated node) is started with either

- ``partition-id=I num-partitions=N``: the demo split, partition ``I`` of the
  run's dataset divided among ``N`` clients (``N`` must equal ``num-clients``);
- ``data-path="SPEC"``: the device's own data, any dataset spec that
  the source registry (:mod:`flwr_scaling.data.sources`) understands (``libsvm:/data/local.svm``,
  ``csv:/data/local.csv``, ``parquet:...``, ``idx:DIR``), optionally with
  ``eval-path="SPEC"`` for a held-out part used by the ``evaluate`` handler,
  ``partition-id=I`` to fix the node's rank and seed (else the server ranks it
  by first sight and its seed is its node id, unique on the SuperLink),
  and ``standardize=true|false`` (default: true for tabular runs).

A node file must be in the feature space of the run's ``dataset``, whose
input shape and classes the server sends (``logic.model_keys``): a device
needs only its own file, not the run's dataset. Reading it is
:mod:`flwr_scaling.data.node_files`' job, this module picks which data a
node uses from its node config and the run configuration.

The client's code is the same in simulation and deployment; only the node
config differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_scaling.clients.logic import ModelShape, client_eval_partition, client_partition, run_model_shape, split_for_eval
from flwr_scaling.data.federated import Split
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


def reported_rank(node_config: Mapping[str, Any]) -> int | None:
    """The rank this node asks for: its ``partition-id``, or ``None`` (the server assigns one)."""
    return int(node_config[PARTITION_ID]) if PARTITION_ID in node_config else None


def node_key(node_config: Mapping[str, Any], cfg: RunConfig, node_id: int | None = None) -> int:
    """The node's seed: ``partition-id`` (checked), or for a node with its own file and
    no ``partition-id``, its ``node_id`` (unique on the SuperLink: two devices that use
    the same local path still draw different batches)."""
    if uses_own_data(node_config):
        if PARTITION_ID in node_config:
            return int(node_config[PARTITION_ID])
        if node_id is None:
            raise ConfigError("this node has its own 'data-path' but no 'partition-id' and no node id to seed it; "
                              "add partition-id=I (distinct per node) to its node config")
        return int(node_id)
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


def train_split(node_config: Mapping[str, Any], cfg: RunConfig, node_id: int | None = None,
                shape: ModelShape | None = None) -> Split:
    """The examples this node trains on: its demo partition (as ``logic.client_partition``),
    or its file (less a seeded 20 % when ``client-eval-every`` is on and there is no ``eval-path``).

    ``shape``: the model's input shape and classes as the server sent them
    (``logic.model_shape``); without it the run's dataset is loaded to learn them.
    """
    key = node_key(node_config, cfg, node_id)
    if not uses_own_data(node_config):
        return client_partition(cfg, key)
    split = _node_file(cfg, node_config, str(node_config[DATA_PATH]), shape)
    if cfg.client_eval_every and not node_config.get(EVAL_PATH):
        return split_for_eval(split, cfg.seed, key)[0]
    return split


def eval_split(node_config: Mapping[str, Any], cfg: RunConfig, node_id: int | None = None,
               shape: ModelShape | None = None) -> Split:
    """The examples the ``evaluate`` handler scores: ``eval-path`` if given, else the held-out
    20 % of the node's data with ``client-eval-every`` on, else all of it (``shape`` as in ``train_split``)."""
    key = node_key(node_config, cfg, node_id)
    if not uses_own_data(node_config):
        return client_eval_partition(cfg, key)
    if node_config.get(EVAL_PATH):
        return _node_file(cfg, node_config, str(node_config[EVAL_PATH]), shape)
    split = _node_file(cfg, node_config, str(node_config[DATA_PATH]), shape)
    return split_for_eval(split, cfg.seed, key)[1] if cfg.client_eval_every else split


def _node_file(cfg: RunConfig, node_config: Mapping[str, Any], spec: str, shape: ModelShape | None) -> Split:
    model = run_model_shape(cfg, shape)
    # Text labels go through the run config's mapping, so every node numbers the classes alike.
    return load_node_file(spec, cfg.label_column, model.input_shape, model.num_classes,
                          standardize_setting(node_config, model.input_shape), class_names(cfg.label_names))


__all__ = ["STANDARDIZE", "eval_split", "node_key", "reported_rank", "train_split", "uses_own_data"]
