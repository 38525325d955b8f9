"""The registry of partitioners: how the training split is divided among clients.

Built in, all from flwr-datasets:

- ``dirichlet``: ``DirichletPartitioner`` over the labels (``dirichlet_alpha``,
  at least MIN_PARTITION_SIZE examples per client);
- ``iid``: ``IidPartitioner`` on the training split in a seeded random order
  (sizes differ by at most 1);
- ``shard``: ``PathologicalPartitioner``: every client gets exactly
  ``shard_classes`` classes (deterministic class assignment over a seeded
  order of the classes, see ``shard_order``).

Add one with ``register_partitioner(name, build, ...)``: ``build(spec, labels)``
returns a flwr-datasets partitioner and the columns of the table it cuts
(``label_table(labels)`` when it needs nothing else); the table's ``index``
column says which training rows each partition gets. Give it ``precheck``
when whether every client gets data can be told from the labels alone (iid
and shard can; Dirichlet must be cut): a run's preflight then checks the
split without building the partitioner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flwr_scaling.data.specs import DataSpec

MIN_PARTITION_SIZE = 10



@dataclass(frozen=True)
class PartitionSpec:
    """How the training split is divided among clients (hashable: the key of the partitioner cache).

    ``partitioner`` names an entry of this registry; each entry reads the
    settings it needs (``dirichlet_alpha``, ``shard_classes``).
    """

    data: DataSpec
    num_partitions: int
    dirichlet_alpha: float
    partitioner: str = "dirichlet"
    shard_classes: int = 2  # classes per client with partitioner "shard"

    def describe(self) -> str:
        """A short human-readable name, e.g. ``dirichlet (alpha 0.5)`` or ``shard (2 classes per client)``."""
        return describe(self)


# (spec, training labels) -> (flwr-datasets partitioner, the columns of the table it partitions)
Builder = Callable[[PartitionSpec, np.ndarray], tuple[object, dict[str, np.ndarray]]]


@dataclass(frozen=True)
class PartitionerKind:
    """One registry entry.

    Parameters
    ----------
    name
        The ``partitioner`` option's value.
    build
        ``build(spec, labels) -> (partitioner, columns)``; may raise a one-line
        ValueError for settings the data cannot satisfy.
    check
        ``check(spec)``: one-line ValueError for settings that cannot work for
        any data, run before anything is loaded.
    describe
        ``describe(spec)``: a short name for titles, e.g. ``dirichlet (alpha 0.5)``.
    warning
        ``warning(spec, labels)``: a caveat said once, when partition 0 is cut, or None.
    precheck
        ``precheck(spec, labels)``: the whole feasibility check on the labels
        alone (the same one-line ValueError as ``build``), for entries whose
        split can be judged without cutting it. A run's preflight then skips
        building the flwr-datasets partitioner (importing flwr-datasets alone
        is 2 s of a simulation's start-up); entries without it are checked by
        cutting partition 0.
    """

    name: str
    build: Builder
    check: Callable[[PartitionSpec], None] | None = None
    describe: Callable[[PartitionSpec], str] | None = None
    warning: Callable[[PartitionSpec, np.ndarray], str | None] | None = None
    precheck: Callable[[PartitionSpec, np.ndarray], None] | None = None


_KINDS: dict[str, PartitionerKind] = {}


def register_partitioner(
    name: str,
    build: Builder,
    *,
    check: Callable[[PartitionSpec], None] | None = None,
    describe: Callable[[PartitionSpec], str] | None = None,
    warning: Callable[[PartitionSpec, np.ndarray], str | None] | None = None,
    precheck: Callable[[PartitionSpec, np.ndarray], None] | None = None,
) -> PartitionerKind:
    """Add a partitioner (see ``PartitionerKind``); ValueError for a name that is empty or taken."""
    if not name or name != name.strip():
        raise ValueError(f"a partitioner name must be non-empty without surrounding spaces, got {name!r}")
    if name in _KINDS:
        raise ValueError(f"partitioner {name!r} is already registered; unregister_partitioner({name!r}) first")
    _KINDS[name] = PartitionerKind(name, build, check, describe, warning, precheck)
    return _KINDS[name]


def unregister_partitioner(name: str) -> None:
    """Remove a partitioner added with ``register_partitioner`` (KeyError if there is none)."""
    del _KINDS[name]


def partitioner_names() -> tuple[str, ...]:
    """The registered partitioners, in registration order."""
    return tuple(_KINDS)


def partitioner_kind(spec: PartitionSpec) -> PartitionerKind:
    """The entry of ``spec.partitioner``, after the settings every partitioner needs and its own up-front checks."""
    kind = _KINDS.get(spec.partitioner)
    if kind is None:
        raise ValueError(f"partitioner: unknown value {spec.partitioner!r}; choose one of {', '.join(_KINDS)}")
    if spec.num_partitions < 1:
        raise ValueError(f"num-clients must be >= 1, got {spec.num_partitions}")
    if kind.check is not None:
        kind.check(spec)
    return kind


def describe(spec: PartitionSpec) -> str:
    """A short human-readable name, e.g. ``dirichlet (alpha 0.5)``; the bare name for entries without one."""
    kind = _KINDS.get(spec.partitioner)
    return kind.describe(spec) if kind is not None and kind.describe is not None else spec.partitioner


def label_table(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The ``{"index", "label"}`` table a partitioner cuts: only the labels, not the features (no copy into Arrow)."""
    return {"index": np.arange(len(labels)), "label": labels}


# ---------------------------------------------------------------- dirichlet
def _check_dirichlet(spec: PartitionSpec) -> None:
    alpha = spec.dirichlet_alpha
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet-alpha must be a finite number > 0, got {alpha}")


def _build_dirichlet(spec: PartitionSpec, labels: np.ndarray):
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=spec.num_partitions,
        partition_by="label",
        alpha=spec.dirichlet_alpha,
        min_partition_size=MIN_PARTITION_SIZE,
        self_balancing=False,
        shuffle=True,
        seed=spec.data.seed,
    )
    return partitioner, label_table(labels)


