"""Which nodes train in a round, and in which order their replies are summed."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Mapping
from logging import INFO, WARNING

from flwr.app import Message
from flwr.serverapp import Grid

from flwr_scaling.protocol.flower_adapter import log
from flwr_scaling.strategies.screening import split_records


class NodeSampler:
    """Like Flower's sampler, but seeded and independent of node-id order.

    Parameters
    ----------
    seed : int | None (default: None)
        Seed of the sampler (Flower's own sampler is unseeded).
    node_order : Mapping[int, int] | None (default: None)
        Optional stable rank of each node (e.g. its partition id): sampling and
        the order of summation then do not depend on random node ids.
    wait_s : float | None (default: None)
        Seconds a round waits for missing nodes before it goes on without
        them; ``None`` waits forever, as Flower's own sampler does.
    state : object | None (default: None)
        A random state from ``state`` of an earlier sampler (a resumed run).
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        node_order: Mapping[int, int] | None = None,
        wait_s: float | None = None,
        state: object | None = None,
    ) -> None:
        self.node_order = dict(node_order or {})
        self.wait_s = wait_s
        self._random = random.Random(seed)
        if state is not None:
            self._random.setstate(state)

    @property
    def state(self):
        """The random state (for checkpoints)."""
        return self._random.getstate()

    @state.setter
    def state(self, state) -> None:
        self._random.setstate(state)

    def ordered(self, grid: Grid) -> list[int]:
        """The connected nodes, ranked nodes first (by rank), then the others by id."""
        return sorted(grid.get_node_ids(), key=lambda node: (self.node_order.get(node, float("inf")), node))

    def sample(self, grid: Grid, *, fraction: float, minimum: int, min_available: int, min_successful: int) -> list[int]:
        """``max(fraction · connected, minimum)`` nodes, once ``min_available`` are connected.

        With ``wait_s`` set, a round whose nodes are not all back after that
        long (a device dropped out) goes on with the connected ones, as long as
        ``min_successful`` of them are there.
        """
        started = time.monotonic()
        while True:
            nodes = self.ordered(grid)
            sample_size = max(int(len(nodes) * fraction), minimum)
            needed = max(min_available, sample_size)
            if len(nodes) >= needed:
                break
            waited = time.monotonic() - started
            if self.wait_s is not None and waited >= self.wait_s and len(nodes) >= min_successful:
                sample_size = len(nodes)
                log(WARNING, "Only %d of %d nodes connected after %.0f s; the round goes on with them.",
                    len(nodes), needed, waited)
                break
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), needed)
            time.sleep(1)
        chosen = self._random.sample(nodes, sample_size)
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(chosen), len(nodes))
        return chosen

    def reply_order(self, message: Message) -> tuple:
        """Sort key of a reply: its node's rank when known, else a digest of its leading bytes.

        Stable across runs, so the float averages are identical from run to run.
        """
        node = message.metadata.src_node_id
        if node in self.node_order:
            return (0, self.node_order[node], b"")
        digest = hashlib.blake2b(digest_size=16)
        for record in split_records(message.content)[0].values():
            for array in record.values():
                digest.update(array.data[:4096])
        return (1, 0, digest.digest())
