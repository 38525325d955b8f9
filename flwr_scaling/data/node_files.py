"""A node's own data file, read into the run's feature space (node side, no run configuration).

A node file must be in the feature space of the run's ``dataset`` (the
server's test data): the same number of features (rows are reshaped to the
model's input shape; LIBSVM rows shorter than that are padded with zeros) and
labels that are already class indices ``0..K-1`` (``-1``/``+1`` is accepted
for two classes), or, when the run's labels are text, the run's class names
(mapped through the run config's ``label-names``). Labels are never re-encoded per node: a node that holds only
classes 3 and 7 keeps them as 3 and 7. Any kind in the source registry
(:mod:`flwr_scaling.data.sources`) can be a node file.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from flwr_scaling.data.federated import Split
from flwr_scaling.data.sources import read_node_source
from flwr_scaling.errors import DataError

STANDARDIZE = "standardize"  # the node-config key; default: true for tabular runs


def standardize_setting(node_config: Mapping[str, Any], input_shape: tuple[int, ...]) -> bool:
    """The node config's ``standardize`` (``true``/``1``/``yes`` or a bool), else true for tabular runs."""
    standardize = node_config.get(STANDARDIZE)
    if standardize is None:
        return len(input_shape) == 1  # tabular runs are standardised, images are not
    if isinstance(standardize, str):
        return standardize.strip().lower() in ("1", "true", "yes")
    return bool(standardize)


@lru_cache(maxsize=4)
def load_node_file(spec: str, label_column: str, input_shape: tuple[int, ...], num_classes: int, standardize: bool,
                   label_names: tuple[str, ...] = ()) -> Split:
    """Features reshaped to ``input_shape`` and labels kept as class indices, or for a run with
    text labels mapped through the run's ``label_names`` (class i is ``label_names[i]``)."""
    expected = int(np.prod(input_shape))
    features, raw = read_node_source(spec, label_column, expected)
    features = np.asarray(features, dtype=np.float32)
    if features[0].size != expected:
        raise DataError(
            f"{spec}: {features[0].size} features per example, but the run's dataset has {expected} "
            f"(input shape {input_shape}); the node's file must be in the run's feature space"
        )
    features = features.reshape((len(features), *input_shape))
    if standardize:
        features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-12)
    if label_names:
        return Split(features.astype(np.float32), named_class_indices(spec, np.asarray(raw), label_names))
    return Split(features.astype(np.float32), class_indices(spec, np.asarray(raw), num_classes))


def named_class_indices(spec: str, raw: np.ndarray, label_names: tuple[str, ...]) -> np.ndarray:
    """Text labels as the run's class ids (the mapping travels in the run config, never rebuilt per node)."""
    texts = [format(value, "g") if isinstance(value, float) else str(value).strip() for value in raw.tolist()]
    ids = {name: index for index, name in enumerate(label_names)}
    unknown = sorted({text for text in texts if text not in ids})
    if unknown:
        raise DataError(f"{spec}: label {unknown[0]!r} is not one of the run's classes "
                        f"({', '.join(label_names[:6])}{'...' if len(label_names) > 6 else ''}); "
                        f"write the labels as the run's class names")
    return np.asarray([ids[text] for text in texts], dtype=np.int64)


def class_indices(spec: str, raw: np.ndarray, num_classes: int) -> np.ndarray:
    """``raw`` labels as int64 class indices: already ``0..num_classes-1``, or ``-1``/``+1`` for two classes."""
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
