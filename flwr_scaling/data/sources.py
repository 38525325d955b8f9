"""Where data comes from: the registry of data sources, the one place to add one.

A dataset is named by a string: ``digits``, ``breast_cancer``, ``wine``
(bundled, offline: :mod:`flwr_scaling.data.bundled`), or ``KIND:PATH`` with KIND one of

- ``libsvm:FILE``   LIBSVM text (:mod:`flwr_scaling.data.libsvm`),
- ``idx:DIR``       MNIST-style IDX files (:mod:`flwr_scaling.data.idx`),
- ``csv:FILE``      a header row, numeric columns, one of them the label,
- ``parquet:FILE``  numeric columns, one of them the label (both :mod:`flwr_scaling.data.tables`),
- ``hf:NAME``       a Hugging Face Hub dataset (:mod:`flwr_scaling.data.hub`).

Each kind is one ``SourceKind`` entry: how to load it, how to check a spec
cheaply before anything is loaded, whether it holds images (which decides the
default model) and how a node reads its own file of that kind. The driver
(``flwr_scaling.data.federated.load_federated_data``), the node-side loader
(``flwr_scaling.data.node_files``) and the run configuration all ask this
registry, so a kind added with ``register_source(...)`` works everywhere.

A corrupt file stops the run with one line naming the file, the line or byte
offset, and what was expected.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path

import numpy as np

from flwr_scaling.data.bundled import BUNDLED_KINDS
from flwr_scaling.data.hub import HUB, HUB_KIND, load_hub
from flwr_scaling.data.idx import IDX, read_idx
from flwr_scaling.data.libsvm import LIBSVM, read_libsvm
from flwr_scaling.data.source_types import Checker, Loader, NodeReader, Source, SourceKind
from flwr_scaling.data.tables import CSV, PARQUET
from flwr_scaling.errors import DataError

_KINDS: dict[str, SourceKind] = {}


def register_source(
    name: str,
    load: Loader,
    *,
    takes_path: bool = True,
    check: Checker | None = None,
    image: bool | None = None,
    read_node: NodeReader | None = None,
    num_examples: int | None = None,
) -> SourceKind:
    """Add a kind of dataset; see ``SourceKind`` for what each argument means.

    ``register_source("npz", load_npz)`` makes ``--dataset npz:FILE`` work for
    the driver, the clients and the configuration checks. Raises ValueError
    for a name that is taken, empty or holds ``:``.
    """
    return _add(SourceKind(name, load, takes_path, check, image, read_node, num_examples))


def _add(kind: SourceKind) -> SourceKind:
    name = kind.name
    if not name or ":" in name or name != name.strip():
        raise ValueError(f"a data source name must be non-empty, without ':' or surrounding spaces, got {name!r}")
    if name in _KINDS:
        raise ValueError(f"data source {name!r} is already registered; unregister_source({name!r}) first")
    if kind.num_examples is not None and kind.takes_path:
        raise ValueError(f"num_examples is only for named sources; {name!r} takes a path whose size is known once loaded")
    _KINDS[name] = kind
    return kind


def unregister_source(name: str) -> None:
    """Remove a kind added with ``register_source`` (KeyError if there is none)."""
    del _KINDS[name]


for _builtin in (*BUNDLED_KINDS, LIBSVM, IDX, CSV, PARQUET, HUB):
    _add(_builtin)


def named_sources() -> tuple[str, ...]:
    """Datasets named by a word alone (``digits``), in registration order."""
    return tuple(name for name, kind in _KINDS.items() if not kind.takes_path)


def path_kinds() -> tuple[str, ...]:
    """The KINDs of ``KIND:PATH`` datasets, in registration order."""
    return tuple(name for name, kind in _KINDS.items() if kind.takes_path)


def find_source(spec: str) -> tuple[SourceKind, str]:
    """The entry of ``spec`` and its target (the part after ``KIND:``, ``""`` for a named source)."""
    kind = _KINDS.get(spec)
    if kind is not None and not kind.takes_path:
        return kind, ""
    name, sep, target = spec.partition(":")
    kind = _KINDS.get(name)
    if not sep or kind is None or not kind.takes_path or not target:
        named, kinds = named_sources(), path_kinds()
        close = difflib.get_close_matches(name if sep else spec, named + kinds, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"dataset {spec!r} is neither a bundled dataset ({', '.join(named)}) nor KIND:PATH "
            f"with KIND one of {', '.join(kinds)} (e.g. libsvm:data/a9a){hint}"
        )
    return kind, target


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``digits`` -> ("digits", None); ``libsvm:a9a`` -> ("libsvm", Path("a9a"))."""
    kind, target = find_source(spec)
    return kind.name, Path(target) if kind.takes_path else None


def check_spec(spec: str, test_path: str = "") -> None:
    """Cheap checks before anything is loaded: the name, and that the files exist and can be read."""
    kind, target = find_source(spec)
    if not kind.takes_path:
        if test_path:
            raise DataError(f"test-path is only for file datasets; {spec!r} has its own test split")
        return
    if kind.check is not None:
        kind.check(target, test_path)


def load_source(spec: str, label_column: str = "label", test_path: str = "") -> Source:
    """Load a dataset by name (see the module docstring), after its cheap checks."""
    kind, target = find_source(spec)
    check_spec(spec, test_path)
    source = kind.load(target, label_column, test_path)
    if kind.image is not None and source.default_model != kind.default_model:
        # The entry promised a shape of data; the model chosen before loading must fit what came.
        source = replace(source, default_model=kind.default_model)
    return source


def read_node_source(spec: str, label_column: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """A node's own data: (features, labels as the file writes them), the path's ``~`` expanded.

    ``num_features`` is the run's feature count, for formats whose rows may be
    shorter (LIBSVM). A kind without a node reader is loaded as the driver
    loads it, its labels as loaded.
    """
    kind, target = find_source(spec)
    if kind.takes_path:
        target = str(Path(target).expanduser())
        check_spec(f"{kind.name}:{target}")
    if kind.read_node is None:
        source = kind.load(target, label_column, "")
        return source.features, source.labels
    return kind.read_node(target, label_column, num_features)


def source_default_model(spec: str) -> str | None:
    """The model a run on ``spec`` uses when none is given, or None when only loading the data tells."""
    return find_source(spec)[0].default_model


def source_size(spec: str) -> int | None:
    """Examples in ``spec`` known without loading it (named sources that declare it), else None."""
    kind = _KINDS.get(spec)
    return kind.num_examples if kind is not None else None


BUNDLED = named_sources()  # the built-in named sources; ask named_sources() for the registered ones
FILE_KINDS = path_kinds()  # likewise, path_kinds()

__all__ = [
    "BUNDLED", "FILE_KINDS", "HUB_KIND", "DataError", "Source", "SourceKind", "check_spec", "find_source",
    "load_hub", "load_source", "named_sources", "parse_spec", "path_kinds", "read_idx", "read_libsvm",
    "read_node_source", "register_source", "source_default_model", "source_size", "unregister_source",
]
