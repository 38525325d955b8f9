"""Where data comes from: scikit-learn's bundled sets and local files.

A dataset is named by a string: ``digits``, ``breast_cancer``, ``wine``
(bundled, offline), or ``KIND:PATH`` with KIND one of

- ``libsvm:FILE``   LIBSVM text (``label index:value ...``, 1-based indices),
- ``idx:DIR``       MNIST-style IDX files (``*images-idx3-ubyte[.gz]`` and
                    ``*labels-idx1-ubyte[.gz]``; ``train-*`` and ``t10k-*``
                    become train and test when both are there),
- ``csv:FILE``      a header row, numeric columns, one of them the label,
- ``parquet:FILE``  numeric columns, one of them the label.

A corrupt file stops the run with one line naming the file, the line or byte
offset, and what was expected.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUNDLED = ("digits", "breast_cancer", "wine")
FILE_KINDS = ("libsvm", "idx", "csv", "parquet")
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class DataError(ValueError):
    """A dataset that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Source:
    """Features and labels as loaded, before any train/test split."""

    features: np.ndarray  # float32 (n, *input_shape)
    labels: np.ndarray  # int64 (n,), 0..num_classes-1
    input_shape: tuple[int, ...]
    default_model: str
    test: tuple[np.ndarray, np.ndarray] | None = None  # a separate test set, if the source has one
    standardize: bool = False  # scale features by the training split's mean and std (tabular data)


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``digits`` -> ("digits", None); ``libsvm:a9a`` -> ("libsvm", Path("a9a"))."""
    if spec in BUNDLED:
        return spec, None
    kind, sep, path = spec.partition(":")
    if not sep or kind not in FILE_KINDS or not path:
        close = difflib.get_close_matches(kind if sep else spec, BUNDLED + FILE_KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"dataset {spec!r} is neither a bundled dataset ({', '.join(BUNDLED)}) nor KIND:PATH "
            f"with KIND one of {', '.join(FILE_KINDS)} (e.g. libsvm:data/a9a){hint}"
        )
    return kind, Path(path)


def check_spec(spec: str, test_path: str = "") -> None:
    """Cheap checks before anything is loaded: the name, and that the files exist and can be read."""
    kind, path = parse_spec(spec)
    if path is None:
        if test_path:
            raise DataError(f"test-path is only for file datasets; {spec!r} has its own test split")
        return
    if kind == "idx":
        if not path.is_dir():
            raise DataError(f"idx dataset: {path} is not a directory")
        _idx_pairs(path)
    else:
        _readable(path)
    if test_path:
        if kind == "idx":
            raise DataError("test-path is not used with idx: put t10k-* files next to train-* in the directory")
        _readable(Path(test_path))


def _readable(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist or is not a file")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise DataError(f"data file {path} cannot be read: {error.strerror}") from None


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


# ---------------------------------------------------------------- LIBSVM
_TOKEN = re.compile(r"^([0-9]+):(\S+)$")


def read_libsvm(path: Path) -> tuple[np.ndarray, list[dict[int, float]], int]:
    """Raw labels, sparse rows (0-based index -> value) and the largest index + 1."""
    labels, rows, width = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            tokens = text.split()
            try:
                labels.append(float(tokens[0]))
            except ValueError:
                raise DataError(f"{path}:{number}: expected a numeric label first, got {tokens[0]!r}") from None
            row, previous = {}, 0
            for token in tokens[1:]:
                match = _TOKEN.match(token)
                if match is None:
                    raise DataError(f"{path}:{number}: expected index:value, got {token!r}")
                index = int(match.group(1))
                try:
                    value = float(match.group(2))
                except ValueError:
                    raise DataError(f"{path}:{number}: expected a number after {index}:, got {match.group(2)!r}") from None
                if index < 1 or index <= previous:
                    raise DataError(f"{path}:{number}: indices must be 1-based and increasing, got {index} after {previous}")
                if not np.isfinite(value):
                    raise DataError(f"{path}:{number}: value {match.group(2)!r} at index {index} is not finite")
                row[index - 1] = value
                previous = index
            rows.append(row)
            width = max(width, previous)
    if not rows:
        raise DataError(f"{path}: no examples (expected lines 'label index:value ...')")
    return np.asarray(labels), rows, width


def _dense(rows: list[dict[int, float]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        if row:
            out[i, list(row)] = list(row.values())
    return out


# ---------------------------------------------------------------- IDX
def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """An IDX array of unsigned bytes, checked against its header."""
    try:
        with _open(path) as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read as {'gzip' if path.suffix == '.gz' else 'IDX'}: {error}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: offset 0: expected a 4-byte IDX magic number, the file has {len(raw)} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: offset 0: expected IDX magic 0x{magic:08x} ({what}), found 0x{found:08x}")
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: offset 4: expected {dims} dimension sizes, the file ends at byte {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: offset {min(len(raw), expected)}: expected {expected} bytes for shape {list(shape)}, found {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_pairs(directory: Path) -> dict[str, tuple[Path, Path]]:
    """``{"train": (images, labels), "t10k": (...)}``, whichever prefixes are present."""
    pairs = {}
    for images in sorted(directory.glob("*images-idx3-ubyte*")):
        prefix = images.name.split("images-idx3-ubyte")[0]
        matches = sorted(directory.glob(f"{prefix}labels-idx1-ubyte*"))
        if matches:
            pairs[prefix.rstrip("-") or "data"] = (images, matches[0])
    if not pairs:
        raise DataError(f"{directory}: expected a pair of *images-idx3-ubyte[.gz] and *labels-idx1-ubyte[.gz] files")
    return pairs


def _idx_set(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC, "images")
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, "labels")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    return (images.astype(np.float32) / 255.0)[:, None, :, :], labels.astype(np.int64)


# ---------------------------------------------------------------- CSV / parquet
def _table_columns(path: Path, kind: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "csv":
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
        table = np.asarray(rows)
        names = header
    else:
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


def _encode_labels(*label_sets: np.ndarray) -> list[np.ndarray]:
    """Map the labels found (e.g. -1/+1, 1/2) to 0..K-1, the same way in every set."""
    classes = np.unique(np.concatenate(label_sets))
    if len(classes) < 2:
        raise DataError(f"expected at least 2 classes, found {len(classes)}")
    return [np.searchsorted(classes, labels).astype(np.int64) for labels in label_sets]


def load_source(spec: str, label_column: str = "label", test_path: str = "") -> Source:
    """Load a dataset by name (see the module docstring)."""
    kind, path = parse_spec(spec)
    if path is None:
        from .data import load_bundled

        return load_bundled(kind)
    check_spec(spec, test_path)
    if kind == "libsvm":
        raw_labels, rows, width = read_libsvm(path)
        if test_path:
            test_labels, test_rows, test_width = read_libsvm(Path(test_path))
            width = max(width, test_width)
            labels, test_y = _encode_labels(raw_labels, test_labels)
            return Source(_dense(rows, width), labels, (width,), "logreg", (_dense(test_rows, width), test_y))
        (labels,) = _encode_labels(raw_labels)
        return Source(_dense(rows, width), labels, (width,), "logreg")
    if kind == "idx":
        pairs = _idx_pairs(path)
        if "train" in pairs and "t10k" in pairs:
            x, y = _idx_set(*pairs["train"])
            test = _idx_set(*pairs["t10k"])
            return Source(x, y, x.shape[1:], "cnn", test)
        x, y = _idx_set(*next(iter(pairs.values())))
        return Source(x, y, x.shape[1:], "cnn")
    features, raw_labels = _table_columns(path, kind, label_column)
    shape = (features.shape[1],)
    if test_path:
        test_features, test_labels = _table_columns(Path(test_path), kind, label_column)
        if test_features.shape[1] != features.shape[1]:
            raise DataError(f"{test_path}: {test_features.shape[1]} feature columns, the training file has {features.shape[1]}")
        labels, test_y = _encode_labels(raw_labels, test_labels)
        return Source(features.astype(np.float32), labels, shape, "logreg",
                      (test_features.astype(np.float32), test_y), standardize=True)
    (labels,) = _encode_labels(raw_labels)
    return Source(features.astype(np.float32), labels, shape, "logreg", standardize=True)
