"""The run configuration: one definition of every option, its default and its check.

The same keys (kebab-case) are used on the command line (``--precond-alpha``),
in Flower's ``[tool.flwr.app.config]`` / ``flwr run -c "precond-alpha=0.1"`` and
in the ConfigRecord that travels to the clients. Everything is validated here,
before any data is loaded or Ray is started.

Long because it is the one place every option is defined, defaulted and checked
(about 40 options); splitting it would scatter what the issue asked to keep together.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from flwr_scaling.protocol.wire import DTYPES as PRECOND_DTYPES
from flwr_scaling.data.federated import (
    EVAL_SPLITS,
    MIN_PARTITION_SIZE,
    TEST_FRACTION,
    DataSpec,
    FederatedData,
    PartitionSpec,
    data_label_names,
    default_model,
)
from flwr_scaling.data.partitioners import partitioner_names
from flwr_scaling.data.sources import check_spec, named_sources, path_kinds, source_default_model, source_size
from flwr_scaling.core.devices import device_problem
from flwr_scaling.core.models import IMAGE_MODELS, MODELS, input_problem
from flwr_scaling.core.rules import MODES, RULES, get_rule
from flwr_scaling.errors import ConfigError, DataError
from flwr_scaling.methods import METHODS, get_method
from flwr_scaling.strategies.robust import AGGREGATIONS

INITS = ("warmup", "ones")
# num-clients = "auto" (the Flower App's default): one client per node the federation
# started, counted by the ServerApp (server_app.settled_node_count) before anything
# else uses the number; a run outside a federation (the command line) gets DEFAULT_NUM_CLIENTS.
AUTO_CLIENTS = "auto"
DEFAULT_NUM_CLIENTS = 10

# Examples in the bundled scikit-learn datasets, from their source-registry entries
# (tests/test_config.py checks them against scikit-learn). They bound num-clients
# before any data is loaded: every client needs MIN_PARTITION_SIZE training examples.
DATASET_SIZES = {name: source_size(name) for name in named_sources() if source_size(name) is not None}
# Integers travel in Flower ConfigRecords as sint64; seeds go to scikit-learn,
# which takes 0 .. 2**32 - 1.
INT_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1

@dataclass(frozen=True)
class RunConfig:
    """Every option of one run. ``None`` means "the measured default for this method".

    Those defaults are read from the method's entry (``flwr_scaling.methods.METHODS``)
    and the rule's (``flwr_scaling.core.rules.RULES``) by ``resolved()``.
    """

    strategy: str = "savic"
    precond: str | None = None
    precond_mode: str = "global"
    precond_beta: float = 0.99
    precond_alpha: float | None = None
    precond_init: str = "warmup"
    precond_dtype: str = "float32"
    precond_every: int = 1
    precond_probes: int = 1
    warmup_batches: int = 4
    adam_beta1: float = 0.9
    momentum: float = 0.0
    lr: float | None = None
    server_lr: float | None = None
    server_tau: float = 1e-3
    server_momentum: float = 0.0  # server heavy ball on the averaged model change (savic, fedavg, fedprox, local-adam)
    proximal_mu: float = 0.01
    local_epochs: int = 1
    batch_size: int = 32
    rounds: int = 30
    num_clients: int | str = DEFAULT_NUM_CLIENTS  # or AUTO_CLIENTS
    clients_per_round: int | None = None
    dirichlet_alpha: float = 0.5
    partitioner: str = "dirichlet"
    shard_classes: int = 2
    dataset: str = "digits"
    label_column: str = "label"
    test_path: str = ""
    eval_split: str = "test"
    model: str | None = None
    device: str = "auto"  # resolved by each process for itself (core.devices): auto is CUDA where there is one
    client_cpus: float = 1.0  # Ray CPUs per client actor (the simulation backend)
    client_gpus: float = 0.0  # Ray GPUs per client actor, fractional (0.25: four clients share a GPU)
    seed: int = 0
    out: str = ""
    wait_for_nodes_s: float = 60.0
    min_successful_clients: int = 1
    min_available_clients: int = 1
    checkpoint_every: int = 1
    client_eval_every: int = 0
    input_shape: str = ""
    label_names: str = ""
    screen_factor: float = 100.0  # squared-gradient statistics spread quadratically: an honest a9a client sat at 12x the median
    max_num_examples: int = 0
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    tensorboard: str = ""  # TensorBoard event files under DIR/<run folder name> ("": none); needs the extra

    # ------------------------------------------------------------------ keys
    @staticmethod
    def key(field_name: str) -> str:
        return field_name.replace("_", "-")

    @classmethod
    def keys(cls) -> list[str]:
        return [cls.key(f.name) for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys, as in Flower configs and on the command line."""
        return {self.key(k): v for k, v in asdict(self).items()}

    def to_flower(self) -> dict[str, Any]:
        """The resolved config as ConfigRecord-compatible values (no ``None``)."""
        return {k: v for k, v in self.resolved().to_dict().items() if v is not None}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (Flower run config, TOML, JSON), checking names and types."""
        known = {cls.key(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown option {key!r}{_suggest(str(key), known)}")
            kwargs[known[key].name] = _coerce(key, value, known[key].type)
        return cls(**kwargs)

    # -------------------------------------------------------------- defaults
    def resolved(self, *, check_files: bool = True) -> RunConfig:
        """Fill every ``None`` with its documented default; validate first.

        ``check_files=False``: do not look for the dataset's files (a client: a
        device holds only its own data, not the run's).
        """
        if self.num_clients == AUTO_CLIENTS:  # no federation counted the nodes: the command line's default
            return replace(self, num_clients=DEFAULT_NUM_CLIENTS).resolved(check_files=check_files)
        self.validate(check_files=check_files)
        method = get_method(self.strategy)
        precond = self.precond or method.default_precond
        rule = get_rule(precond)
        # The source entry's model (cnn for images); for sources that hold either (hf:) the loaded data decides.
        model = self.model or default_model(self.data_spec())
        return replace(
            self,
            precond=precond,
            precond_alpha=self.precond_alpha if self.precond_alpha is not None else rule.default_alpha,
            lr=self.lr if self.lr is not None else method.default_lr(rule, self.precond_mode),
            server_lr=self.server_lr if self.server_lr is not None else method.server_lr,
            clients_per_round=self.clients_per_round or self.num_clients,
            model=model,
            # "[]": numeric labels; a JSON list: the class names (sorted), the same for every split and node.
            label_names=self.label_names or json.dumps(list(data_label_names(self.data_spec()))),
            out=self.out or f"runs/{self.label(precond)}",
        )

    def data_spec(self) -> DataSpec:
        """What ``data.load_federated_data`` needs from this configuration."""
        return DataSpec(self.dataset, self.seed, self.eval_split, self.label_column, self.test_path,
                        parse_input_shape(self.input_shape))

    def partition_spec(self) -> PartitionSpec:
        """What ``data.load_partition`` needs from this configuration."""
        return PartitionSpec(
            self.data_spec(), self.num_clients, self.dirichlet_alpha, self.partitioner, self.shard_classes
        )

    def label(self, precond: str | None = None) -> str:
        """A short name for plots and folders, e.g. ``savic-adam-global`` (see ``Method.label``)."""
        method = METHODS.get(self.strategy)
        if method is None:  # not validated yet: the name is all there is
            return self.strategy
        return method.label(precond or self.precond or method.default_precond, self.precond_mode)

    # ------------------------------------------------------------ validation
    def validate(self, *, check_files: bool = True) -> None:
        """Raise ConfigError (one line) on the first bad option (``check_files``: also that the dataset's files can be read)."""
        for field in fields(self):
            _check_type(self.key(field.name), getattr(self, field.name), str(field.type))
        _choice("strategy", self.strategy, METHODS)
        if self.precond is not None:
            _choice("precond", self.precond, RULES)
            if not METHODS[self.strategy].scaled and self.precond != "identity":
                raise ConfigError(
                    f"strategy {self.strategy!r} is a baseline and takes no preconditioner; "
                    f"use --strategy savic with --precond {self.precond}"
                )
        _choice("precond-mode", self.precond_mode, MODES)
        _choice("precond-init", self.precond_init, INITS)
        # Both accepted, without effect, by the baselines: they send no preconditioner.
        _choice("precond-dtype", self.precond_dtype, PRECOND_DTYPES)
        _at_least("precond-every", self.precond_every, 1)
        kind, is_file, _ = self.dataset.partition(":")
        if not is_file and kind not in named_sources():
            raise ConfigError(
                f"dataset: unknown value {kind!r}{_suggest(kind, named_sources())} "
                f"(a dataset from files is KIND:PATH, KIND one of {', '.join(path_kinds())})"
            )
        if is_file and kind not in path_kinds():
            raise ConfigError(f"dataset {self.dataset!r}: unknown file kind {kind!r}{_suggest(kind, path_kinds())}")
        if not self.label_column:
            raise ConfigError("label-column must name a column of the data, got ''")
        try:
            if check_files:
                check_spec(self.dataset, self.test_path)  # the files exist and can be read
        except DataError as error:
            raise ConfigError(str(error)) from None
        _choice("eval-split", self.eval_split, EVAL_SPLITS)
        shape = parse_input_shape(self.input_shape)
        if shape and self.model is not None and input_problem(self.model, shape):
            raise ConfigError(f"input-shape {self.input_shape}: {input_problem(self.model, shape)}")
        class_names(self.label_names)
        if self.model is not None:
            _choice("model", self.model, MODELS)
            # hf: datasets may hold images; only loading them tells (a CNN on tables fails then, in one line).
            shaped = default_model(self.data_spec()) if self.input_shape else source_default_model(self.dataset)
            if self.model in IMAGE_MODELS and shaped not in (*IMAGE_MODELS, None):
                raise ConfigError(f"model {self.model!r} needs image data; dataset {self.dataset!r} is tabular: "
                                  f"give --input-shape (e.g. 1x8x8) or use --model mlp or logreg")
        _range("precond-beta", self.precond_beta, 0.0, 1.0, high_open=True)
        _range("adam-beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        _range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _positive("precond-alpha", self.precond_alpha)
        _positive("lr", self.lr)
        _positive("server-lr", self.server_lr)
        _positive("server-tau", self.server_tau)
        _range("server-momentum", self.server_momentum, 0.0, 1.0, high_open=True)
        if self.server_momentum and get_method(self.strategy).server_optimizer is not None:
            raise ConfigError(f"server-momentum is for methods that average on the server; {self.strategy} has its "
                              f"own server optimizer (its moments): remove server-momentum or use savic/fedavg")
        _range("proximal-mu", self.proximal_mu, 0.0, math.inf, high_open=True)
        _choice("partitioner", self.partitioner, partitioner_names())
        _at_least("shard-classes", self.shard_classes, 1)
        _at_least("client-eval-every", self.client_eval_every, 0)
        if device_problem(self.device):  # the spelling only: whether this machine has it is the preflight's question
            raise ConfigError(device_problem(self.device))
        _positive("client-cpus", self.client_cpus)  # Flower divides a node's CPUs by it
        _range("client-gpus", self.client_gpus, 0.0, math.inf, high_open=True)
        _positive("dirichlet-alpha", self.dirichlet_alpha)
        for name in ("precond-probes", "warmup-batches", "local-epochs", "batch-size", "rounds"):
            _at_least(name, getattr(self, name.replace("-", "_")), 1)
        _at_least("num-clients", self.num_clients, 1)
        most = max_clients(self.dataset, self.eval_split)
        if most is not None and self.num_clients > most:
            raise ConfigError(
                f"num-clients {self.num_clients} is too many for dataset {self.dataset!r}: its "
                f"{train_size(self.dataset, self.eval_split)} training examples cannot give every client "
                f"{MIN_PARTITION_SIZE} examples; use at most {most} clients"
            )
        if self.clients_per_round is not None:
            _at_least("clients-per-round", self.clients_per_round, 1)
            if self.clients_per_round > self.num_clients:
                raise ConfigError(
                    f"clients-per-round ({self.clients_per_round}) cannot exceed num-clients ({self.num_clients})"
                )
        _at_least("seed", self.seed, 0)
        if self.seed > SEED_MAX:
            raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed}")
        _positive("wait-for-nodes-s", self.wait_for_nodes_s)
        _at_least("min-successful-clients", self.min_successful_clients, 1)
        if self.min_successful_clients > (self.clients_per_round or self.num_clients):
            raise ConfigError(
                f"min-successful-clients ({self.min_successful_clients}) cannot exceed the clients per round "
                f"({self.clients_per_round or self.num_clients}): no round could succeed"
            )
        _at_least("min-available-clients", self.min_available_clients, 1)
        if self.min_available_clients > self.num_clients:
            raise ConfigError(
                f"min-available-clients ({self.min_available_clients}) cannot exceed num-clients ({self.num_clients})"
            )
        _at_least("checkpoint-every", self.checkpoint_every, 0)
        _range("screen-factor", self.screen_factor, 0.0, math.inf, high_open=True)
        if 0 < self.screen_factor <= 1:
            raise ConfigError(f"screen-factor must be 0 (off) or > 1 (the median reply itself must pass), got {self.screen_factor:g}")
        _at_least("max-num-examples", self.max_num_examples, 0)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _range("trim-fraction", self.trim_fraction, 0.0, 0.5, high_open=True)
        if "\0" in self.out:
            raise ConfigError(f"out must be a folder name without NUL characters, got {self.out!r}")
        if "\0" in self.tensorboard:
            raise ConfigError(f"tensorboard must be a folder name without NUL characters, got {self.tensorboard!r}")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1x8x8"`` -> (1, 8, 8); ``""`` -> () (the source's own shape); ConfigError for anything else."""
    if not text:
        return ()
    parts = text.lower().split("x")
    if not all(part.isdigit() and int(part) > 0 for part in parts) or len(parts) > 3:
        raise ConfigError(f"input-shape must be up to 3 positive integers joined by 'x' (e.g. 1x8x8), got {text!r}")
    return tuple(int(part) for part in parts)


def class_names(text: str) -> tuple[str, ...]:
    """``label-names`` (a JSON list of distinct strings, ``""`` before it is found) as a tuple; ConfigError otherwise."""
    if not text:
        return ()
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"label-names must be a JSON list of distinct class names (e.g. [\"cat\", \"dog\"]), got {text!r}")
    return tuple(names)


