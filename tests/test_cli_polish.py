"""The command line as a user first meets it: --version, the help's valid values, report on a compare folder."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from flwr_scaling.cli import main
from flwr_scaling.core.rules import MODES, RULES
from flwr_scaling.methods import METHODS


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version_is_the_installed_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"flwr-scaling {version('flwr-scaling')}\n"


@pytest.mark.parametrize("command", ["run", "compare", "sweep", "deploy-local"])
def test_no_choice_option_shows_a_placeholder(capsys, command):
    text = _help(capsys, command)
    for placeholder in ("STRATEGY", "PRECOND ", "PRECOND_MODE", "PRECOND_INIT", "PRECOND_DTYPE", "PARTITIONER",
                        "EVAL_SPLIT", "MODEL", "DATASET", "BACKEND"):
        assert placeholder not in text, (command, placeholder)


def test_run_help_lists_every_registered_value(capsys):
    usage = " ".join(_help(capsys, "run").split())
    assert f"--strategy {{{','.join(METHODS)}}}" in usage
    assert f"--precond {{{','.join(RULES)}}}" in usage
    assert f"--precond-mode {{{','.join(MODES)}}}" in usage
    assert "--partitioner {dirichlet,iid,shard}" in usage
    assert "--backend {simulation,inprocess}" in usage
    assert re.search(r"--dataset \{digits,breast_cancer,wine,[^}]*hf:NAME\}", usage)
    assert "hf:ylecun/mnist" in usage  # the hub source has a worked example


def test_compare_help_lists_the_baselines_rules_and_modes(capsys):
    text = " ".join(_help(capsys, "compare").split())
    assert ("a baseline (fedavg, fedadam, fedyogi, fedadagrad, fedprox, local-adam) or savic-<rule>-<mode> "
            "with <rule> one of identity, adagrad, rmsprop, adam, oasis and <mode> one of global, local") in text


def test_sweep_help_lists_the_backends(capsys):
    assert "--backend {simulation,inprocess}" in " ".join(_help(capsys, "sweep").split())
