"""Run configurations on Flower's simulation engine (Ray), in this process."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .checkpoint import Checkpoint
from .config import RunConfig
from .data import load_federated_data
from .partition_plot import plot_partitions
from .recorder import read_metrics

OUTPUT_FILES = ("config.json", "metrics.csv", "checkpoint.npz", "partitions.png")


def preflight(cfg: RunConfig) -> None:
    """Everything that can fail cheaply, before Ray starts: options, data, partitions."""
    from .clients.logic import client_partition

    cfg.validate()
    load_federated_data(cfg.data_spec())
    for partition_id in range(cfg.num_clients):
        client_partition(cfg, partition_id)


def prepare_output(cfg: RunConfig, resume: Checkpoint | None) -> None:
    """Preflight ``cfg``, then make ``cfg.out`` ready: a previous run's files removed
    (kept when resuming) and the partition heatmap written."""
    preflight(cfg)
    out = Path(cfg.out)
    if resume is None:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    plot_partitions(cfg.partition_spec(), out / "partitions.png")  # who holds which labels


def _quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)


def simulate(
    config: RunConfig, *, verbose: bool = False, client_app=None, resume: Checkpoint | None = None
) -> list[dict[str, float]]:
    """Run one configuration end to end; return its ``metrics.csv`` rows.

    Writes ``OUT/config.json`` and ``OUT/metrics.csv`` (complete after every
    round). A previous run's files in ``OUT`` are replaced. ``client_app``
    replaces this project's ClientApp (tests wrap it to inject faults).
    With ``resume``, the run continues after the checkpoint's last round and
    keeps the folder's files.
    """
    from flwr.simulation import run_simulation

    from .clients import app as default_client_app

    client_app = client_app or default_client_app
    from .server_app import make_server_app

    cfg = config.resolved()
    prepare_output(cfg, resume)
    out = Path(cfg.out)
    _quiet_flower(verbose)
    # One thread per client actor: two actors on two cores beat two actors
    # fighting over four threads, and tiny models gain nothing from more.
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }
    # Ray's workers inherit this process's environment.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_simulation(
        server_app=make_server_app(cfg, resume),
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config,
    )
    metrics = out / "metrics.csv"
    rows = read_metrics(metrics) if metrics.exists() else []
    if len(rows) != cfg.rounds:
        raise RuntimeError(f"the simulation ended after {len(rows)} of {cfg.rounds} rounds; see the log above")
    return rows


def clean_output(out: Path) -> None:
    """Remove a folder this tool created (used when a run fails before writing anything useful)."""
    if out.exists() and not any(out.iterdir()):
        shutil.rmtree(out)
