"""The registries are the one place to extend: a rule or a method added from outside the package runs end to end.

Each test registers its entry through the public call (``register_rule``,
``register_method``), as a user's own module would, and a fixture removes it
afterwards so that no other test sees it. The defaults the package documents
(``[tool.flwr.app.config]``, the command line's help) are checked against the
registries and ``RunConfig``, their one source.
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_scaling.cli import main
from flwr_scaling.cli_help import option_help
from flwr_scaling.core.rules import MODES, RULES, STAT_GRAD_SQUARED, ScalingRule, register_rule, unregister_rule
from flwr_scaling.methods import (
    METHODS,
    SERVER_OPTIMIZERS,
    Method,
    get_method,
    parse_label,
    register_method,
    scaled_sgd,
    unregister_method,
)
from flwr_scaling.run.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--backend", "inprocess", "--rounds", "2", "--num-clients", "3", "--warmup-batches", "1"]


# --------------------------------------------------------------- a new rule
def _maximum(a, b):
    """Element-wise maximum for torch tensors (client) and NumPy arrays (server)."""
    return torch.maximum(a, b) if isinstance(a, torch.Tensor) else np.maximum(a, b)


def _max_of_decayed(state, statistic, beta):
    # v <- max(beta v, g ⊙ g): the largest recent squared gradient, forgotten at rate beta.
    return {k: _maximum(beta * state[k], statistic[k]) for k in state}


def _root(value):
    # D(v) = sqrt(v): the largest recent |g|.
    return value**0.5


MAXABS_ALPHA = 0.01
MAXABS = ScalingRule(
    "maxabs", STAT_GRAD_SQUARED, _max_of_decayed, _root,
    default_lr={"global": 0.003, "local": 0.003}, default_alpha=MAXABS_ALPHA,
)


@pytest.fixture
def registered_rules():
    """Register rules for one test; they are removed afterwards."""
    names = []

    def register(rule: ScalingRule) -> ScalingRule:
        names.append(rule.name)
        return register_rule(rule)

    yield register
    for name in names:
        unregister_rule(name)
    assert not set(names) & set(RULES)


@pytest.fixture
def maxabs(registered_rules):
    return registered_rules(MAXABS)


@pytest.fixture
def registered_methods():
    """Register methods for one test; they are removed afterwards."""
    names = []

    def register(method: Method) -> Method:
        names.append(method.name)
        return register_method(method)

    yield register
    for name in names:
        unregister_method(name)
    assert not set(names) & set(METHODS)


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["round"] != "0"]


def test_maxabs_rule_by_hand(maxabs):
    state = {"w": np.array([4.0, 1.0], dtype=np.float32)}
    statistic = {"w": np.array([1.0, 9.0], dtype=np.float32)}
    new = maxabs.update(state, statistic, 0.5)  # max([2, 0.5], [1, 9])
    np.testing.assert_array_equal(new["w"], [2.0, 9.0])
    diag = maxabs.diagonal(new, 2.0)  # max(2, sqrt([2, 9])) = [2, 3]
    np.testing.assert_array_equal(diag["w"], [2.0, 3.0])
    assert not maxabs.has_in_place  # a rule without fast variants trains through the pure functions


@pytest.mark.parametrize("mode", MODES)
def test_a_registered_rule_runs_end_to_end(maxabs, mode, tmp_path):
    out = tmp_path / mode
    main(["run", *SMALL_RUN, "--precond", "maxabs", "--precond-mode", mode, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    config = config.get("config", config)
    # The rule's own defaults were filled in.
    assert (config["precond"], config["precond-alpha"], config["lr"]) == ("maxabs", MAXABS_ALPHA, 0.003)
    rows = read_rows(out)
    assert [row["round"] for row in rows] == ["1", "2"]
    assert all(row["clients_ok"] == "3" and row["clients_failed"] == "0" for row in rows)
    for row in rows:
        low, high = float(row["precond_min"]), float(row["precond_max"])
        assert MAXABS_ALPHA * (1 - 1e-6) <= low <= high and math.isfinite(high)
    # It learns: the loss falls and digits (10 classes) is above chance after two rounds.
    assert float(rows[1]["test_loss"]) < float(rows[0]["test_loss"])
    assert float(rows[1]["test_accuracy"]) > 0.2


def test_a_registered_rule_is_listed_and_parsed(maxabs):
    assert "maxabs" in option_help()["precond"]
    assert parse_label("savic-maxabs-local") == {"strategy": "savic", "precond": "maxabs", "precond-mode": "local"}
    assert RunConfig(precond="maxabs").resolved().label() == "savic-maxabs-global"


def test_a_rule_without_default_step_size_needs_lr(registered_rules):
    registered_rules(ScalingRule("nolr", STAT_GRAD_SQUARED, _max_of_decayed, _root))
    with pytest.raises(ConfigError) as error:
        RunConfig(precond="nolr").resolved()
    assert str(error.value) == "scaling rule 'nolr' has no default step size; give one with --lr"
    assert RunConfig(precond="nolr", lr=0.1).resolved().lr == 0.1


@pytest.mark.parametrize(
    "rule, message",
    [
        (ScalingRule("adam", STAT_GRAD_SQUARED, _max_of_decayed, _root),
         "a scaling rule named 'adam' is registered already; pass replace=True to replace it"),
        (ScalingRule("bad", "hessian", _max_of_decayed, _root),
         "rule 'bad': unknown statistic 'hessian'; choose one of none, grad-squared, hutchinson"),
        (ScalingRule("bad", STAT_GRAD_SQUARED, _max_of_decayed, _root, default_lr={"global": 0.1}),
         "rule 'bad': default_lr lacks the mode(s) local"),
        (ScalingRule("bad", STAT_GRAD_SQUARED, _max_of_decayed, _root, default_alpha=0.0),
         "rule 'bad': default_alpha must be finite and > 0, got 0.0"),
        (ScalingRule("a b", STAT_GRAD_SQUARED, _max_of_decayed, _root),
         "a rule name must be a non-empty word without spaces or commas, got 'a b'"),
    ],
)
def test_register_rule_refuses_a_bad_entry(rule, message):
    before = dict(RULES)
    with pytest.raises(ValueError) as error:
        register_rule(rule)
    assert str(error.value) == message
    assert RULES == before


# ------------------------------------------------------------- a new method
def test_a_registered_method_runs_end_to_end(registered_methods, tmp_path):
    # FedAvg's parts (plain SGD on the clients, the mean on the server) with a smaller default step.
    registered_methods(Method("fedavg-slow", "Local SGD with small steps", trainer=scaled_sgd, lr=0.05))
    out = tmp_path / "slow"
    main(["run", *SMALL_RUN, "--strategy", "fedavg-slow", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    config = config.get("config", config)
    assert (config["strategy"], config["precond"], config["lr"], config["server-lr"]) == ("fedavg-slow", "identity", 0.05, 1.0)
    rows = read_rows(out)
    assert [row["round"] for row in rows] == ["1", "2"]
    # No preconditioner travels: D̂ is 1 and a round moves only the model.
    assert all(float(row["precond_min"]) == float(row["precond_max"]) == 1.0 for row in rows)
    assert float(rows[1]["test_loss"]) < float(rows[0]["test_loss"])


def test_a_registered_method_with_a_server_optimizer(registered_methods):
    registered_methods(Method("fedyogi-fast", "FedYogi, larger server steps", lr=0.05, server_lr=0.5,
                              server_optimizer="fedyogi"))
    from flwr_scaling.server_app import make_strategy
    from flwr_scaling.strategies.fedopt import ServerOptimizer

    cfg = RunConfig(strategy="fedyogi-fast", num_clients=4).resolved()
    assert (cfg.lr, cfg.server_lr, cfg.label()) == (0.05, 0.5, "fedyogi-fast")
    assert parse_label("fedyogi-fast") == {"strategy": "fedyogi-fast"}
    strategy = make_strategy(cfg)
    assert isinstance(strategy, ServerOptimizer)
    assert type(strategy.server_step.flower).__mro__[1].__name__ == "FedYogi"
    assert strategy.server_step.flower.eta == 0.5


def test_a_registered_scaled_method_has_rule_labels(registered_methods):
    registered_methods(Method("savic-fast", "savic with larger steps", scaled=True, default_precond="rmsprop", lr=0.01))
    assert parse_label("savic-fast-adam-local") == {"strategy": "savic-fast", "precond": "adam", "precond-mode": "local"}
    assert parse_label("savic-adam-local") == {"strategy": "savic", "precond": "adam", "precond-mode": "local"}
    cfg = RunConfig(strategy="savic-fast").resolved()
    assert (cfg.precond, cfg.lr, cfg.label()) == ("rmsprop", 0.01, "savic-fast-rmsprop-global")
    assert "savic-fast (savic with larger steps)" in option_help()["strategy"]


@pytest.mark.parametrize(
    "method, message",
    [
        (Method("fedavg", "again"), "a method named 'fedavg' is registered already; pass replace=True to replace it"),
        (Method("m", "x", default_precond="adam"),
         "method 'm' takes no preconditioner, so its default_precond must be 'identity'"),
        (Method("m", "x", default_precond="nope"),
         "method 'm': unknown default_precond 'nope'; choose one of identity, adagrad, rmsprop, adam, oasis"),
        (Method("m", "x", server_optimizer="fedsgd"),
         "method 'm': unknown server_optimizer 'fedsgd'; choose one of fedadam, fedyogi, fedadagrad"),
        (Method("m", "x", lr=-1.0), "method 'm': lr must be finite and > 0, got -1.0"),
    ],
)
def test_register_method_refuses_a_bad_entry(method, message):
    before = dict(METHODS)
    with pytest.raises(ValueError) as error:
        register_method(method)
    assert str(error.value) == message
    assert METHODS == before


def test_the_built_in_methods():
    assert list(METHODS) == ["fedavg", "savic", "fedadam", "fedyogi", "fedadagrad", "fedprox", "local-adam"]
    assert [n for n, m in METHODS.items() if m.scaled] == ["savic"]
    assert [n for n, m in METHODS.items() if m.proximal] == ["fedprox"]
    assert {n: m.server_optimizer for n, m in METHODS.items() if m.server_optimizer} == {
        "fedadam": "fedadam", "fedyogi": "fedyogi", "fedadagrad": "fedadagrad"}
    assert get_method("local-adam").trainer is not scaled_sgd
    with pytest.raises(ConfigError) as error:
        get_method("fedsgd")
    assert str(error.value).startswith("unknown strategy 'fedsgd'; choose one of fedavg, savic, fedadam")


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_every_server_optimizer_name_is_one_flower_runs(name):
    from flwr_scaling.strategies.fedopt import FlowerServerStep

    step = FlowerServerStep(name, eta=0.1, tau=1e-3)
    assert type(step.flower).__mro__[1].__name__.lower() == name


# ------------------------------------------------------- defaults in one place
# Options whose pyproject value differs from RunConfig's on purpose: `flwr run .`
# writes to its own folder rather than runs/<label>, where the CLI's runs go.
# num-clients: "auto", one client per SuperNode of the federation `flwr run .` starts.
FLOWER_APP_OWN = {"out": "runs/flwr-run", "num-clients": "auto"}


def test_the_flower_app_config_matches_runconfig_defaults():
    with open(ROOT / "pyproject.toml", "rb") as handle:
        app_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    assert list(app_config) == RunConfig.keys()  # same keys, in RunConfig's order
    for field in fields(RunConfig):
        key = RunConfig.key(field.name)
        # Flower's config has no null: "" stands for a default that depends on the method (None here).
        expected = FLOWER_APP_OWN.get(key, "" if field.default is None else field.default)
        assert app_config[key] == expected and type(app_config[key]) is type(expected), key


def test_the_help_shows_every_registered_choice_and_default():
    text = option_help()
    assert set(text) == {f.name for f in fields(RunConfig)}
    for name in METHODS:
        assert name in text["strategy"]
    assert text["strategy"].endswith(f"Default: {RunConfig.strategy}")
    assert text["precond"] == ("scaling rule; one of: identity, adagrad, rmsprop, adam, oasis. "
                               "Default: adam for savic; identity otherwise")
    assert text["precond_alpha"].endswith("Default: 0.1 for oasis; 0.001 otherwise")
    assert text["server_lr"].endswith("Default: 0.1 for fedadam, fedyogi, fedadagrad; 1 otherwise")
    assert "0.05 for fedadam, fedyogi, fedadagrad; 0.4 for fedprox; 0.01 for local-adam" in text["lr"]
    assert "adam 0.003/0.01" in text["lr"]
    assert text["rounds"].endswith(f"Default: {RunConfig.rounds}")
    assert text["precond_mode"].endswith("one of: global, local. Default: global")