# ---------------------------------------------------------------- iid
def _check_iid(spec: PartitionSpec, labels: np.ndarray) -> None:
    size = len(labels)
    if spec.num_partitions > size:
        raise ValueError(
            f"an iid split of {size} training examples into {spec.num_partitions} clients leaves some client "
            f"without data; use at most {size} clients"
        )


def _build_iid(spec: PartitionSpec, labels: np.ndarray):
    from flwr_datasets.partitioner import IidPartitioner

    _check_iid(spec, labels)
    size = len(labels)
    # IidPartitioner cuts contiguous shards: put the rows in a seeded random
    # order first (a source's own training file may be sorted by label).
    order = np.random.default_rng(spec.data.seed).permutation(size)
    return IidPartitioner(num_partitions=spec.num_partitions), {"index": order, "label": labels[order]}


# ---------------------------------------------------------------- shard
def _check_shard_classes(spec: PartitionSpec) -> None:
    if spec.shard_classes < 1:
        raise ValueError(f"shard-classes must be an integer >= 1, got {spec.shard_classes}")


def _precheck_shard(spec: PartitionSpec, labels: np.ndarray) -> None:
    check_shard(spec, labels, shard_order(labels, spec.data.seed))


def _build_shard(spec: PartitionSpec, labels: np.ndarray):
    from flwr_datasets.partitioner import PathologicalPartitioner

    rank = shard_order(labels, spec.data.seed)
    check_shard(spec, labels, rank)
    columns = {**label_table(labels), "shard_class": rank[labels]}
    partitioner = PathologicalPartitioner(
        num_partitions=spec.num_partitions,
        partition_by="shard_class",
        num_classes_per_partition=spec.shard_classes,
        class_assignment_mode="deterministic",
        shuffle=True,
        seed=spec.data.seed,
    )
    return partitioner, columns


