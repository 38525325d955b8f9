"""Where data comes from: scikit-learn's bundled sets and local files.

A dataset is named by a string: ``digits``, ``breast_cancer``, ``wine``
(bundled, offline), or ``KIND:PATH`` with KIND one of

- ``libsvm:FILE``   LIBSVM text (``label index:value ...``, 1-based indices),
- ``idx:DIR``       MNIST-style IDX files (``*images-idx3-ubyte[.gz]`` and
                    ``*labels-idx1-ubyte[.gz]``; ``train-*`` and ``t10k-*``
                    become train and test when both are there),
- ``csv:FILE``      a header row, numeric columns, one of them the label,
- ``parquet:FILE``  numeric columns, one of them the label,
- ``hf:NAME``       a Hugging Face Hub dataset (e.g. ``hf:ylecun/mnist``) loaded
                    through flwr-datasets' ``FederatedDataset``; its ``test``
                    split, if any, is the server's. Features are found by
                    themselves: the first image column (PIL images or 2-D
                    arrays, scaled to [0, 1], shape (channels, H, W)), else
                    every numeric column but the label.

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
HUB_KIND = "hf"  # not a file: a dataset name on the Hugging Face Hub
FILE_KINDS = ("libsvm", "idx", "csv", "parquet", HUB_KIND)
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
    if kind == HUB_KIND:
        # Nothing is fetched here (this also runs on every client): the name is checked when loaded.
        if test_path:
            raise DataError(f"test-path is not used with hf: datasets; the dataset's own 'test' split is the server's")
        return
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
    if kind == HUB_KIND:
        check_spec(spec, test_path)
        return load_hub(spec.partition(":")[2], label_column)
    if path is None:
        from flwr_scaling.data.federated import load_bundled

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



# ---------------------------------------------------------------- Hugging Face Hub
HUB_TEST_SPLIT = "test"


def load_hub(name: str, label_column: str = "label", **load_kwargs) -> Source:
    """A dataset through ``flwr_datasets.FederatedDataset(dataset=name, ...)``.

    ``load_kwargs`` go to ``datasets.load_dataset`` (through FederatedDataset):
    ``load_hub("parquet", data_files={"train": ..., "test": ...})`` runs this very
    code on local files, offline. FederatedDataset is the loader here; the
    clients' partitions are cut later by ``data.load_partition`` from the
    training split (after the 20 % holdout when there is no ``test`` split), as
    for every other source, so it gets a one-partition placeholder.
    """
    import os

    from flwr_datasets import FederatedDataset

    label = f"hf dataset {name!r}"
    fds = FederatedDataset(dataset=name, partitioners={"train": 1}, shuffle=False, **load_kwargs)
    try:
        train = fds.load_split("train")
    except Exception as error:  # datasets raises many types (offline, not found, bad split)
        text = _first_line(error)
        if "train" in text and "split" in text.lower():
            raise DataError(f"{label} has no 'train' split ({text})") from None
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        offline = (" (HF_DATASETS_OFFLINE is set: only datasets already in the local cache can be used)"
                   if offline and "Hub" in text else "")
        raise DataError(f"{label} cannot be loaded: {text}{offline}") from None
    try:
        test = fds.load_split(HUB_TEST_SPLIT)
    except ValueError:
        test = None
    features, raw_labels, image = _hub_columns(train, label, label_column)
    if test is not None:
        test_features, test_labels, _ = _hub_columns(test, f"{label} split 'test'", label_column, like=train)
        if test_features.shape[1:] != features.shape[1:]:
            raise DataError(
                f"{label}: 'test' features have shape {list(test_features.shape[1:])}, 'train' {list(features.shape[1:])}"
            )
        labels, test_y = _encode_labels(raw_labels, test_labels)
        test_pair = (test_features, test_y)
    else:
        (labels,) = _encode_labels(raw_labels)
        test_pair = None
    model = "cnn" if image else "logreg"
    return Source(features, labels, tuple(features.shape[1:]), model, test_pair, standardize=not image)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _hub_columns(split, label: str, label_column: str, like=None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(features float32, raw labels, is_image) of one split, the feature columns found by themselves."""
    names = list(split.column_names)
    if label_column not in names:
        raise DataError(f"{label}: no label column {label_column!r} (columns: {', '.join(names[:8])}); set label-column")
    if len(split) == 0:
        raise DataError(f"{label}: the split has no rows")
    schema = (like if like is not None else split).features
    if like is not None and set(like.column_names) - set(names):
        missing = sorted(set(like.column_names) - set(names))
        raise DataError(f"{label}: no column {missing[0]!r}, which the 'train' split has")
    image_column = next((n for n in names if n != label_column and _is_image_feature(schema[n])), None)
    raw_labels = np.asarray(split.with_format("numpy")[label_column])
    if raw_labels.ndim != 1 or raw_labels.dtype == object:
        raise DataError(f"{label}: label column {label_column!r} must hold one number or string per row")
    if image_column is not None:
        return _images(split, label, image_column), raw_labels, True
    numeric = [n for n in names if n != label_column and _is_numeric_feature(schema[n])]
    if not numeric:
        raise DataError(
            f"{label}: no feature columns: expected an image column or numeric columns besides {label_column!r} "
            f"(columns: {', '.join(names[:8])})"
        )
    table = split.select_columns(numeric).with_format("numpy")[:]
    features = np.column_stack([np.asarray(table[n], dtype=np.float64) for n in numeric])
    if not np.isfinite(features).all():
        row = int(np.argwhere(~np.isfinite(features))[0][0])
        raise DataError(f"{label}: row {row} holds a feature value that is not finite")
    return features.astype(np.float32), raw_labels, False


