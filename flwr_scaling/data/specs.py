"""Which data a run uses, as a hashable value (the key of ``load_federated_data``'s cache)."""

from __future__ import annotations

from dataclasses import dataclass

EVAL_SPLITS = ("test", "validation")


@dataclass(frozen=True)
class DataSpec:
    """Which data, split how: everything ``load_federated_data`` depends on (and its cache key)."""

    dataset: str = "digits"
    seed: int = 0
    eval_split: str = "test"
    label_column: str = "label"
    test_path: str = ""
    input_shape: tuple[int, ...] = ()  # flat features reshaped to this (e.g. (1, 8, 8)); () keeps the source's
