"""``hf:NAME``: a Hugging Face Hub dataset (e.g. ``hf:ylecun/mnist``) loaded through
flwr-datasets' ``FederatedDataset``; its ``test`` split, if any, is the server's.

Features are found by themselves: the first image column (PIL images or 2-D
arrays, scaled to [0, 1], shape (channels, H, W)), else every numeric column
but the label. Whether the data are images is known only once loaded, so the
entry leaves the default model to the loaded data.
"""

from __future__ import annotations

import numpy as np

from flwr_scaling.data.source_types import Source, SourceKind, check_labels, encode_named_labels, model_for_shape
from flwr_scaling.errors import DataError, first_line

HUB_KIND = "hf"  # not a file: a dataset name on the Hugging Face Hub
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
        text = first_line(error)
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
        (labels, test_y), names = encode_named_labels(raw_labels, test_labels)
        test_pair = (test_features, test_y)
    else:
        (labels,), names = encode_named_labels(raw_labels)
        test_pair = None
    model = model_for_shape(tuple(features.shape[1:])) if image else "logreg"
    return Source(features, labels, tuple(features.shape[1:]), model, test_pair, standardize=not image, label_names=names)



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
    if raw_labels.ndim == 1:
        check_labels(raw_labels, lambda row: f"{label}: row {row}", label_column)
        if raw_labels.dtype == object and all(isinstance(value, str) for value in raw_labels.tolist()):
            raw_labels = raw_labels.astype(str)
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


def check_hub(target: str, test_path: str) -> None:
    """Nothing is fetched here (this also runs on every client): the name is checked when loaded."""
    if test_path:
        raise DataError("test-path is not used with hf: datasets; the dataset's own 'test' split is the server's")


def load_hub_source(target: str, label_column: str, test_path: str) -> Source:
    """The registry's loader: ``load_hub`` looked up when called, so a test can point it at local files."""
    return load_hub(target, label_column)


HUB = SourceKind(HUB_KIND, load_hub_source, check=check_hub, image=None)
