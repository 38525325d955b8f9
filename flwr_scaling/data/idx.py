"""``idx:DIR``: MNIST-style IDX files (``*images-idx3-ubyte[.gz]`` and ``*labels-idx1-ubyte[.gz]``;
``train-*`` and ``t10k-*`` become train and test when both are there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flwr_scaling.data.source_types import Source, SourceKind, gzip_errors, open_binary
from flwr_scaling.errors import DataError

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """An IDX array of unsigned bytes, checked against its header."""
    with gzip_errors(path), open_binary(path) as handle:
        raw = handle.read()
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


def idx_pairs(directory: Path) -> dict[str, tuple[Path, Path]]:
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


def idx_set(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (n, 1, H, W) in [0, 1] and their labels, checked to be as many."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC, "images")
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, "labels")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    return (images.astype(np.float32) / 255.0)[:, None, :, :], labels.astype(np.int64)


def check_idx(target: str, test_path: str) -> None:
    """The directory exists and holds at least one images/labels pair; no separate test file."""
    path = Path(target)
    if not path.is_dir():
        raise DataError(f"idx dataset: {path} is not a directory")
    idx_pairs(path)
    if test_path:
        raise DataError("test-path is not used with idx: put t10k-* files next to train-* in the directory")


def load_idx(target: str, label_column: str, test_path: str) -> Source:
    """The ``train`` pair with ``t10k`` as the test set when both are there, else the one pair found."""
    pairs = idx_pairs(Path(target))
    if "train" in pairs and "t10k" in pairs:
        x, y = idx_set(*pairs["train"])
        return Source(x, y, x.shape[1:], "cnn", idx_set(*pairs["t10k"]))
    x, y = idx_set(*next(iter(pairs.values())))
    return Source(x, y, x.shape[1:], "cnn")


def read_node_idx(target: str, label_column: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """A node's directory: its ``train`` pair, else the one pair found."""
    pairs = idx_pairs(Path(target))
    return idx_set(*pairs.get("train", next(iter(pairs.values()))))


IDX = SourceKind("idx", load_idx, check=check_idx, image=True, read_node=read_node_idx, text_labels=False)