def _is_image_feature(feature) -> bool:
    from datasets import Array2D, Image, Sequence

    if isinstance(feature, (Image, Array2D)):
        return True
    # A list of lists of numbers (a 2-D array stored as nested lists).
    inner = getattr(feature, "feature", None) if isinstance(feature, Sequence) else (
        feature[0] if isinstance(feature, list) and len(feature) == 1 else None)
    if inner is None:
        return False
    inner2 = getattr(inner, "feature", None) if isinstance(inner, Sequence) else (
        inner[0] if isinstance(inner, list) and len(inner) == 1 else None)
    return inner2 is not None and _is_numeric_feature(inner2)


def _is_numeric_feature(feature) -> bool:
    from datasets import ClassLabel, Value

    if isinstance(feature, ClassLabel):
        return True
    return isinstance(feature, Value) and (
        feature.dtype.startswith(("int", "uint", "float")) or feature.dtype == "bool")


def _images(split, label: str, column: str) -> np.ndarray:
    """(n, channels, H, W) float32 in [0, 1]: grey images get 1 channel, others are made RGB (3)."""
    from datasets import Image

    feature = split.features[column]
    if isinstance(feature, Image):
        arrays = []
        for number, image in enumerate(split.select_columns([column])[column]):
            if image.mode not in ("L", "RGB"):
                image = image.convert("L" if image.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
            arrays.append(np.asarray(image))
            if arrays[-1].shape != arrays[0].shape:
                raise DataError(
                    f"{label}: image {number} in column {column!r} has shape {list(arrays[-1].shape)}, "
                    f"the first has {list(arrays[0].shape)}; every image must have the same size"
                )
        stacked = np.stack(arrays)
        scale = True  # 8-bit pixels
    else:
        try:
            raw = np.asarray(split.with_format("numpy")[column])
            stacked = raw.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{label}: column {column!r} holds arrays of different shapes; every image must have the same size") from None
        scale = raw.dtype.kind in "iub"
    if stacked.ndim == 3:  # (n, H, W) -> (n, 1, H, W)
        stacked = stacked[:, None]
    elif stacked.ndim == 4:  # (n, H, W, C) -> (n, C, H, W)
        stacked = np.moveaxis(stacked, -1, 1)
    else:
        raise DataError(f"{label}: column {column!r} holds arrays of shape {list(stacked.shape[1:])}, expected (H, W) images")
    features = stacked.astype(np.float32)
    if not np.isfinite(features).all():
        raise DataError(f"{label}: column {column!r} holds a value that is not finite")
    # Pixels 0..255 (8-bit images, integer arrays, or floats above 1) are scaled to [0, 1].
    if scale or features.max() > 1.0:
        features /= 255.0
    return features
