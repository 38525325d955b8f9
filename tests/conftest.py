"""Fixtures shared by the test files.

- ``task_identity``: messages can only be built inside a running app (Flower
  checks run, node and task ids); the fixture pretends to be the server's task.
- ``flower_warnings``: the WARNING lines Flower's logger gets during a test
  (Flower's logger does not propagate to pytest's ``caplog``).
- ``hub_offline``: the Hugging Face libraries with no network and no cache
  outside the test's folder (``hf:`` data is tested on local parquet files).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from flwr_scaling.protocol.flower_adapter import task_identity as server_task_identity

SERVER_NODE = 0


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Set Flower's task identity as inside the server's running app."""
    with server_task_identity(task_id=1, run_id=1, node_id=SERVER_NODE):
        yield


@pytest.fixture
def flower_warnings() -> Iterator[Callable[[], list[str]]]:
    """A function returning the WARNING messages Flower's logger got so far in this test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield lambda: [record.getMessage() for record in records if record.levelno == logging.WARNING]
    logger.removeHandler(handler)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path) -> None:
    """No network and no cache outside ``tmp_path`` for ``datasets`` and ``huggingface_hub``."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