def shard_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """``rank[label]``: each class's place in a seeded random order of the classes.

    PathologicalPartitioner's ``deterministic`` mode gives client ``p`` the
    classes at places ``p, p+1, ..., p+shard_classes-1`` (mod the number of
    classes) of the sorted class ids: every client gets exactly
    ``shard_classes`` classes, the classes are shared as evenly as the numbers
    allow, and no class is left out when ``clients + shard_classes - 1 >=
    classes``. Its ``random`` mode, also seeded, draws each client's classes
    independently and so drops whole classes by chance (about one class in ten
    for 10 clients x 2 classes of 10). Sorting the classes by this seeded rank
    first keeps the deterministic mode's guarantees and makes which classes
    share a client depend on the seed.
    """
    classes = int(labels.max()) + 1
    rank = np.empty(classes, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(classes)] = np.arange(classes)
    return rank


def _shard_uses(num_partitions: int, shard_classes: int, num_classes: int) -> np.ndarray:
    """How many clients get each class place under the deterministic assignment.

    Client ``p`` takes places ``(p + i) % num_classes`` for ``i < shard_classes``;
    the counts only grow with either argument, so feasibility is monotone in both.
    """
    places = np.arange(num_classes)
    full, rest = divmod(num_partitions, num_classes)
    return sum(full + ((places - i) % num_classes < rest) for i in range(shard_classes)).astype(np.int64)


def _largest(low: int, high: int, ok) -> int:
    """The largest x in [low, high] with ok(x) (ok monotone: true up to some x), or low - 1 if none."""
    if high < low or not ok(low):
        return low - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if ok(middle) else (low, middle - 1)
    return low


def check_shard(spec: PartitionSpec, labels: np.ndarray, rank: np.ndarray) -> None:
    """One-line ValueError unless every client can get ``shard_classes`` classes and >= 1 example of each."""
    present = np.unique(labels)
    num_classes, k, n = len(present), spec.shard_classes, spec.num_partitions
    if k < 1 or k > num_classes:
        raise ValueError(
            f"shard-classes {k} is impossible: the training split has {num_classes} classes; "
            f"use shard-classes between 1 and {num_classes}"
        )
    # Examples per class place (rank order; classes absent from the split count 0 but are not places).
    counts = np.bincount(rank[labels], minlength=len(rank))[np.sort(rank[present])]

    def feasible(clients: int, per_client: int) -> bool:
        return bool((_shard_uses(clients, per_client, num_classes) <= counts).all())

    if feasible(n, k):
        return
    uses = _shard_uses(n, k, num_classes)
    place = int(np.argmax(uses > counts))
    cls = int(present[np.argsort(rank[present])][place])
    most_clients = _largest(1, n - 1, lambda c: feasible(c, k))
    most_classes = _largest(1, k - 1, lambda c: feasible(n, c))
    options = [f"at most {most_clients} clients"] if most_clients else []
    if most_classes:
        options.append(f"shard-classes at most {most_classes}")
    raise ValueError(
        f"a shard split with shard-classes {k} gives class {cls} ({int(counts[place])} training examples) to "
        f"{int(uses[place])} of the {n} clients, so some client would get no example of it; use "
        + " or ".join(options or ["fewer clients"])
    )


def _shard_warning(spec: PartitionSpec, labels: np.ndarray) -> str | None:
    classes = len(np.unique(labels))
    if spec.num_partitions + spec.shard_classes - 1 >= classes:
        return None
    unused = classes - (spec.num_partitions + spec.shard_classes - 1)
    return (f"shard split: {spec.num_partitions} clients x {spec.shard_classes} classes leave {unused} of the "
            f"{classes} classes to no client (their examples are not used for training)")


register_partitioner("dirichlet", _build_dirichlet, check=_check_dirichlet,
                     describe=lambda spec: f"dirichlet (alpha {spec.dirichlet_alpha:g})")
register_partitioner("iid", _build_iid, precheck=_check_iid)
register_partitioner(
    "shard", _build_shard, check=_check_shard_classes, warning=_shard_warning, precheck=_precheck_shard,
    describe=lambda spec: f"shard ({spec.shard_classes} class{'es' if spec.shard_classes != 1 else ''} per client)",
)

PARTITIONERS = partitioner_names()  # the built-in ones; ask partitioner_names() for the registered ones