def check_data_fits(cfg: RunConfig, data: FederatedData) -> None:
    """ConfigError when the loaded ``data`` cannot be used by ``cfg``'s model (images too small, flat
    features for an image model): asked by the preflight, before any training."""
    problem = input_problem(cfg.model or data.default_model, tuple(data.input_shape))
    if problem:
        raise ConfigError(f"dataset {cfg.dataset!r}: {problem}")
    given = class_names(cfg.label_names)
    if cfg.label_names and given != tuple(data.label_names):
        raise ConfigError(f"label-names {cfg.label_names} differ from the classes of dataset {cfg.dataset!r} "
                          f"({json.dumps(list(data.label_names))}); leave label-names empty to take the data's")


def train_size(dataset: str, eval_split: str = "test") -> int | None:
    """Training examples of a bundled ``dataset`` (what the clients share), as ``data.load_federated_data``
    splits it; ``None`` for other datasets, whose size is known only once they are loaded."""
    size = source_size(dataset)
    if size is None:
        return None
    for _ in range(2 if eval_split == "validation" else 1):
        size -= math.ceil(size * TEST_FRACTION)  # scikit-learn's train_test_split rounds the test part up
    return size


def max_clients(dataset: str, eval_split: str = "test") -> int | None:
    """The most clients any split of ``dataset`` can have (every client needs MIN_PARTITION_SIZE examples)."""
    size = train_size(dataset, eval_split)
    return None if size is None else size // MIN_PARTITION_SIZE


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices)}"


