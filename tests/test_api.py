"""The Python API (flwr_scaling.run, compare, sweep): each returns exactly the metrics.csv it wrote, and bad
input raises the command line's one-line ConfigError instead of ending the process."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

import flwr_scaling
from flwr_scaling import ConfigError, RunConfig
from flwr_scaling.run.recorder import read_metrics

TINY = dict(rounds=2, num_clients=3, warmup_batches=1)


def comparable(rows):
    """Rows with NaN (blank cells) as None, so that equal tables compare equal."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]


def test_run_returns_the_metrics_it_wrote(tmp_path):
    result = flwr_scaling.run(backend="inprocess", out=str(tmp_path / "run"), precond="rmsprop", **TINY)
    assert result.out == tmp_path / "run"
    assert result.rounds_run == 2 and result.config.precond == "rmsprop"
    assert [row["round"] for row in result.metrics] == [1, 2]
    assert comparable(result.metrics) == comparable(read_metrics(tmp_path / "run" / "metrics.csv"))


def test_run_takes_a_runconfig_or_a_mapping_and_keywords_override_them(tmp_path):
    from_config = flwr_scaling.run(RunConfig(out=str(tmp_path / "a"), rounds=5, num_clients=3, warmup_batches=1),
                                   rounds=1, backend="inprocess")
    from_mapping = flwr_scaling.run({"out": str(tmp_path / "b"), "rounds": 1, "num-clients": 3, "warmup-batches": 1},
                                    backend="inprocess")
    assert len(from_config.metrics) == len(from_mapping.metrics) == 1
    # Same configuration, same seed: the same numbers (the folder and wall time aside).
    strip = [{k: v for k, v in row.items() if k != "wall_s"} for row in from_mapping.metrics]
    assert comparable(strip) == comparable([{k: v for k, v in row.items() if k != "wall_s"}
                                            for row in from_config.metrics])


def test_compare_returns_every_configuration_s_metrics(tmp_path):
    out = tmp_path / "cmp"
    result = flwr_scaling.compare(configs=["fedavg", "savic-adam-global"], out=out, backend="inprocess", **TINY)
    assert result.out == out and list(result.metrics) == ["fedavg", "savic-adam-global"]
    for label, rows in result.metrics.items():
        assert comparable(rows) == comparable(read_metrics(out / label / "metrics.csv"))
    assert (out / "summary.md").read_text(encoding="utf-8").startswith(
        "# digits, cnn, 3 clients, Dirichlet 0.5, 1 local epoch(s), seed 0\n")


def test_sweep_returns_every_run_s_metrics(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('backend = "inprocess"\n\n[base]\nrounds = 1\nnum-clients = 3\nwarmup-batches = 1\n\n'
                    '[grid]\nmethod = ["fedavg", "savic-adam-global"]\n', encoding="utf-8")
    result = flwr_scaling.sweep(path, out=tmp_path / "out")
    assert sorted(result.metrics) == ["method=fedavg", "method=savic-adam-global"]
    for name, rows in result.metrics.items():
        assert comparable(rows) == comparable(read_metrics(tmp_path / "out" / "runs" / name / "metrics.csv"))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda tmp: flwr_scaling.run(rounds=0, out=str(tmp / "r")), "rounds must be an integer >= 1, got 0"),
        (lambda tmp: flwr_scaling.run({"local_epochs": 2}, out=str(tmp / "r")),
         "unknown option 'local_epochs'; did you mean 'local-epochs'?"),
        (lambda tmp: flwr_scaling.run(out=str(tmp / "r"), backend="ray"),
         "backend must be one of simulation, inprocess, got 'ray'"),
        (lambda tmp: flwr_scaling.compare(configs="fedavg,fedavg", out=tmp / "c"),
         "--configs needs distinct configuration names, got 'fedavg,fedavg'"),
        (lambda tmp: flwr_scaling.compare(configs=["fedavg"], lr=0.1, out=tmp / "c"),
         "option 'lr' is set per configuration by compare; remove it (choose methods with the configuration labels)"),
        (lambda tmp: flwr_scaling.compare(configs=["fedavg"], target_accuracy=2, out=tmp / "c"),
         "target-accuracy must be in (0, 1], got 2.0"),
        (lambda tmp: flwr_scaling.sweep(tmp / "missing.toml"), None),
    ],
)
def test_bad_input_raises_one_line_config_errors_and_writes_nothing(tmp_path, call, message):
    with pytest.raises((ConfigError, FileNotFoundError)) as raised:
        call(tmp_path)
    if message is not None:
        assert str(raised.value) == message
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_the_api_loads_on_first_use():
    import flwr_scaling.api
    import flwr_scaling.run.recorder  # the package flwr_scaling.run stays callable once its modules are loaded

    assert {"run", "compare", "sweep", "RunConfig", "ConfigError"} <= set(dir(flwr_scaling))
    assert flwr_scaling.compare is flwr_scaling.api.compare and flwr_scaling.sweep is flwr_scaling.api.sweep
    assert callable(flwr_scaling.run) and flwr_scaling.run.recorder is sys.modules["flwr_scaling.run.recorder"]


def test_importing_the_package_stays_light():
    code = "import sys, flwr_scaling; print(sorted(m for m in ('torch', 'flwr', 'flwr_scaling.api') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
