"""Checkpoints: everything a run needs to continue after its last finished round.

One ``checkpoint.npz`` per run folder, written atomically (temporary file,
then rename), so that a process killed at any moment leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flwr_scaling.run.outdir import atomic_file

CHECKPOINT = "checkpoint.npz"


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
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {out_dir}: {path.name} is missing (was the run started with checkpoint-every 0?)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            model = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("model/")}
            precond = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("precond/")}
            broadcast = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("broadcast/")}
            velocity = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("server_velocity/")}
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"checkpoint {path} is unreadable: {error}") from None
    return Checkpoint(
        round=int(meta["round"]),
        config=meta["config"],
        model=model,
        precond_state=precond if meta["has_precond"] else None,
        sampler_state=_from_json_state(meta["sampler_state"]),
        rows=meta["rows"],
        broadcast_version=meta.get("broadcast_version"),
        broadcast_state=broadcast if meta.get("broadcast_version") is not None else None,
        server_velocity=velocity if meta.get("has_server_velocity") else None,
    )
