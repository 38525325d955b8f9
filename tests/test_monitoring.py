"""Monitoring: progress lines are log records on the ``flwr_scaling`` logger (printed on stdout), and
``--tensorboard DIR`` writes every round's metrics as TensorBoard scalars under DIR/<run folder name>."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from flwr_scaling.cli import main
from flwr_scaling.run.recorder import LOGGER_NAME, TENSORBOARD_MISSING, read_metrics

TINY = ["--backend", "inprocess", "--rounds", "2", "--num-clients", "3", "--warmup-batches", "1"]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_progress_lines_are_log_records_printed_on_stdout(tmp_path, capsys):
    collect = Collect()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(collect)
    try:
        main(["run", *TINY, "--out", str(tmp_path / "run")])
    finally:
        logger.removeHandler(collect)
    rounds = [m for m in collect.messages if m.startswith("[savic-adam-global] round ")]
    assert [m.split()[2] for m in rounds] == ["0/2", "1/2", "2/2"]
    printed = capsys.readouterr().out.splitlines()
    assert rounds == [line for line in printed if line.startswith("[savic-adam-global] round ")]


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as raised:
        main(["run", *TINY, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert raised.value.code == 2
    assert capsys.readouterr().err == f"flwr-scaling: error: {TENSORBOARD_MISSING}\n"
    assert TENSORBOARD_MISSING.endswith('pip install "flwr-scaling[tensorboard]"')
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_tensorboard_events_hold_every_round_s_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["run", *TINY, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb" / "run"))
    events.Reload()
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    expected = {"accuracy/test": "test_accuracy", "loss/test": "test_loss", "loss/train": "train_loss",
                "bytes/down": "bytes_down", "bytes/up": "bytes_up", "precond/min": "precond_min",
                "precond/max": "precond_max"}
    for tag, column in expected.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2], tag
        # Event files store float32.
        assert [s.value for s in scalars] == pytest.approx([row[column] for row in rows], rel=1e-6), tag
    ratio = [s.value for s in events.Scalars("precond/gamma_over_alpha")]
    assert ratio == pytest.approx([row["precond_max"] / row["precond_min"] for row in rows], rel=1e-6)
    assert "accuracy/clients_mean" not in events.Tags()["scalars"]  # blank without client evaluation
