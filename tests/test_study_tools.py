"""Sweep report fixes for tuning (issue 14): per-alpha targets, report --target, validation labels, the server
step column, notes for ignored method-options, the include file; fake runs with hand-computed numbers."""

from __future__ import annotations

import io
import json

import pytest

from flwr_scaling.run.config import ConfigError
from flwr_scaling.studies.plan import load_sweep
from flwr_scaling.studies.report import write_sweep_report
from flwr_scaling.studies.runner import run_sweep
from tests.test_sweep import FakeRunner, fast_plots  # noqa: F401  (fixture)

SWEEP = """\
target-accuracy = {"0.1" = 0.5, "0.5" = 0.8}
[base]
rounds = 4
num-clients = 3
warmup-batches = 1
[method-options.fedavg]
lr = 0.4
server-lr = 0.5
[method-options.fedprox]
lr = 0.1
[grid]
method = ["fedavg", "savic-adam-global"]
dirichlet-alpha = [0.1, 0.5]
seed = [0, 1]
"""


def table_row(markdown: str, start: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(start))


def test_per_alpha_targets_report_target_and_the_server_step_column(tmp_path, fast_plots):  # noqa: F811
    path = tmp_path / "s.toml"
    path.write_text(SWEEP)
    stream = io.StringIO()
    run_sweep(path, tmp_path / "out", runner=FakeRunner(), stream=stream)
    assert ("note: [method-options.fedprox] ignored: fedprox is not in [grid] method (fedavg, savic-adam-global)"
            in stream.getvalue())
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert ("| method | dirichlet-alpha | lr | server-lr | seeds | target | final acc | best acc | mean acc over rounds "
            "| rounds to target | MB to target |") in markdown
    # fedavg accuracy (0.6 + 0.05 seed)(1 − 0.5**round): 0.525 and 0.569 in round 3, below 0.8 in every round.
    assert table_row(markdown, "| fedavg | 0.1 |").startswith("| fedavg | 0.1 | 0.4 | 0.5 | 2 | 0.5 | ")
    assert "| 3 (2/2) | 0.60 |" in table_row(markdown, "| fedavg | 0.1 |")
    assert "| > 4 (0/2) | - |" in table_row(markdown, "| fedavg | 0.5 |")
    assert table_row(markdown, "| savic-adam-global | 0.1 |").startswith("| savic-adam-global | 0.1 | 0.003 | 1 | 2 |")
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["target-accuracy"] == {"0.1": 0.5, "0.5": 0.8}
    # the paired table per setting: savic − fedavg in final accuracy is 0.3 · 0.9375 for each seed
    assert "| dirichlet-alpha=0.5 | savic-adam-global vs fedavg | 2 | +0.281 [+0.281, +0.281] | better |" in markdown

    write_sweep_report(tmp_path / "out", target=0.5)  # report --target 0.5: one target for every group
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| rounds to 0.5 | MB to 0.5 |" in markdown and "| target |" not in markdown
    assert "| 3 (2/2) | 0.60 |" in table_row(markdown, "| fedavg | 0.5 |")


def test_validation_runs_are_labelled_validation(tmp_path, fast_plots):  # noqa: F811
    path = tmp_path / "s.toml"
    path.write_text('[base]\nrounds = 2\nnum-clients = 3\nwarmup-batches = 1\neval-split = "validation"\n'
                    '[grid]\nmethod = ["fedavg"]\nseed = [0]\n')
    run_sweep(path, tmp_path / "out", runner=FakeRunner(), stream=io.StringIO())
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| final val acc | best val acc | mean val acc over rounds | rounds to 0.9 |" in markdown
    assert "Accuracy on the validation split." in markdown


@pytest.mark.parametrize("target, message", [
    ("{0.1 = 0.8}", "target-accuracy: quote each alpha, e.g. {\"0.1\" = 0.8}"),
    ('{"0.1" = 1.5}', "target-accuracy for alpha 0.1 must be a number in (0, 1], got 1.5"),
    ('{"x" = 0.5}', "target-accuracy keys are Dirichlet alphas (\"0.1\") or default, got 'x'"),
    ('{"0.1" = 0.5}', "target-accuracy names no target for dirichlet-alpha 0.5"),
])
def test_bad_per_alpha_targets_are_one_line_errors(tmp_path, target, message):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.replace('{"0.1" = 0.5, "0.5" = 0.8}', target))
    with pytest.raises(ConfigError) as error:
        load_sweep(path, tmp_path / "out")
    assert str(error.value).startswith(f"{path}: {message}")


def test_a_default_target_covers_the_other_alphas(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.replace('{"0.1" = 0.5, "0.5" = 0.8}', '{"0.1" = 0.5, default = 0.7}'))
    assert load_sweep(path, tmp_path / "out").target == {"0.1": 0.5, "default": 0.7}


def test_cli_report_target_and_tune_errors_are_one_line(tmp_path, capsys):
    from flwr_scaling.cli import main

    (tmp_path / "sweep").mkdir()
    for argv, message in (
        (["report", str(tmp_path / "sweep"), "--target", "1.5"], "--target must be in (0, 1], got 1.5"),
        (["report", str(tmp_path / "sweep"), "--target", "x"], "--target must be a number in (0, 1], got 'x'"),
        (["tune", str(tmp_path / "missing.toml")], f"tuning file '{tmp_path / 'missing.toml'}' does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"flwr-scaling: error: {message}"), err