def _choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r}{_suggest(str(value), choices)}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _range(name: str, value: float, low: float, high: float, high_open: bool) -> None:
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value}")
    if value > INT_MAX:
        raise ConfigError(f"{name} must be an integer <= {INT_MAX}, got {value}")


def _kind(annotation: str) -> str:
    return "an integer" if annotation.startswith("int") else "a number" if annotation.startswith("float") else "a string"


def _check_type(key: str, value: Any, annotation: str) -> None:
    """``value`` has the field's type (for configs built in Python, not through ``from_mapping``)."""
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{key} must be {_kind(annotation)}, got None")
        return
    if annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) > 2**1023:
            raise ConfigError(f"{key} must be a finite number, got an integer of {value.bit_length()} bits")
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} must be {_kind(annotation)}, got {value!r}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a config value to the field's type, with a one-line error.

    Strings are parsed (the command line and ``flwr run -c`` give strings);
    ``""`` and ``None`` mean "the default" for the options whose default depends
    on the method. Booleans are never numbers, and an integer option takes no
    fraction (``2.0`` from a TOML file is 2, ``2.5`` is an error).
    """
    text = str(annotation)
    if key == "num-clients" and value == AUTO_CLIENTS:
        return value
    if value is None or (isinstance(value, str) and value == "" and "None" in text):
        if "None" not in text:
            raise ConfigError(f"{key} must be {_kind(text)}, got None")
        return None
    try:
        if text.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if not isinstance(value, (int, float, str)):
                raise TypeError
            return int(value)
        if text.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key} must be {_kind(text)}, got {value!r}") from None
