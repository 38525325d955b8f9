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
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.recorder import read_metrics, write_atomic

SWEEP_JSON = "sweep.json"  # the plan of the sweep, written before the first run; the report reads it
RUNS = "runs"  # OUT/runs/<name>: one folder per run
DONE = "DONE"
LOG = "log.txt"  # what a run printed
METRICS = "metrics.csv"
# What a run leaves in its folder; removed before a run starts from scratch.
RUN_FILES = (DONE, METRICS, "config.json", CHECKPOINT, LOG)
# What a report writes into a sweep's or a comparison's folder (all files but ``partitions``, a folder).
REPORT_FILES = ("results.csv", "summary.csv", "summary.md", "compare.json", "accuracy.png", "accuracy_vs_mb.png",
                "gamma_over_alpha.png", "optimality_gap.png", "client_worst10.png")
REPORT_FOLDERS = ("partitions",)
# The metrics.csv columns a report reads; a file without them is not a finished run.
REPORTED_COLUMNS = ("round", "test_accuracy", "bytes_down", "bytes_up", "precond_min", "precond_max")


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
    return (isinstance(done, dict) and isinstance(done.get("config", {}), dict)
            and same_config(done.get("config", {}), config)
            and all(column in row for row in rows for column in REPORTED_COLUMNS)
            and len(rows) == int(config["rounds"]) and [r["round"] for r in rows] == list(range(1, len(rows) + 1)))


def check_output_files(folder: str | Path, files: tuple[str, ...] = REPORT_FILES,
                       folders: tuple[str, ...] = REPORT_FOLDERS) -> None:
    """ConfigError if something that is not a file stands where a report (or run) writes one of ``files`` in ``folder``
    (or a file where it writes one of ``folders``), before anything is written."""
    for name in files:
        path = Path(folder) / name
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is a folder, where flwr-scaling writes a file; remove or rename it and run "
                              f"the command again")
    for name in folders:
        path = Path(folder) / name
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, where flwr-scaling writes a folder; remove or rename it and run "
                              f"the command again")


def check_planned_runs(spec_file: Path, runs: Any, grid: Mapping[str, Any]) -> None:
    """ConfigError naming the first entry of a sweep's planned ``runs`` (from ``spec_file``) that a report cannot
    read: each is an object with a plain folder ``name``, a ``config`` object and the grid's ``values``; and the
    folder that holds them, ``runs``, is a folder."""
    def bad(index: int, why: str) -> ConfigError:
        return ConfigError(f"{spec_file}: runs[{index}] {why}; the file was edited or damaged: run the sweep again "
                           f"(finished runs are kept)")

    if not isinstance(runs, list):
        raise ConfigError(f"{spec_file}: 'runs' must be a list, got {type(runs).__name__}; run the sweep again")
    for index, run in enumerate(runs):
        if not isinstance(run, dict):
            raise bad(index, f"must be an object, got {type(run).__name__}")
        name = run.get("name")
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise bad(index, f"has no plain folder name (got {name!r})")
        if not isinstance(run.get("config"), dict) or "rounds" not in run["config"]:
            raise bad(index, "has no 'config' object with its rounds")
        values = run.get("values")
        if not isinstance(values, dict) or any(key not in values for key in grid):
            raise bad(index, f"has no 'values' for every grid key ({', '.join(grid)})")
    folder = spec_file.parent / RUNS
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, where the sweep keeps its runs' folders; remove or rename it and "
                          f"run the sweep again")


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


__all__ = ["SWEEP_JSON", "RUNS", "DONE", "LOG", "METRICS", "RUN_FILES", "REPORT_FILES", "REPORT_FOLDERS",
           "REPORTED_COLUMNS", "check_output_files", "check_planned_runs", "same_config", "is_finished",
           "resumable_checkpoint", "clear_run_folder", "completed_rows", "mark_done"]
