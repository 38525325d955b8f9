"""``csv:FILE`` (a header row, numeric columns) and ``parquet:FILE`` (numeric columns):
one column is the label (``label-column``), the others are the features.

Labels are numbers or text (``'cat'``: class ids by sorted name); a row
without a label (empty, ``NaN``, ``null``) is refused, naming the file and the
row. CSV files may start with a UTF-8 byte-order mark, end lines with CRLF, and
be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from flwr_scaling.data.source_types import (
    Source,
    SourceKind,
    check_files,
    check_labels,
    encode_named_labels,
    gzip_errors,
    is_missing_label,
    label_values,
    open_text,
)
from flwr_scaling.errors import DataError


def _csv_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(feature columns float64, label fields as written, header); a BOM, CRLF and ``.gz`` are handled."""
    with gzip_errors(path), open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}:1: expected a header row with a {label_column!r} column, the file is empty")
            if label_column not in header:
                raise DataError(f"{path}:1: no label column {label_column!r} in the header (columns: {', '.join(header[:8])})")
            label_index = header.index(label_column)
            rows, labels = [], []
            for row in reader:
                number = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{number}: expected {len(header)} fields, got {len(row)}")
                label = row.pop(label_index)
                if is_missing_label(label):
                    check_labels(np.asarray([label]), lambda _: f"{path}:{number}", label_column)
                labels.append(label)
                try:
                    rows.append([float(value) for value in row])
                except ValueError:
                    bad = next(v for v in row if not _is_float(v))
                    raise DataError(f"{path}:{number}: expected numbers, got {bad!r}") from None
        except csv.Error as error:
            # e.g. "field larger than field limit (131072)" or a NUL byte: not a CSV table of numbers.
            raise DataError(f"{path}:{reader.line_num}: not a CSV table of numbers ({error})") from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    header.pop(label_index)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header)), label_values(labels), header


def _parquet_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(feature columns float64, labels as numbers or text, feature names) of a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file: {str(error).splitlines()[0]}") from None
    names = arrow.column_names
    if label_column not in names:
        raise DataError(f"{path}: no label column {label_column!r} (columns: {', '.join(names[:8])})")
    label_array = arrow.column(label_column)
    labels = label_array.to_numpy(zero_copy_only=False)
    if pa.types.is_string(label_array.type) or pa.types.is_large_string(label_array.type):
        check_labels(labels, lambda row: f"{path}: data row {row + 1}", label_column)
        labels = np.asarray([str(value).strip() for value in labels], dtype=str)
    else:
        try:
            labels = np.asarray(labels, dtype=np.float64)  # nulls become NaN, refused below
        except (TypeError, ValueError) as error:
            raise DataError(f"{path}: label column {label_column!r} must hold numbers or text ({error})") from None
        check_labels(labels, lambda row: f"{path}: data row {row + 1}", label_column)
    features = [n for n in names if n != label_column]
    try:
        table = np.column_stack([np.asarray(arrow.column(n).to_numpy(zero_copy_only=False), dtype=np.float64)
                                 for n in features]) if features else np.zeros((len(labels), 0))
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: every feature column must be numeric ({error})") from None
    return table, labels, features


def table_columns(path: Path, kind: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """(features float64, raw labels: numbers, or text when any label is not a number) of a
    ``csv`` or ``parquet`` file, every feature finite and every row labelled."""
    features, labels, _ = (_csv_table if kind == "csv" else _parquet_table)(path, label_column)
    if not np.isfinite(features).all():
        row = int(np.argwhere(~np.isfinite(features))[0][0])
        raise DataError(f"{path}: data row {row + 1} holds a value that is not finite")
    return features, labels


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
            (labels, test_y), names = encode_named_labels(raw_labels, test_labels)
            return Source(features.astype(np.float32), labels, shape, "logreg",
                          (test_features.astype(np.float32), test_y), standardize=True, label_names=names)
        (labels,), names = encode_named_labels(raw_labels)
        return Source(features.astype(np.float32), labels, shape, "logreg", standardize=True, label_names=names)

    def read_node(target: str, label_column: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        return table_columns(Path(target), kind, label_column)

    load.__doc__ = f"A {kind} file (and its test file): labels encoded as 0..K-1, features standardised later."
    read_node.__doc__ = f"A node's {kind} file: its feature columns and its labels as written."
    return SourceKind(kind, load, check=check_files, image=False, read_node=read_node)


CSV = _table_kind("csv")
PARQUET = _table_kind("parquet")
