"""What every data source shares: the loaded data (``Source``), the registry
entry that describes a kind of source (``SourceKind``) and small helpers.

This module is the bottom of the data layer: the modules of the built-in
sources (bundled, libsvm, idx, tables, hub) and the registry in
``flwr_scaling.data.sources`` import it, it imports none of them.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flwr_scaling.errors import DataError, first_line

IMAGE_DIMS = 3  # (channels, height, width): the CNN's input
RESNET_SHAPE = (3, 32, 32)  # CIFAR-10-shaped colour images: the ResNet's home ground
# Label fields that hold no class (compared lower-cased, after stripping spaces).
MISSING_LABELS = frozenset({"", "nan", "null", "none"})


def model_for_shape(input_shape: tuple[int, ...]) -> str:
    """The default model for data of ``input_shape``: the ResNet for 3x32x32 colour images,
    the CNN for other images, else logistic regression."""
    if tuple(input_shape) == RESNET_SHAPE:
        return "resnet"
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
    label_names: tuple[str, ...] = ()  # text labels: class i is label_names[i]; () for numeric labels

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
    text_labels
        Whether its labels may be text (mapped to class ids by sorted name):
        None (only loading tells) or False (always numbers), so a run on a
        source that never has text labels needs no load to know it.
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
    text_labels: bool | None = None

    @property
    def default_model(self) -> str | None:
        """The model a run uses when none is given; None when only the loaded data tells
        (images whose shape may call for the ResNet, or tables)."""
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


@contextmanager
def gzip_errors(path: Path) -> Iterator[None]:
    """A corrupt or truncated gzip stream, wherever it is found while reading, as one line naming ``path``."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as error:
        if path.suffix != ".gz" and not isinstance(error, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise DataError(f"{path}: cannot be read: {getattr(error, 'strerror', None) or error}") from None
        raise DataError(f"{path}: not a readable gzip stream ({first_line(error)}); "
                        f"decompress it to check it, or give the file uncompressed") from None



def open_text(path: Path) -> io.TextIOBase:
    """``path`` opened as UTF-8 text (a byte-order mark skipped, CRLF kept for the csv module),
    through gzip when it ends in ``.gz``; read it inside ``gzip_errors(path)``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def is_missing_label(value: object) -> bool:
    """Whether a label field holds no class: None, NaN or infinite, or empty / ``nan`` / ``null`` / ``none`` text."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in MISSING_LABELS
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_labels(labels: np.ndarray, where: Callable[[int], str], label_column: str) -> None:
    """DataError naming the first row whose label is missing (``where(row)`` says where that row is)."""
    for row, value in enumerate(labels.tolist()):
        if is_missing_label(value):
            shown = "an empty field" if isinstance(value, str) and not value.strip() else (
                "null" if value is None else repr(value if isinstance(value, str) else f"{value}"))
            raise DataError(f"{where(row)}: label column {label_column!r} holds no class ({shown}); "
                            f"every row needs a label: fill it in or remove the row")


def label_values(texts: list[str]) -> np.ndarray:
    """Label fields as numbers (float64) when every one is a number, else as text (stripped), for ``encode_labels``."""
    try:
        return np.asarray([float(text) for text in texts], dtype=np.float64)
    except ValueError:
        return np.asarray([text.strip() for text in texts], dtype=str)


def is_text(labels: np.ndarray) -> bool:
    """Whether ``labels`` are text (class names) rather than numbers."""
    return labels.dtype.kind in "USO"


def encode_labels(*label_sets: np.ndarray) -> list[np.ndarray]:
    """Map the labels found (e.g. -1/+1, 1/2, or 'cat'/'dog') to 0..K-1 in sorted order, the same way in every set."""
    return encode_named_labels(*label_sets)[0]


def encode_named_labels(*label_sets: np.ndarray) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """``encode_labels`` and the class names: text labels sorted (class i is names[i]), () for numbers."""
    text = [is_text(labels) for labels in label_sets]
    if any(text) and not all(text):
        raise DataError("the labels are numbers in one file and text in the other; write them the same way in both")
    if all(text):
        label_sets = tuple(labels.astype(str) for labels in label_sets)
    classes = np.unique(np.concatenate(label_sets))
    if len(classes) < 2:
        raise DataError(f"expected at least 2 classes, found {len(classes)}")
    names = tuple(str(name) for name in classes) if all(text) else ()
    return [np.searchsorted(classes, labels).astype(np.int64) for labels in label_sets], names
