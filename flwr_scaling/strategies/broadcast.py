"""Sending the preconditioner state down: its wire encoding (``precond-dtype``) and versions (``precond-every``).

The state is encoded once per refresh round (rounds 1, 1 + K, 1 + 2K, ... and
the first round a strategy runs, e.g. after a resume) and tagged with that
round as its version. In between, clients train with the version they keep;
a sampled node that lacks the current version (not sampled at the refresh, or
its reply failed) gets it with its training message. All the server keeps per
client is the version it last acknowledged with a good reply.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from flwr_scaling.protocol.decoding import decode_record
from flwr_scaling.protocol.wire import DTYPE_KEY, DTYPES, VERSION_KEY, check_dtype, put_encoded

# Train-config key read when ``every`` is not given (this project's run option).
EVERY_KEY = "precond-every"

State = dict[str, np.ndarray]
Bounds = tuple[float, float]


class StateBroadcast:
    """What the clients train with: the state of the last refresh round, encoded once, and its version.

    Parameters
    ----------
    precond_key : str (default: "precond")
        Key of the state's ArrayRecord in training messages.
    dtype : str | None (default: None)
        Encoding of the state sent down and of what clients send up:
        "float32", "bfloat16" or "float16". ``None``: the train config's
        ``precond-dtype`` when it has one, else "float32".
    every : int | None (default: None)
        Refresh every that many rounds. ``None``: the train config's
        ``precond-every`` when it has one, else 1.
    last_sent : tuple[int, dict[str, np.ndarray]] | None (default: None)
        ``(version, decoded state)`` of the last state sent before a resume
        (from a checkpoint, see ``last_sent``): a run resumed between refreshes
        sends that version again, as an uninterrupted run would.
    """

    def __init__(
        self,
        *,
        precond_key: str = "precond",
        dtype: str | None = None,
        every: int | None = None,
        last_sent: tuple[int, State] | None = None,
    ) -> None:
        check_wire_options(dtype, every)
        self.precond_key = precond_key
        self.dtype = dtype
        self.every = every
        self._restored = last_sent
        self._encoded: RecordDict | None = None  # None: v = 1, or no state
        self._version: int | None = None
        self.bounds: Bounds = (1.0, 1.0)  # of the D̂ the clients use, rounding included
        self.round_version: int | None = None  # the version this round's clients train with
        # node id -> version of the state it last acknowledged with a good reply
        self._delivered: dict[int, int] = {}
        self._refreshed = False  # the first round always sends the state

    def resolve(self, config: ConfigRecord, *, sends_state: bool) -> None:
        """Take ``dtype`` / ``every`` from the train config where not given; tell the clients the dtype."""
        if self.dtype is None:
            self.dtype = str(config.get(DTYPE_KEY, "float32"))
        if self.every is None:
            self.every = config.get(EVERY_KEY, 1)
        check_wire_options(self.dtype, self.every)
        if sends_state:
            config[DTYPE_KEY] = self.dtype

    def prepare(self, true_round: int, state: State | None, bounds_of: Callable[[State | None], Bounds]) -> None:
        """Encode ``state`` as the version of ``true_round`` when this is a refresh round.

        ``state`` is ``None`` when there is nothing to send (v = 1, or no
        preconditioner); ``bounds_of(state)`` gives the bounds of D̂ for a state
        as the clients decode it (or for ``None``).
        """
        if not self._refreshed and self._restored is not None and (true_round - 1) % self.every:
            # A resumed run between refreshes: clients train with the old version. The codecs give
            # back the same decoded values when re-encoding decoded values.
            version, restored = self._restored
            self._encode(version, restored, bounds_of)
        elif not self._refreshed or (true_round - 1) % self.every == 0:
            if state is None:
                self._encoded, self._version = None, None
                self.bounds = bounds_of(None)
            else:
                self._encode(true_round, state, bounds_of)
        self._refreshed = True
        self.round_version = self._version

    def _encode(self, version: int, state: State, bounds_of: Callable[[State | None], Bounds]) -> None:
        self._encoded = RecordDict()
        put_encoded(self._encoded, self.precond_key, state, dtype=self.dtype)
        self._version = version
        self.bounds = bounds_of(decode_record(self._encoded, self.precond_key, self.dtype))

    def messages(
        self, plain: RecordDict, config: ConfigRecord, node_ids: list[int],
        construct: Callable[[RecordDict, list[int]], list[Message]],
    ) -> list[Message]:
        """Training messages: ``plain`` (model and ``config``), plus the state for nodes without its version."""
        if self._encoded is None:
            config.pop(VERSION_KEY, None)
            return construct(plain, node_ids)
        config[VERSION_KEY] = self._version
        with_state = RecordDict({**plain, **self._encoded})
        return [
            message
            for node in node_ids
            for message in construct(plain if self._delivered.get(node) == self.round_version else with_state, [node])
        ]

    def received(self, replies: list[Message]) -> None:
        """Note which nodes now hold this round's version.

        A good reply proves the node held the version; after an error reply the
        node may have lost it (a fresh device, a failed process), so it gets
        the state again the next time it is sampled.
        """
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                self._delivered.pop(node, None)
            elif self.round_version is not None:
                self._delivered[node] = self.round_version

    @property
    def last_sent(self) -> tuple[int, State] | None:
        """``(version, state as the clients decode it)`` of the last state sent, for checkpoints:
        with ``every`` > 1 a run resumed between refreshes must send that version, not the
        current state, to end as an uninterrupted run does. ``None`` when no state was sent."""
        if self._encoded is None or self._version is None:
            return self._restored
        return self._version, decode_record(self._encoded, self.precond_key, self.dtype)


def check_wire_options(precond_dtype: str | None, precond_every: int | None) -> None:
    """One-line ``ValueError`` for a bad ``precond_dtype`` or ``precond_every`` (``None``: not given yet)."""
    if precond_dtype is not None:
        try:
            check_dtype(precond_dtype)
        except ValueError:
            raise ValueError(f"precond_dtype must be one of {DTYPES}, got {precond_dtype!r}") from None
    if precond_every is not None and (
        not isinstance(precond_every, int) or isinstance(precond_every, bool) or precond_every < 1
    ):
        raise ValueError(f"precond_every must be an integer >= 1, got {precond_every!r}")
