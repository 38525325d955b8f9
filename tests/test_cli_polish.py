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


# ------------------------------------------------------------ num-clients auto
def test_num_clients_auto_is_accepted_and_the_command_line_resolves_it_to_ten():
    from flwr_scaling.run.config import ConfigError, RunConfig

    cfg = RunConfig.from_mapping({"num-clients": "auto"})
    assert cfg.num_clients == "auto"
    assert cfg.resolved().num_clients == 10 and cfg.resolved().clients_per_round == 10
    with pytest.raises(ConfigError, match="^num-clients must be an integer, got 'many'$"):
        RunConfig.from_mapping({"num-clients": "many"})


class GrowingGrid:
    """A grid whose nodes connect one per look, up to ``total`` (real SuperNodes arriving)."""

    def __init__(self, total: int) -> None:
        self.total, self.looks = total, 0

    def get_node_ids(self):
        self.looks += 1
        return list(range(min(self.looks, self.total)))


def test_auto_counts_the_nodes_once_their_number_holds():
    from flwr_scaling.server_app import settled_node_count

    assert settled_node_count(GrowingGrid(3), timeout_s=10, settle_s=0.3) == 3


def test_auto_without_any_node_fails_in_one_line():
    from flwr_scaling.run.config import ConfigError
    from flwr_scaling.server_app import settled_node_count

    with pytest.raises(ConfigError, match=r"^no node connected after 0.5 s: start SuperNodes \(num-clients is auto\)$"):
        settled_node_count(GrowingGrid(0), timeout_s=0.5, settle_s=0.1)


# ------------------------------------------------------------------ no warnings
@pytest.mark.slow
def test_a_simulation_run_prints_no_warning(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "flwr-scaling"), "run", "--backend", "simulation", "--rounds", "1",
         "--num-clients", "2", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "WARNING" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr
