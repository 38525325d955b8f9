"""What every data source shares: the loaded data (``Source``), the registry
entry that describes a kind of source (``SourceKind``) and small helpers.

This module is the bottom of the data layer: the modules of the built-in
sources (bundled, libsvm, idx, tables, hub) and the registry in
``flwr_scaling.data.sources`` import it, it imports none of them.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flwr_scaling.errors import DataError

IMAGE_DIMS = 3  # (channels, height, width): the CNN's input


def model_for_shape(input_shape: tuple[int, ...]) -> str:
    """The default model for data of ``input_shape``: the CNN for images, else logistic regression."""
    return "cnn" if len(input_shape) == IMAGE_DIMS else "logreg"


@dataclass(frozen=True)
class Source:
    """Features and labels as loaded, before any train/test split.

    ``default_model`` left empty is filled from the shape (``model_for_shape``).
    """

    features: np.ndarray  # float32 (n, *input_shape)
    labels: np.ndarray  # int64 (n,), 0..num_classes-1
    input_shape: tuple[int, ...]
    default_model: str = ""
    test: tuple[np.ndarray, np.ndarray] | None = None  # a separate test set, if the source has one
    standardize: bool = False  # scale features by the training split's mean and std (tabular data)

    def __post_init__(self) -> None:
        if not self.default_model:
            object.__setattr__(self, "default_model", model_for_shape(tuple(self.input_shape)))


# (target, label_column, test_path) -> Source; target is the part after "KIND:" ("" for a named source).
Loader = Callable[[str, str, str], Source]
# (target, test_path) -> None, raising DataError: cheap, nothing is loaded.
Checker = Callable[[str, str], None]
# (target, label_column, num_features) -> (features, labels as written in the file).
NodeReader = Callable[[str, str, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SourceKind:
    """One registry entry: a kind of dataset and everything the driver and the nodes need to know about it.

    Parameters
    ----------
    name
        ``digits`` for a named source (the spec is the name) or ``libsvm`` for
        a path kind (the spec is ``libsvm:PATH``).
    load
        ``load(target, label_column, test_path) -> Source``; ``target`` is the
        part after ``KIND:`` (``""`` for a named source).
    takes_path
        Whether specs are ``NAME:PATH`` (True) or just ``NAME`` (False).
    check
        ``check(target, test_path)``: cheap checks before anything is loaded
        (the files exist and can be read), raising a one-line DataError. It
        also runs on every client, so it must not fetch anything.
    image
        Whether the source holds images (True), tables (False) or either,
        known only once loaded (None). It decides the default model.
    read_node
        ``read_node(target, label_column, num_features) -> (features, labels)``:
        a node's own file with its labels as written (they are checked against
        the run's classes, never re-encoded). None: ``load`` without a test
        path, its labels taken as they are.
    num_examples
        Examples of a named source, known without loading (bounds num-clients
        before anything runs), or None.
    """

    name: str
    load: Loader
    takes_path: bool = True
    check: Checker | None = None
    image: bool | None = None
    read_node: NodeReader | None = None
    num_examples: int | None = None

    @property
    def default_model(self) -> str | None:
        """The model a run uses when none is given; None when only the loaded data tells."""
        return None if self.image is None else ("cnn" if self.image else "logreg")


def check_readable(path: Path) -> None:
    """DataError unless ``path`` is a file that can be opened and read."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist or is not a file")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise DataError(f"data file {path} cannot be read: {error.strerror}") from None


def check_files(target: str, test_path: str) -> None:
    """The data file (and the test file, if any) exist and can be read: the check of single-file kinds."""
    check_readable(Path(target))
    if test_path:
        check_readable(Path(test_path))


def open_binary(path: Path):
    """``path`` opened for reading bytes, through gzip when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def encode_labels(*label_sets: np.ndarray) -> list[np.ndarray]:
    """Map the labels found (e.g. -1/+1, 1/2) to 0..K-1, the same way in every set."""
    classes = np.unique(np.concatenate(label_sets))
    if len(classes) < 2:
        raise DataError(f"expected at least 2 classes, found {len(classes)}")
    return [np.searchsorted(classes, labels).astype(np.int64) for labels in label_sets]
