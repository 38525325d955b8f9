"""Which data a node trains on, read from its node config.

A SuperNode (or a simulated node) is started with either

- ``partition-id=I num-partitions=N``: the demo split, partition ``I`` of the
  run's dataset divided among ``N`` clients (``N`` must equal ``num-clients``);
- ``data-path="SPEC"``: the device's own data, any dataset spec that
  :mod:`flwr_scaling.data.sources` understands (``libsvm:/data/local.svm``,
  ``csv:/data/local.csv``, ``parquet:...``, ``idx:DIR``), optionally with
  ``eval-path="SPEC"`` for a held-out part used by the ``evaluate`` handler,
  ``partition-id=I`` to fix the node's rank and seed (else a hash of the path),
  and ``standardize=true|false`` (default: true for tabular runs).

A node file must be in the feature space of the run's ``dataset`` (the
server's test data): the same number of features (rows are reshaped to the
model's input shape; LIBSVM rows shorter than that are padded with zeros) and
labels that are already class indices ``0..K-1`` (``-1``/``+1`` is accepted
for two classes). Labels are never re-encoded per node: a node that holds only
classes 3 and 7 keeps them as 3 and 7.

The client's code is the same in simulation and deployment; only the node
config differs.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.data.federated import Split, load_federated_data
from flwr_scaling.data.sources import DataError, check_spec, parse_spec, read_libsvm
from flwr_scaling.clients.logic import _split_for_eval, client_eval_partition, client_partition

DATA_PATH = "data-path"
EVAL_PATH = "eval-path"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STANDARDIZE = "standardize"


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
        return _split_for_eval(split, cfg.seed, key)[0]
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
    return _split_for_eval(split, cfg.seed, key)[1] if cfg.client_eval_every else split


def _node_file(cfg: RunConfig, node_config: Mapping[str, Any], spec: str) -> Split:
    data = load_federated_data(cfg.data_spec())
    standardize = node_config.get(STANDARDIZE)
    if standardize is None:
        standardize = len(data.input_shape) == 1  # tabular runs are standardised, images are not
    elif isinstance(standardize, str):
        standardize = standardize.strip().lower() in ("1", "true", "yes")
    return _load_node_file(spec, cfg.label_column, tuple(data.input_shape), data.num_classes, bool(standardize))


@lru_cache(maxsize=4)
def _load_node_file(spec: str, label_column: str, input_shape: tuple[int, ...], num_classes: int, standardize: bool) -> Split:
    """Features reshaped to ``input_shape`` and labels kept as class indices."""
    from flwr_scaling.data.federated import sources

    kind, path = parse_spec(spec)
    if path is None:  # a bundled dataset: already encoded and scaled
        source = sources.load_source(spec, label_column)
        features, raw = source.features, source.labels
    else:
        path = Path(path).expanduser()
        check_spec(f"{kind}:{path}")
        if kind == "libsvm":
            raw, rows, width = read_libsvm(path)
            features = sources._dense(rows, max(width, int(np.prod(input_shape))))
        elif kind == "idx":
            pairs = sources._idx_pairs(path)
            features, raw = sources._idx_set(*pairs.get("train", next(iter(pairs.values()))))
        else:
            features, raw = sources._table_columns(path, kind, label_column)
    features = np.asarray(features, dtype=np.float32)
    expected = int(np.prod(input_shape))
    if features[0].size != expected:
        raise DataError(
            f"{spec}: {features[0].size} features per example, but the run's dataset has {expected} "
            f"(input shape {input_shape}); the node's file must be in the run's feature space"
        )
    features = features.reshape((len(features), *input_shape))
    if standardize:
        features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-12)
    return Split(features.astype(np.float32), _class_indices(spec, np.asarray(raw), num_classes))


def _class_indices(spec: str, raw: np.ndarray, num_classes: int) -> np.ndarray:
    values = np.unique(raw)
    if num_classes == 2 and set(values.tolist()) <= {-1.0, 1.0} and -1.0 in values:
        return ((raw + 1) // 2).astype(np.int64)
    if np.all(values == np.round(values)) and values.min() >= 0 and values.max() < num_classes:
        return raw.astype(np.int64)
    shown = ", ".join(f"{v:g}" for v in values[:6])
    raise DataError(
        f"{spec}: labels {shown}{'...' if len(values) > 6 else ''} are not class indices 0..{num_classes - 1} "
        f"(or -1/+1 for two classes); write the labels as the run's class indices"
    )


__all__ = ["eval_split", "node_key", "train_split", "uses_own_data"]
