"""A run's output folder: ``config.json``, ``metrics.csv``, one progress line per round, optional TensorBoard events.

The progress lines are log records on the ``flwr_scaling`` logger (``LOGGER``),
which writes them to stdout as plain lines. To silence them:
``logging.getLogger("flwr_scaling").setLevel(logging.WARNING)``; to send them
elsewhere, replace its handlers. With ``tensorboard`` set in the configuration,
the same rows also go to TensorBoard event files under ``DIR/<run folder name>``,
so several runs sharing ``DIR`` show side by side.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from flwr_scaling.errors import ConfigError
# write_atomic is imported from here by the studies too: every output goes through outdir.
from flwr_scaling.run.outdir import write_atomic

LOGGER_NAME = "flwr_scaling"
TENSORBOARD_MISSING = ('--tensorboard needs the tensorboard package, which is not installed: '
                       'pip install "flwr-scaling[tensorboard]"')
# metrics.csv column -> TensorBoard tag (blank cells are skipped).
TENSORBOARD_TAGS = {
    "test_accuracy": "accuracy/test",
    "client_acc_mean": "accuracy/clients_mean",
    "client_acc_worst10": "accuracy/clients_worst10",
    "test_loss": "loss/test",
    "train_loss": "loss/train",
    "f_gap": "loss/f_gap",
    "bytes_down": "bytes/down",
    "bytes_up": "bytes/up",
    "precond_min": "precond/min",
    "precond_max": "precond/max",
    "clients_failed": "clients/failed",
}

COLUMNS = (
    "round",
    "test_loss",
    "test_accuracy",
    "train_loss",
    "bytes_down",
    "bytes_up",
    "wall_s",
    "precond_min",
    "precond_max",
    "clients_ok",
    "clients_failed",
    "client_acc_mean",
    "client_acc_std",
    "client_acc_worst10",
    "f_gap",  # f(x) - f* of the convex logreg objective (objective.py); blank for other models
)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """``metrics.csv`` as a list of rows of floats (``round`` as int)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Blank cells (e.g. client accuracy in rounds without client evaluation) read as NaN.
    return [{k: (int(v) if k == "round" else float(v) if v != "" else float("nan")) for k, v in row.items()} for row in rows]


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of each record (a notebook's, or a test's capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns one; the current stdout is used instead
        pass


def progress_logger() -> logging.Logger:
    """The ``flwr_scaling`` logger, with its stdout handler (bare lines, INFO and up) added on first use.

    It does not propagate to the root logger, so that an application's own
    logging set-up does not print every line twice; add handlers to it instead.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(handler, _StdoutHandler) for handler in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def check_tensorboard(directory: str) -> None:
    """Raise ConfigError (one line, how to install it) if ``directory`` is set and tensorboard is missing."""
    if directory and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(TENSORBOARD_MISSING)


class TensorBoardRounds:
    """TensorBoard scalars of every round (``TENSORBOARD_TAGS``), written as each round finishes."""

    def __init__(self, directory: str | Path) -> None:
        check_tensorboard(str(directory))
        from torch.utils.tensorboard import SummaryWriter  # only with the extra installed

        self.writer = SummaryWriter(log_dir=str(directory))

    def add(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for column, tag in TENSORBOARD_TAGS.items():
            value = row.get(column, "")
            if value != "" and value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)
        if row.get("precond_min"):  # the paper's Γ/α multiplier; 1 for FedAvg
            self.writer.add_scalar("precond/gamma_over_alpha", float(row["precond_max"]) / float(row["precond_min"]), step)
        self.writer.flush()  # a live TensorBoard sees every round as it ends

    def close(self) -> None:
        self.writer.close()


class RunRecorder:
    """Collects one row per round and keeps ``metrics.csv`` complete after every round.

    Parameters
    ----------
    out_dir : str or Path
        The run's folder.
    config : dict
        The resolved configuration (kebab-case keys), written to ``config.json``;
        its ``rounds`` numbers the progress lines and its ``tensorboard`` (if
        set) is the folder of event files (``DIR/<out_dir's name>``).
    label : str
        The run's name at the start of each progress line.
    stream : file, optional
        Where the progress lines go instead of the ``flwr_scaling`` logger.
    """

    def __init__(self, out_dir: str | Path, config: dict[str, Any], label: str, stream=None) -> None:
        self.out_dir = Path(out_dir)
        self.label = label
        self.rows: list[dict[str, Any]] = []
        self.stream = stream
        self.logger = progress_logger()
        self.rounds = int(config.get("rounds", 0))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        board = str(config.get("tensorboard") or "")
        self.tensorboard = TensorBoardRounds(Path(board) / self.out_dir.resolve().name) if board else None
        self._last = time.perf_counter()

    def _progress(self, line: str) -> None:
        if self.stream is not None:
            print(line, file=self.stream, flush=True)
        else:
            self.logger.info(line)

    def initial(self, done: int, test_loss: float, test_accuracy: float) -> None:
        """The model before the first round to run (round 0, or the checkpoint's)."""
        self._last = time.perf_counter()
        resumed = " (resumed from checkpoint)" if done else ""
        self._progress(f"[{self.label}] round {done}/{self.rounds}  test_acc {test_accuracy:.3f}  "
                       f"test_loss {test_loss:.3f}{resumed}")

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue after the rows of a checkpoint; metrics.csv is rewritten with exactly those."""
        self.rows = [dict(row) for row in rows]
        self._write()

    def add(self, row: dict[str, Any]) -> None:
        now = time.perf_counter()
        row = {**row, "wall_s": round(now - self._last, 4)}
        self._last = now
        self.rows.append({k: row.get(k, "") for k in COLUMNS})
        self._write()
        megabytes = (row["bytes_down"] + row["bytes_up"]) / 1e6
        failed = f"  {row['clients_failed']} clients rejected" if row.get("clients_failed") else ""
        gap = f"  f-f* {row['f_gap']:.3g}" if row.get("f_gap", "") != "" else ""
        self._progress(
            f"[{self.label}] round {row['round']}/{self.rounds}  test_acc {row['test_accuracy']:.3f}  "
            f"test_loss {row['test_loss']:.3f}  train_loss {row['train_loss']:.3f}  "
            f"D̂ [{row['precond_min']:.2g}, {row['precond_max']:.2g}]  {megabytes:.2f} MB  {row['wall_s']:.2f} s{gap}{failed}"
        )
        if self.tensorboard is not None:
            self.tensorboard.add(self.rows[-1])
            if int(row["round"]) >= self.rounds:
                self.tensorboard.close()

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.out_dir / "metrics.csv", buffer.getvalue())
