"""Attaching this process to an existing Ray cluster (``--ray-address``), so Ray is not started locally.

Flower's Ray backend calls ``ray.init`` only when Ray is not initialised yet
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``), so a simulation
started after ``attach`` runs its client actors on the cluster; parallel sweeps
(``studies/parallel.py``) submit their runs there. Ray must be the same version
on the cluster and here.
"""

from __future__ import annotations

import logging

from flwr_scaling.run.config import ConfigError

ADDRESS_HELP = ("address of an existing Ray cluster to run on instead of a local Ray: 'auto' (the cluster this "
                "machine belongs to), 'HOST:PORT' (its GCS, as printed by `ray start --head`) or "
                "'ray://HOST:10001' (Ray Client)")


def check_address(address: object) -> str:
    """``address`` stripped, or ConfigError unless it is a non-empty string."""
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"ray-address must be a Ray address such as 'auto', 'HOST:PORT' or 'ray://HOST:10001', "
                          f"got {address!r}")
    return address.strip()


def attach(address: str, verbose: bool = False) -> None:
    """Connect this process to the Ray cluster at ``address``; ConfigError (one line) if it cannot be reached."""
    import ray

    address = check_address(address)
    try:
        ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=verbose)
    except (ConnectionError, ValueError, RuntimeError) as problem:
        text = str(problem).splitlines()[0] if str(problem) else type(problem).__name__
        raise ConfigError(f"cannot attach to the Ray cluster at {address}: {text}") from None


__all__ = ["ADDRESS_HELP", "attach", "check_address"]
