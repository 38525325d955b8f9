"""The state of a sweep folder on disk: which runs are finished, which can resume, and the files that say so.

A sweep folder ``OUT`` holds ``sweep.json`` (the planned runs) and one folder
``OUT/runs/<name>`` per run. A run is finished when its folder holds a
``DONE`` marker (written atomically after the run returned, with the
configuration it ran) and a ``metrics.csv`` of ``rounds`` rows. An unfinished
run resumes from its checkpoint when the checkpoint has the same
configuration; any other unfinished run starts again from an emptied folder.
Everything here reads or writes single files; nothing runs training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from flwr_scaling.run.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.recorder import read_metrics, write_atomic

SWEEP_JSON = "sweep.json"  # the plan of the sweep, written before the first run; the report reads it
RUNS = "runs"  # OUT/runs/<name>: one folder per run
DONE = "DONE"
LOG = "log.txt"  # what a run printed
METRICS = "metrics.csv"
# What a run leaves in its folder; removed before a run starts from scratch.
RUN_FILES = (DONE, METRICS, "config.json", CHECKPOINT, LOG)


def same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two kebab-case configurations are equal apart from ``out``.

    ``out`` is ignored because a sweep folder may be moved or named by another
    path; an option missing on one side (saved before the option existed)
    counts as its default.
    """
    defaults = {RunConfig.key(f.name): f.default for f in fields(RunConfig)}
    keys = (set(a) | set(b)) - {"out"}
    missing = object()
    return all(a.get(k, defaults.get(k, missing)) == b.get(k, defaults.get(k, missing)) for k in keys)


def is_finished(folder: str | Path, config: Mapping[str, Any]) -> bool:
    """``folder`` holds a finished run of ``config`` (kebab-case, resolved): DONE for it and all its rounds."""
    folder = Path(folder)
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
        rows = read_metrics(folder / METRICS)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return (isinstance(done, dict) and same_config(done.get("config", {}), config)
            and len(rows) == int(config["rounds"]) and [r["round"] for r in rows] == list(range(1, len(rows) + 1)))


def resumable_checkpoint(folder: Path, config: Mapping[str, Any]) -> Checkpoint | None:
    """The folder's checkpoint, if it belongs to this configuration and can be continued; else ``None``."""
    if not (folder / CHECKPOINT).is_file():
        return None
    try:
        checkpoint = load_checkpoint(folder)
    except Exception:  # an unreadable checkpoint only means: start again
        return None
    if not same_config(checkpoint.config, config):
        return None
    if not 0 < checkpoint.round <= int(config["rounds"]) or len(checkpoint.rows) != checkpoint.round:
        return None
    return checkpoint


def clear_run_folder(folder: Path) -> None:
    """Remove what an earlier attempt left, so that a run starting from scratch finds an empty folder."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)


def completed_rows(folder: Path, name: str, rounds: int) -> list[dict[str, float]]:
    """The rows of the run ``name`` that just returned; RuntimeError unless it wrote all ``rounds``."""
    metrics = folder / METRICS
    rows = read_metrics(metrics) if metrics.is_file() else []
    if len(rows) != rounds:
        raise RuntimeError(f"run {name} ended with {len(rows)} of {rounds} rounds in {metrics}")
    return rows


def mark_done(folder: Path, config: Mapping[str, Any], rows: list[dict[str, float]], seconds: float) -> None:
    """Write the DONE marker (atomically) for a run of ``config`` that finished with ``rows`` in ``seconds``."""
    record = {"config": dict(config), "rounds": len(rows), "seconds": round(seconds, 3),
              "final_test_accuracy": rows[-1]["test_accuracy"]}
    write_atomic(folder / DONE, json.dumps(record, indent=2, sort_keys=True) + "\n")


__all__ = ["SWEEP_JSON", "RUNS", "DONE", "LOG", "METRICS", "RUN_FILES", "same_config", "is_finished",
           "resumable_checkpoint", "clear_run_folder", "completed_rows", "mark_done"]
