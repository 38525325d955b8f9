"""In-process tests of the run configuration: parsing, defaults, validation, TOML files.

The command line's behaviour on bad input is tested end to end in
test_bad_input.py; these tests pin the pieces it is built from.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from flwr_scaling.core.rules import RULES
from flwr_scaling.run.config import (
    DATASET_SIZES,
    ConfigError,
    RunConfig,
    max_clients,
    train_size,
)
from flwr_scaling.run import config_files
from flwr_scaling.run.config_files import check_output_folder, load_toml

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------------ from_mapping
def test_from_mapping_parses_strings_as_the_command_line_gives_them():
    cfg = RunConfig.from_mapping({"lr": "0.05", "rounds": "3", "precond": "rmsprop", "precond-beta": "0.9"})
    assert cfg.lr == 0.05 and cfg.rounds == 3 and cfg.precond == "rmsprop" and cfg.precond_beta == 0.9
    assert isinstance(cfg.rounds, int) and isinstance(cfg.lr, float)


def test_from_mapping_takes_toml_and_flower_types():
    cfg = RunConfig.from_mapping({"lr": 1, "rounds": 4.0, "momentum": 0, "seed": 7})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.rounds == 4 and isinstance(cfg.rounds, int)
    assert cfg.momentum == 0.0 and cfg.seed == 7


def test_empty_string_means_the_method_default_for_optional_options():
    # Flower's [tool.flwr.app.config] has no null: "" stands for "the measured default".
    cfg = RunConfig.from_mapping({"precond": "", "lr": "", "precond-alpha": "", "clients-per-round": "", "model": ""})
    assert (cfg.precond, cfg.lr, cfg.precond_alpha, cfg.clients_per_round, cfg.model) == (None,) * 5
    assert RunConfig.from_mapping({}) == RunConfig()


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"precond-alpah": 0.1}, "unknown option 'precond-alpah'; did you mean 'precond-alpha'?"),
        ({"local_epochs": 2}, "unknown option 'local_epochs'; did you mean 'local-epochs'?"),
        ({"colour": "red"}, "unknown option 'colour'"),
        ({"lr": "abc"}, "lr must be a number, got 'abc'"),
        ({"lr": True}, "lr must be a number, got True"),
        ({"lr": [0.1]}, "lr must be a number, got [0.1]"),
        ({"lr": 10**400}, "lr must be a number"),
        ({"lr": None}, None),  # optional: None is the default
        ({"rounds": 2.5}, "rounds must be an integer, got 2.5"),
        ({"rounds": "2.5"}, "rounds must be an integer, got '2.5'"),
        ({"rounds": False}, "rounds must be an integer, got False"),
        ({"rounds": float("inf")}, "rounds must be an integer, got inf"),
        ({"rounds": float("nan")}, "rounds must be an integer, got nan"),
        ({"rounds": None}, "rounds must be an integer, got None"),
        ({"rounds": ""}, "rounds must be an integer, got ''"),
        ({"seed": "0x10"}, "seed must be an integer, got '0x10'"),
        ({"precond": 3}, "precond must be a string, got 3"),
        ({"strategy": True}, "strategy must be a string, got True"),
        ({"out": ["runs"]}, "out must be a string"),
    ],
    ids=lambda value: None if isinstance(value, (dict, type(None))) else str(value)[:40],
)
def test_from_mapping_rejects_bad_names_and_types(values, fragment):
    if fragment is None:
        RunConfig.from_mapping(values)
        return
    assert fragment in one_line_error(RunConfig.from_mapping, values)


def test_round_trips_through_its_own_dicts():
    cfg = RunConfig(precond="oasis", precond_mode="local", rounds=5, num_clients=4, clients_per_round=2)
    assert RunConfig.from_mapping(cfg.to_dict()) == cfg
    resolved = cfg.resolved()
    assert RunConfig.from_mapping(resolved.to_flower()) == resolved  # what travels to the clients
    assert set(cfg.to_dict()) == set(RunConfig.keys())


def test_the_flower_app_defaults_are_every_option_and_valid():
    with open(ROOT / "pyproject.toml", "rb") as handle:
        app_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(RunConfig.keys())
    cfg = RunConfig.from_mapping(app_config).resolved()
    assert cfg.precond == "adam" and cfg.clients_per_round == cfg.num_clients


# ------------------------------------------------------------------- resolved()
def test_fedavg_defaults():
    cfg = RunConfig(strategy="fedavg").resolved()
    assert cfg.precond == "identity" and cfg.lr == 0.4 and cfg.precond_alpha == 1e-3
    assert cfg.label() == "fedavg" and cfg.out == "runs/fedavg"


def test_savic_defaults():
    cfg = RunConfig().resolved()
    assert cfg.strategy == "savic" and cfg.precond == "adam" and cfg.precond_mode == "global"
    assert cfg.lr == 0.003 and cfg.precond_alpha == 1e-3 and cfg.precond_beta == 0.99
    assert cfg.out == "runs/savic-adam-global"


def test_oasis_defaults():
    cfg = RunConfig(precond="oasis").resolved()
    assert cfg.precond_alpha == 0.1 and cfg.lr == RULES["oasis"].default_lr["global"] == 0.03


@pytest.mark.parametrize("rule", ["identity", "adagrad", "rmsprop", "adam", "oasis"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_default_lr_per_rule_and_mode(rule, mode):
    cfg = RunConfig(precond=rule, precond_mode=mode).resolved()
    assert cfg.lr == RULES[rule].default_lr[mode] > 0


def test_given_values_win_over_defaults():
    cfg = RunConfig(precond="oasis", lr=0.05, precond_alpha=0.2, clients_per_round=3, model="mlp", out="x").resolved()
    assert (cfg.lr, cfg.precond_alpha, cfg.clients_per_round, cfg.model, cfg.out) == (0.05, 0.2, 3, "mlp", "x")


def test_clients_per_round_defaults_to_num_clients():
    assert RunConfig(num_clients=7).resolved().clients_per_round == 7


@pytest.mark.parametrize("dataset, model", [("digits", "cnn"), ("wine", "logreg"), ("breast_cancer", "logreg")])
def test_default_model_per_dataset(dataset, model):
    assert RunConfig(dataset=dataset, num_clients=3).resolved().model == model


def test_resolved_is_idempotent_and_validates():
    cfg = RunConfig(precond="rmsprop", precond_mode="local").resolved()
    assert cfg.resolved() == cfg
    assert "lr must be" in one_line_error(RunConfig(lr=0).resolved)


# --------------------------------------------------------------------- validate()
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"strategy": "fedavgg"}, "did you mean 'fedavg'?"),
        ({"precond": "adamm"}, "did you mean 'adam'?"),
        ({"precond_mode": "glob"}, "did you mean 'global'?"),
        ({"precond_init": "warm"}, "did you mean 'warmup'?"),
        ({"precond_dtype": "bf16"}, "precond-dtype: unknown value 'bf16'; did you mean 'bfloat16'?"),
        ({"precond_dtype": "int8"}, "precond-dtype: unknown value 'int8'; known: float32, bfloat16, float16"),
        ({"precond_every": 0}, "precond-every must be an integer >= 1, got 0"),
        ({"precond_every": 2.0}, "precond-every must be an integer, got 2.0"),
        ({"dataset": "digit"}, "did you mean 'digits'?"),
        ({"eval_split": "valid"}, "did you mean 'validation'?"),
        ({"model": "cnnn"}, "did you mean 'cnn'?"),
        ({"strategy": "fedavg", "precond": "adam"}, "takes no preconditioner"),
        ({"model": "cnn", "dataset": "wine", "num_clients": 3}, "model 'cnn' needs image data"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"lr": math.nan}, "lr must be a finite number > 0"),
        ({"lr": math.inf}, "lr must be a finite number > 0"),
        ({"server_lr": 0.0}, "server-lr must be"),
        ({"precond_beta": 1.0}, "precond-beta must be in [0.0, 1.0)"),
        ({"precond_beta": -0.1}, "precond-beta must be in [0.0, 1.0)"),
        ({"precond_alpha": 0.0}, "precond-alpha must be a finite number > 0"),
        ({"adam_beta1": 1.0}, "adam-beta1 must be in"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"dirichlet_alpha": 0.0}, "dirichlet-alpha must be a finite number > 0"),
        ({"wait_for_nodes_s": math.inf}, "wait-for-nodes-s must be a finite number > 0"),
        ({"local_epochs": 0}, "local-epochs must be an integer >= 1"),
        ({"batch_size": 0}, "batch-size must be an integer >= 1"),
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"rounds": 2**63}, "rounds must be an integer <= 9223372036854775807"),
        ({"precond_probes": 0}, "precond-probes must be an integer >= 1"),
        ({"warmup_batches": 0}, "warmup-batches must be an integer >= 1"),
        ({"num_clients": 0}, "num-clients must be an integer >= 1"),
        ({"num_clients": 144}, "use at most 143 clients"),
        ({"num_clients": 115, "eval_split": "validation"}, "use at most 114 clients"),
        ({"num_clients": 15, "dataset": "wine", "model": "logreg"}, "use at most 14 clients"),
        ({"clients_per_round": 0}, "clients-per-round must be an integer >= 1"),
        ({"clients_per_round": 11}, "clients-per-round (11) cannot exceed num-clients (10)"),
        ({"min_successful_clients": 0}, "min-successful-clients must be an integer >= 1"),
        ({"min_successful_clients": 4, "clients_per_round": 3}, "cannot exceed the clients per round (3)"),
        ({"min_successful_clients": 11}, "cannot exceed the clients per round (10)"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 2**32}, "seed must be an integer in [0, 4294967295]"),
        ({"checkpoint_every": -1}, "checkpoint-every must be an integer >= 0"),
        ({"out": "runs/a\0b"}, "without NUL characters"),
        # types, for configurations built in Python rather than parsed
        ({"rounds": "3"}, "rounds must be an integer, got '3'"),
        ({"rounds": True}, "rounds must be an integer, got True"),
        ({"rounds": 3.0}, "rounds must be an integer, got 3.0"),
        ({"num_clients": None}, "num-clients must be an integer, got None"),
        ({"lr": "0.1"}, "lr must be a number, got '0.1'"),
        ({"lr": False}, "lr must be a number, got False"),
        ({"lr": 10**400}, "lr must be a finite number"),
        ({"precond": 3}, "precond must be a string, got 3"),
        # datasets from files
        ({"dataset": "lbsvm:data/a9a"}, "unknown file kind 'lbsvm'; did you mean 'libsvm'?"),
        ({"dataset": "csv:/nonexistent/data.csv"}, "does not exist or is not a file"),
        ({"dataset": "digits", "test_path": "/nonexistent/test.csv"}, "test-path is only for file datasets"),
        ({"label_column": ""}, "label-column must name a column"),
    ],
    ids=lambda value: None if isinstance(value, dict) else value[:40],
)
def test_validate_rejects(kwargs, fragment):
    message = one_line_error(RunConfig(**kwargs).validate)
    assert fragment in message, message


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"strategy": "fedavg", "precond": "identity"},
        {"precond_beta": 0.0, "momentum": 0.0, "adam_beta1": 0.0},
        {"num_clients": 143},
        {"num_clients": 114, "eval_split": "validation"},
        {"num_clients": 1, "clients_per_round": 1, "min_successful_clients": 1},
        {"seed": 2**32 - 1},
        {"checkpoint_every": 0},
        {"precond_dtype": "float16", "precond_every": 1},
        {"strategy": "fedavg", "precond_dtype": "bfloat16", "precond_every": 5},  # accepted; no state to send
        {"lr": 1, "precond_alpha": 1},  # ints where floats go
        {"dataset": "wine", "num_clients": 3, "model": "mlp"},
    ],
)
def test_validate_accepts_the_edges(kwargs):
    RunConfig(**kwargs).validate()


def test_dataset_sizes_match_scikit_learn():
    # DATASET_SIZES bounds num-clients before any data is loaded; it must be the data's real size,
    # split the way data.py splits it (test_bad_input's dirichlet-impossible case sees 1437 from data.py).
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    from flwr_scaling.data.federated import TEST_FRACTION

    for name, size in DATASET_SIZES.items():
        labels = getattr(datasets, f"load_{name}")().target
        assert len(labels) == size, name
        train, _ = train_test_split(labels, test_size=TEST_FRACTION, stratify=labels, random_state=0)
        assert len(train) == train_size(name, "test"), name
        train, _ = train_test_split(train, test_size=TEST_FRACTION, stratify=train, random_state=0)
        assert len(train) == train_size(name, "validation"), name
    assert train_size("digits") == 1437 and max_clients("digits") == 143
    assert train_size("csv:data.csv") is None and max_clients("csv:data.csv") is None  # known once loaded


def test_every_option_is_checked():
    # A field added without a check would pass any value; these are the checked ones.
    bad = {"precond_probes": 0, "warmup_batches": 0, "local_epochs": 0, "batch_size": 0, "rounds": 0, "num_clients": 0,
           "clients_per_round": 0, "seed": -1, "min_successful_clients": 0, "min_available_clients": 0, "checkpoint_every": -1, "lr": 0.0,
           "server_lr": 0.0, "precond_alpha": 0.0, "precond_beta": 1.0, "adam_beta1": 1.0, "momentum": 1.0,
           "dirichlet_alpha": 0.0, "wait_for_nodes_s": 0.0, "strategy": "x", "precond": "x", "precond_mode": "x",
           "precond_init": "x", "dataset": "x", "eval_split": "x", "model": "x", "out": "\0", "label_column": "",
           "test_path": "missing.csv", "server_tau": 0.0, "server_momentum": 1.0, "proximal_mu": -1.0, "partitioner": "x", "shard_classes": 0,
           "client_eval_every": -1, "precond_dtype": "bf16", "precond_every": 0,
           "screen_factor": 0.5, "max_num_examples": -1, "aggregation": "x", "trim_fraction": 0.5,
           "input_shape": "1x0x8", "label_names": "[1, 2]", "device": "gpu", "client_cpus": 0.0, "client_gpus": -1.0, "tensorboard": "\0"}
    for name, value in bad.items():
        with pytest.raises(ConfigError):
            replace(RunConfig(), **{name: value}).validate()
    assert set(bad) == {key.replace("-", "_") for key in RunConfig.keys()}, "a new option needs a check and a line here"


# ---------------------------------------------------------------------- load_toml
def test_load_toml_reads_top_level_options(tmp_path):
    path = tmp_path / "options.toml"
    path.write_text('precond = "rmsprop"\nlr = 0.01\nrounds = 5\n')
    values = load_toml(str(path))
    assert values == {"precond": "rmsprop", "lr": 0.01, "rounds": 5}
    assert RunConfig.from_mapping(values).resolved().lr == 0.01


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("lr = = 0.1\n", "is not valid TOML: "),
        (b"lr = 0.1 # caf\xe9\n", "is not UTF-8 text"),
        ("[run]\nlr = 0.1\n", "options must be top-level keys, found table [run]"),
        ("run.lr = 0.1\n", "options must be top-level keys, found table [run]"),
    ],
    ids=["invalid", "not-utf8", "table", "dotted-key"],
)
def test_load_toml_rejects_bad_files(tmp_path, content, fragment):
    path = tmp_path / "options.toml"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert fragment in one_line_error(load_toml, str(path))


def test_load_toml_missing_and_folder(tmp_path):
    assert "does not exist or is not a file" in one_line_error(load_toml, str(tmp_path / "missing.toml"))
    assert "does not exist or is not a file" in one_line_error(load_toml, str(tmp_path))


def test_load_toml_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "options.toml"
    path.write_text("lr = 0.1\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config_files, "open", refuse, raising=False)  # root reads anything: fake the refusal
    assert "cannot be read: Permission denied" in one_line_error(load_toml, str(path))


# ------------------------------------------------------------- check_output_folder
def test_output_folder_that_can_be_created(tmp_path):
    check_output_folder(str(tmp_path / "new" / "deeper"))
    check_output_folder(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # it creates nothing


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    assert "is an existing file" in one_line_error(check_output_folder, str(tmp_path / "afile"))
    assert "is a file" in one_line_error(check_output_folder, str(tmp_path / "afile" / "sub"))


@pytest.mark.skipif(IS_ROOT, reason="root writes anywhere")
def test_output_folder_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "is not writable" in one_line_error(check_output_folder, str(locked / "out"))
    finally:
        locked.chmod(0o700)
