"""Flower's and Ray's notices that say nothing actionable about this project's runs, silenced at their source.

Used around every run (``run_simulation``, the in-process backend) and around
building a strategy (the ServerApp under ``flwr run`` too), so a normal run
prints no warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class _DropKnownNotices(logging.Filter):
    """Drops the log records of Flower's that say nothing actionable about this project's runs."""

    # run_simulation is the only way to run a ServerApp object in this process
    # (`flwr run` needs an installed app and a SuperLink); FedAvg warns that
    # fraction_evaluate is 0, which is on purpose (the server evaluates centrally).
    KNOWN = ("The `run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.KNOWN)


@contextmanager
def without_known_notices() -> Iterator[None]:
    """For one run (``run_simulation`` or the in-process backend): silence the notices we cannot act on, at their source."""
    flower_logger, notices = logging.getLogger("flwr"), _DropKnownNotices()
    flower_logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            # Ray's ray.init warns that a future Ray will stop overriding the visible
            # accelerators when num_gpus is 0; nothing here depends on either behaviour.
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            yield
    finally:
        flower_logger.removeFilter(notices)
