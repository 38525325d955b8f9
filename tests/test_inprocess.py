"""The in-process backend: the real ServerApp and ClientApp code without Ray.

It must give what the simulation engine gives (the study in experiments/ runs
on it), keep each node's Context across rounds, and turn a raising client into
an error reply as the simulation engine does.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_scaling.run.checkpoint import load_checkpoint
from flwr_scaling.cli import main
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.inprocess import InProcessGrid, run_inprocess
from flwr_scaling.run.recorder import read_metrics
from flwr_scaling.run.serial import run_serial
from flwr_scaling.studies.sweep import load_sweep, run_sweep
from flwr_scaling.testing import faulty_client_app

SMALL = dict(rounds=3, num_clients=4, warmup_batches=1)


def test_inprocess_matches_the_simulation_engine(tmp_path):
    """Same configuration on both backends: same accuracies, losses, bytes and D̂ bounds every round."""
    from flwr_scaling.run.simulation import simulate

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray_ip")
    common = dict(SMALL, client_eval_every=2, precond_mode="local")
    local = run_inprocess(RunConfig(out=str(tmp_path / "inprocess"), **common))
    ray = simulate(RunConfig(out=str(tmp_path / "simulation"), **common))
    assert len(local) == len(ray) == 3
    for ours, theirs in zip(local, ray):
        for key in ("test_accuracy", "test_loss", "bytes_down", "bytes_up", "precond_min", "precond_max",
                    "clients_ok", "clients_failed", "client_acc_mean", "client_acc_worst10"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, nan_ok=True), key
        # FedAvg's metric average sums in arrival order: equal to float32 rounding.
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)
    assert np.isnan(local[0]["client_acc_mean"]) and not np.isnan(local[1]["client_acc_mean"])


def test_faulty_clients_are_rejected_and_the_rest_equals_the_serial_reference(tmp_path):
    """Three of six clients send NaN, a negative statistic or raise: each round counts them as failed,
    and the model equals the serial reference run without them."""
    faulty = {1: "nan-model", 3: "negative-stats", 4: "raise"}
    cfg = RunConfig(out=str(tmp_path / "run"), rounds=2, num_clients=6, warmup_batches=1, checkpoint_every=1)
    rows = run_inprocess(cfg, client_app=faulty_client_app(faulty))
    assert [(r["clients_ok"], r["clients_failed"]) for r in rows] == [(3, 3), (3, 3)]
    _, reference = run_serial(cfg, exclude=frozenset(faulty))
    model = load_checkpoint(tmp_path / "run").model
    for key, value in reference.items():
        np.testing.assert_allclose(model[key], value, rtol=1e-5, atol=1e-6)


def _counting_app() -> ClientApp:
    app = ClientApp()

    @app.query("count")
    def count(message: Message, context: Context) -> Message:
        seen = int(context.state["calls"]["n"]) + 1 if "calls" in context.state.metric_records else 1
        context.state["calls"] = MetricRecord({"n": seen})
        partition = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"n": seen, "partition": partition})}), reply_to=message)

    @app.query("fail")
    def fail(message: Message, context: Context) -> Message:
        raise ValueError("broken on purpose")

    return app


def _ask(grid: InProcessGrid, kind: str, nodes) -> list[Message]:
    return list(grid.send_and_receive([Message(RecordDict(), node, f"query.{kind}") for node in nodes]))


def test_each_node_keeps_its_context_and_a_raising_client_is_an_error_reply():
    from flwr_scaling.run.inprocess import server_identity

    grid = InProcessGrid(client_app=_counting_app(), num_nodes=3)
    nodes = sorted(grid.get_node_ids())
    with server_identity():
        _ask(grid, "count", nodes)
        replies = _ask(grid, "count", nodes[:2])
        failed = _ask(grid, "fail", nodes[:1])
    assert [(r.content["metrics"]["partition"], r.content["metrics"]["n"]) for r in replies] == [(0, 2), (1, 2)]
    assert [r.metadata.src_node_id for r in replies] == nodes[:2]
    assert failed[0].has_error()
    assert failed[0].error.reason == "<class 'ValueError'>:<'broken on purpose'>"


# ------------------------------------------------------------ sweep files
SWEEP = """\
backend = "inprocess"

[base]
rounds = 2
num-clients = 3
warmup-batches = 1

[method-options.fedavg]
lr = 0.5

[grid]
method = ["fedavg", "savic-adam-global"]
seed = [0]
"""


def test_method_options_set_one_method_and_backend_comes_from_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP)
    sweep = load_sweep(path, tmp_path / "out")
    assert sweep.backend == "inprocess"
    lrs = {run.values["method"]: run.config.lr for run in sweep.runs}
    assert lrs == {"fedavg": 0.5, "savic-adam-global": RunConfig(strategy="savic").resolved().lr}
    stream = io.StringIO()
    out = run_sweep(path, tmp_path / "out", stream=stream)
    assert "2 runs (inprocess)" in stream.getvalue()
    for run in sweep.runs:
        assert len(read_metrics(out / "runs" / run.name / "metrics.csv")) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (('backend = "inprocess"', 'backend = "ray"'), 'backend must be one of simulation, inprocess, got "ray"'),
        (("[method-options.fedavg]", "[method-options.fedprx]"),  # not in the grid, and not a method at all
         "[method-options.fedprx]: unknown configuration 'fedprx'"),
        (("lr = 0.5", "rounds = 3"), "[method-options.fedavg] sets 'rounds', which is also in [base]; keep it in one place"),
        (("lr = 0.5", "precond = \"adam\""), "[method-options.fedavg] cannot set 'precond'"),
        (("lr = 0.5", "lr = -1"), "[method-options.fedavg] lr must be"),
    ],
)
def test_bad_backend_and_method_options_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.replace(*change))
    with pytest.raises(ConfigError) as raised:
        load_sweep(path, tmp_path / "out")
    assert f"{path}: {message}" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_cli_run_with_the_inprocess_backend(tmp_path, capsys):
    main(["run", "--backend", "inprocess", "--rounds", "2", "--num-clients", "3", "--warmup-batches", "1",
          "--out", str(tmp_path / "run")])
    assert "final test accuracy" in capsys.readouterr().out
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 2


def test_a_normal_inprocess_run_prints_nothing_on_stderr(tmp_path):
    # Flower's notices we cannot act on (fraction_evaluate 0 on purpose) are silenced at their source.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "flwr_scaling", "run", "--backend", "inprocess", "--rounds", "1",
                           "--num-clients", "3", "--warmup-batches", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
