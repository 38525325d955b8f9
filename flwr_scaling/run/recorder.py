"""A run's output folder: ``config.json``, ``metrics.csv`` and one progress line per round."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

# write_atomic is imported from here by the studies too: every output goes through outdir.
from flwr_scaling.run.outdir import write_atomic

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


class RunRecorder:
    """Collects one row per round and keeps ``metrics.csv`` complete after every round."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], label: str, stream=None) -> None:
        self.out_dir = Path(out_dir)
        self.label = label
        self.rows: list[dict[str, Any]] = []
        self.stream = stream or sys.stdout
        self.rounds = int(config.get("rounds", 0))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        self._last = time.perf_counter()

    def initial(self, done: int, test_loss: float, test_accuracy: float) -> None:
        """The model before the first round to run (round 0, or the checkpoint's)."""
        self._last = time.perf_counter()
        resumed = " (resumed from checkpoint)" if done else ""
        print(f"[{self.label}] round {done}/{self.rounds}  test_acc {test_accuracy:.3f}  test_loss {test_loss:.3f}{resumed}",
              file=self.stream, flush=True)

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
        print(
            f"[{self.label}] round {row['round']}/{self.rounds}  test_acc {row['test_accuracy']:.3f}  "
            f"test_loss {row['test_loss']:.3f}  train_loss {row['train_loss']:.3f}  "
            f"D̂ [{row['precond_min']:.2g}, {row['precond_max']:.2g}]  {megabytes:.2f} MB  {row['wall_s']:.2f} s{gap}{failed}",
            file=self.stream,
            flush=True,
        )

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.out_dir / "metrics.csv", buffer.getvalue())
