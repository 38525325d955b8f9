"""``libsvm:FILE``: LIBSVM text (``label index:value ...``, 1-based indices), read into dense rows.

The rows become one dense float32 array, so its size is bounded before it is
allocated: a feature index far beyond memory (``1000000000000:1``) is refused
in one line naming the file and the line. ``.gz`` files are read through gzip.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from flwr_scaling.data.source_types import Source, SourceKind, check_files, encode_labels, gzip_errors, open_text
from flwr_scaling.errors import DataError

FLOAT32_BYTES = 4
MEMORY_SHARE = 0.5  # the dense rows may take at most this share of the machine's memory


def memory_bytes() -> int:
    """This machine's physical memory in bytes (a generous 64 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 * 2**30


def check_dense_size(path: Path, line: int, rows: int, width: int) -> None:
    """DataError before a (rows, width) float32 array larger than ``MEMORY_SHARE`` of memory is allocated."""
    needed, limit = rows * width * FLOAT32_BYTES, memory_bytes() * MEMORY_SHARE
    if needed > limit:
        raise DataError(
            f"{path}:{line}: feature index {width} makes the dense data {rows} x {width} float32 "
            f"({needed / 2**30:.3g} GiB), more than half this machine's memory ({limit * 2 / 2**30:.3g} GiB); "
            f"check the index, or reduce the features"
        )


def read_libsvm(path: Path) -> tuple[np.ndarray, list[dict[int, float]], int]:
    """Raw labels, sparse rows (0-based index -> value) and the largest index + 1."""
    labels, rows, width, widest = [], [], 0, 0
    limit = memory_bytes() * MEMORY_SHARE
    # A token is checked with str methods and math.isfinite rather than a regex and np.isfinite:
    # a9a is 1.6 million tokens, and this loop was most of a simulation's start-up (BENCHMARKS §4).
    with gzip_errors(path), open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            tokens = text.split()
            try:
                label = float(tokens[0])
            except ValueError:
                raise DataError(f"{path}:{number}: expected a numeric label first, got {tokens[0]!r}") from None
            if not math.isfinite(label):
                raise DataError(f"{path}:{number}: label {tokens[0]!r} is not a class; every row needs a finite label")
            labels.append(label)
            row, previous = {}, 0
            for token in tokens[1:]:
                index_text, colon, value_text = token.partition(":")
                if not (colon and value_text and index_text.isascii() and index_text.isdigit()):
                    raise DataError(f"{path}:{number}: expected index:value, got {token!r}")
                index = int(index_text)
                try:
                    value = float(value_text)
                except ValueError:
                    raise DataError(f"{path}:{number}: expected a number after {index}:, got {value_text!r}") from None
                if index < 1 or index <= previous:
                    raise DataError(f"{path}:{number}: indices must be 1-based and increasing, got {index} after {previous}")
                if not math.isfinite(value):
                    raise DataError(f"{path}:{number}: value {value_text!r} at index {index} is not finite")
                row[index - 1] = value
                previous = index
            rows.append(row)
            if previous > width:
                width, widest = previous, number
            # Checked as the file is read, so an absurd index fails at its line, before any array exists.
            if len(rows) * width * FLOAT32_BYTES > limit:
                check_dense_size(path, widest, len(rows), width)
    if not rows:
        raise DataError(f"{path}: no examples (expected lines 'label index:value ...')")
    return np.asarray(labels), rows, width


def dense_rows(rows: list[dict[int, float]], width: int) -> np.ndarray:
    """Sparse rows as a float32 (len(rows), width) array, zeros where a row has no value."""
    out = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        if row:
            out[i, list(row)] = list(row.values())
    return out


def load_libsvm(target: str, label_column: str, test_path: str) -> Source:
    """A LIBSVM file (and its test file), labels encoded as 0..K-1 the same way in both."""
    raw_labels, rows, width = read_libsvm(Path(target))
    if test_path:
        test_labels, test_rows, test_width = read_libsvm(Path(test_path))
        width = max(width, test_width)
        check_dense_size(Path(test_path), 1, len(rows) + len(test_rows), width)
        labels, test_y = encode_labels(raw_labels, test_labels)
        return Source(dense_rows(rows, width), labels, (width,), "logreg", (dense_rows(test_rows, width), test_y))
    (labels,) = encode_labels(raw_labels)
    return Source(dense_rows(rows, width), labels, (width,), "logreg")


def read_node_libsvm(target: str, label_column: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """A node's file: rows shorter than the run's ``num_features`` are padded with zeros (sparse rows end early)."""
    path = Path(target)
    raw, rows, width = read_libsvm(path)
    check_dense_size(path, 1, len(rows), max(width, num_features))
    return dense_rows(rows, max(width, num_features)), raw


LIBSVM = SourceKind("libsvm", load_libsvm, check=check_files, image=False, read_node=read_node_libsvm, text_labels=False)
