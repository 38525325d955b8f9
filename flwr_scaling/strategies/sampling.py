"""Which nodes train in a round, and in which order their replies are summed."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING

from flwr.app import Message
from flwr.serverapp import Grid

from flwr_scaling.protocol.flower_adapter import log
from flwr_scaling.strategies.screening import split_records


def assign_ranks(reported: Mapping[int, int | None], taken: Mapping[int, int] | None = None) -> dict[int, int]:
    """Distinct ranks for the nodes in ``reported`` (node id -> the ``partition-id`` it reported, or ``None``).

    ``taken`` holds ranks already assigned (kept: a node keeps its rank for the
    whole run). A node gets the rank it reported unless another node holds it
    (two SuperNodes started with the same ``partition-id``): then, like a node
    that reported none, it gets the next free rank above all others, in order
    of node id. Every collision is logged.
    """
    ranks = dict(taken or {})
    used = set(ranks.values())
    unranked = []
    for node in sorted(reported):
        if node in ranks:
            continue
        rank = reported[node]
        if rank is not None and rank not in used:
            ranks[node] = rank
            used.add(rank)
        else:
            if rank is not None:
                holder = next(other for other, held in ranks.items() if held == rank)
                log(WARNING, "Nodes %d and %d both report partition-id %d; node %d gets a rank of its own "
                    "(start every SuperNode with a distinct partition-id)", holder, node, rank, node)
            unranked.append(node)
    for node in unranked:
        ranks[node] = max(used, default=-1) + 1
        used.add(ranks[node])
    return ranks


class NodeSampler:
    """Like Flower's sampler, but seeded, independent of node-id order, and
    tolerant of nodes that come and go.

    A round samples among the nodes connected now. When fewer than expected
    are connected (a device dropped out), the round waits up to ``wait_s``
    for them once, then goes on without them; later rounds do not wait for
    the same missing nodes again, so one departure costs at most one
    ``wait_s``. A node that comes back is sampled again (and a later departure
    waits once more). A round never goes on with fewer than ``min_available``
    connected nodes: it waits for them, as Flower's sampler does.

    Parameters
    ----------
    seed : int | None (default: None)
        Seed of the sampler (Flower's own sampler is unseeded).
    node_order : Mapping[int, int] | None (default: None)
        Optional stable rank of each node (e.g. its partition id): sampling and
        the order of summation then do not depend on random node ids. A node
        first seen later gets the next free rank (``assign_ranks``).
    wait_s : float | None (default: None)
        Seconds a round waits for missing nodes before it goes on without
        them; ``None`` waits forever, as Flower's own sampler does.
    state : object | None (default: None)
        A random state from ``state`` of an earlier sampler (a resumed run).
    min_available : int (default: 1)
        Fewest connected nodes a round goes on with (``min-available-clients``).
    clock, sleep : callables | None (default: None)
        ``time.monotonic`` and ``time.sleep`` unless given (tests pass a fake clock).
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        node_order: Mapping[int, int] | None = None,
        wait_s: float | None = None,
        state: object | None = None,
        min_available: int = 1,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.node_order = dict(node_order or {})
        self.wait_s = wait_s
        self.min_available = min_available
        self._clock = clock
        self._sleep = sleep
        # How many expected nodes may be missing without a wait: those already waited for once.
        self.tolerated_missing = 0
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
        """The connected nodes, ranked nodes first (by rank), then the others by id.

        With a ``node_order``, a node not seen before gets the next free rank
        and keeps it (a SuperNode restarted under a new node id, a late one).
        """
        nodes = sorted(grid.get_node_ids())
        new = [node for node in nodes if node not in self.node_order]
        if self.node_order and new:
            self.node_order = assign_ranks(dict.fromkeys(new), self.node_order)
            log(INFO, "New nodes %s ranked %s", new, [self.node_order[node] for node in new])
        return sorted(nodes, key=lambda node: (self.node_order.get(node, float("inf")), node))

    def sample(self, grid: Grid, *, fraction: float, minimum: int, min_available: int, min_successful: int) -> list[int]:
        """``max(fraction · connected, minimum)`` of the connected nodes (all of them at most).

        ``min_available``: the nodes the run expects (``num-clients``). With
        fewer connected, the round waits for the missing ones, unless it did
        so before for as many (see the class); ``wait_s`` bounds that wait. It
        always waits until ``max(min-available-clients, min_successful)`` nodes
        are connected.
        """
        clock = self._clock or time.monotonic
        sleep = self._sleep or time.sleep
        floor = max(self.min_available, min_successful)
        started = clock()
        last_log = None
        while True:
            nodes = self.ordered(grid)
            missing = max(max(min_available, minimum) - len(nodes), 0)
            # Nodes that came back are no longer tolerated: if they leave again, a round waits once more.
            self.tolerated_missing = min(self.tolerated_missing, missing)
            if len(nodes) >= floor and missing <= self.tolerated_missing:
                break
            waited = clock() - started
            if len(nodes) >= floor and self.wait_s is not None and waited >= self.wait_s:
                log(WARNING, "Only %d of %d nodes connected after %.0f s; this round and the next go on "
                    "without the missing ones (a node that comes back is sampled again).",
                    len(nodes), len(nodes) + missing, waited)
                self.tolerated_missing = missing
                break
            if last_log is None or clock() - last_log >= 10:
                last_log = clock()
                log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                    len(nodes), max(len(nodes) + missing, floor))
            left = None if self.wait_s is None or len(nodes) < floor else self.wait_s - waited
            sleep(1.0 if left is None else min(1.0, max(left, 0.0)))
        sample_size = min(max(int(len(nodes) * fraction), minimum), len(nodes))
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
