"""``csv:FILE`` (a header row, numeric columns) and ``parquet:FILE`` (numeric columns):
one column is the label (``label-column``), the others are the features."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from flwr_scaling.data.source_types import Source, SourceKind, check_files, encode_labels
from flwr_scaling.errors import DataError


def _csv_table(path: Path, label_column: str) -> tuple[np.ndarray, list[str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}:1: expected a header row with a {label_column!r} column, the file is empty")
        if label_column not in header:
            raise DataError(f"{path}:1: no label column {label_column!r} in the header (columns: {', '.join(header[:8])})")
        rows = []
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{number}: expected {len(header)} fields, got {len(row)}")
            try:
                rows.append([float(value) for value in row])
            except ValueError:
                bad = next(v for v in row if not _is_float(v))
                raise DataError(f"{path}:{number}: expected numbers, got {bad!r}") from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return np.asarray(rows), header


def _parquet_table(path: Path, label_column: str) -> tuple[np.ndarray, list[str]]:
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file: {str(error).splitlines()[0]}") from None
    names = arrow.column_names
    if label_column not in names:
        raise DataError(f"{path}: no label column {label_column!r} (columns: {', '.join(names[:8])})")
    try:
        table = np.column_stack([np.asarray(arrow.column(n).to_numpy(zero_copy_only=False), dtype=np.float64) for n in names])
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: every column must be numeric ({error})") from None
    return table, names


def table_columns(path: Path, kind: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(features float64, raw labels) of a ``csv`` or ``parquet`` file, every feature finite."""
    table, names = (_csv_table if kind == "csv" else _parquet_table)(path, label_column)
    label_index = names.index(label_column)
    features = np.delete(table, label_index, axis=1)
    if not np.isfinite(features).all():
        row = int(np.argwhere(~np.isfinite(features))[0][0])
        raise DataError(f"{path}: data row {row + 1} holds a value that is not finite")
    return features, table[:, label_index]


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _table_kind(kind: str) -> SourceKind:
    """The registry entry of a table format: both formats share every step but the reading."""

    def load(target: str, label_column: str, test_path: str) -> Source:
        features, raw_labels = table_columns(Path(target), kind, label_column)
        shape = (features.shape[1],)
        if test_path:
            test_features, test_labels = table_columns(Path(test_path), kind, label_column)
            if test_features.shape[1] != features.shape[1]:
                raise DataError(f"{test_path}: {test_features.shape[1]} feature columns, the training file has {features.shape[1]}")
            labels, test_y = encode_labels(raw_labels, test_labels)
            return Source(features.astype(np.float32), labels, shape, "logreg",
                          (test_features.astype(np.float32), test_y), standardize=True)
        (labels,) = encode_labels(raw_labels)
        return Source(features.astype(np.float32), labels, shape, "logreg", standardize=True)

    def read_node(target: str, label_column: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        return table_columns(Path(target), kind, label_column)

    load.__doc__ = f"A {kind} file (and its test file): labels encoded as 0..K-1, features standardised later."
    read_node.__doc__ = f"A node's {kind} file: its feature columns and its labels as written."
    return SourceKind(kind, load, check=check_files, image=False, read_node=read_node)


CSV = _table_kind("csv")
PARQUET = _table_kind("parquet")
