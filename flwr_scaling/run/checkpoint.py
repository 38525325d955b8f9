"""Checkpoints: everything a run needs to continue after its last finished round.

One ``checkpoint.npz`` per run folder, written atomically (temporary file,
then rename), so that a process killed at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flwr_scaling.errors import ConfigError, DataError
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.outdir import atomic_file

CHECKPOINT = "checkpoint.npz"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive: a local file header, or an empty archive
# What to do with a damaged checkpoint: it cannot be continued, only replaced.
REDO = "start the run again in a new folder (or restore a copy of the checkpoint)"


@dataclass
class Checkpoint:
    """The state of a run after ``round`` finished rounds."""

    round: int
    config: dict[str, Any]  # the resolved configuration (kebab-case keys)
    model: dict[str, np.ndarray]
    precond_state: dict[str, np.ndarray] | None
    sampler_state: Any  # random.Random.getstate()
    rows: list[dict[str, Any]]  # metrics.csv so far
    # The last preconditioner state sent to clients and its version (round), with precond-every > 1.
    broadcast_version: int | None = None
    broadcast_state: dict[str, np.ndarray] | None = None
    # The server heavy ball's m (server-momentum > 0), float64; None without server momentum.
    server_velocity: dict[str, np.ndarray] | None = None


def _to_json_state(state: Any) -> Any:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _from_json_state(state: Any) -> Any:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_checkpoint(out_dir: str | Path, checkpoint: Checkpoint) -> Path:
    out = Path(out_dir)
    meta = {
        "round": checkpoint.round,
        "config": checkpoint.config,
        "sampler_state": _to_json_state(checkpoint.sampler_state),
        "rows": checkpoint.rows,
        "has_precond": checkpoint.precond_state is not None,
        "broadcast_version": checkpoint.broadcast_version,
        "has_server_velocity": checkpoint.server_velocity is not None,
    }
    arrays = {f"model/{k}": v for k, v in checkpoint.model.items()}
    arrays.update({f"precond/{k}": v for k, v in (checkpoint.precond_state or {}).items()})
    arrays.update({f"broadcast/{k}": v for k, v in (checkpoint.broadcast_state or {}).items()})
    arrays.update({f"server_velocity/{k}": v for k, v in (checkpoint.server_velocity or {}).items()})
    final = out / CHECKPOINT
    with atomic_file(final, fsync=True) as handle:  # fsync: a checkpoint must survive a crash of the machine
        np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
    return final


def load_checkpoint(out_dir: str | Path) -> Checkpoint:
    """The checkpoint in ``out_dir``; DataError (one line: the file, the field, what to do) if it is damaged."""
    path = Path(out_dir) / CHECKPOINT
    if path.exists() and not path.is_file():
        raise DataError(f"{path} is a folder, not a checkpoint; remove or rename it, or {REDO}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {out_dir}: {path.name} is missing (was the run started with checkpoint-every 0?)")
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if start not in ZIP_MAGIC:  # np.load would try to unpickle it, and say so
            raise DataError(f"{_damaged(path)}: byte 0: expected an .npz (zip) archive, got {start!r}; {REDO}")
        with np.load(path, allow_pickle=False) as data:
            if "meta" not in data.files:
                raise DataError(f"{_damaged(path)}: no 'meta' entry; {REDO}")
            meta = json.loads(str(data["meta"]))
            model = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("model/")}
            precond = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("precond/")}
            broadcast = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("broadcast/")}
            velocity = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("server_velocity/")}
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{_damaged(path)} (truncated or garbled: {reason}); {REDO}") from None
    _check_meta(path, meta, model)
    return Checkpoint(
        round=meta["round"],
        config=meta["config"],
        model=model,
        precond_state=precond if meta["has_precond"] else None,
        sampler_state=_from_json_state(meta["sampler_state"]),
        rows=meta["rows"],
        broadcast_version=meta.get("broadcast_version"),
        broadcast_state=broadcast if meta.get("broadcast_version") is not None else None,
        server_velocity=velocity if meta.get("has_server_velocity") else None,
    )


def _damaged(path: Path) -> str:
    return f"checkpoint {path} is damaged"


def _check_meta(path: Path, meta: Any, model: dict[str, np.ndarray]) -> None:
    """DataError naming the first field of ``meta`` that a checkpoint written by ``save_checkpoint`` cannot have."""
    def bad(field: str, expected: str, got: Any) -> DataError:
        return DataError(f"{_damaged(path)}: meta field {field!r} must be {expected}, got {str(got)[:60]}; {REDO}")

    if not isinstance(meta, dict):
        raise DataError(f"{_damaged(path)}: its meta must be a JSON object, got {type(meta).__name__}; {REDO}")
    for field in ("round", "config", "sampler_state", "rows", "has_precond"):
        if field not in meta:
            raise DataError(f"{_damaged(path)}: meta field {field!r} is missing; {REDO}")
    round_ = meta["round"]
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 1:
        raise bad("round", "an integer >= 1 (the finished rounds)", repr(round_))
    if not isinstance(meta["config"], dict):
        raise bad("config", "a JSON object of options", type(meta["config"]).__name__)
    try:
        RunConfig.from_mapping(meta["config"])
    except ConfigError as error:
        raise DataError(f"{_damaged(path)}: meta field 'config': {error}; {REDO}") from None
    rows = meta["rows"]
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows) or len(rows) != round_:
        raise bad("rows", f"a list of {round_} metrics rows (one per finished round)", type(rows).__name__
                  if not isinstance(rows, list) else f"{len(rows)} entries")
    for field in ("has_precond", "has_server_velocity"):
        if not isinstance(meta.get(field, False), bool):
            raise bad(field, "true or false", repr(meta[field]))
    version = meta.get("broadcast_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
        raise bad("broadcast_version", "null or an integer >= 0", repr(version))
    try:
        random.Random().setstate(_from_json_state(meta["sampler_state"]))
    except (TypeError, ValueError, OverflowError):
        raise bad("sampler_state", "a random.Random state [version, [625 integers], gauss]",
                  repr(meta["sampler_state"])) from None
    if not model:
        raise DataError(f"{_damaged(path)}: it holds no model arrays; {REDO}")
