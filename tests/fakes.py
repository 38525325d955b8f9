"""A small in-process stand-in for Flower's ``Grid`` and helpers that build client replies.

Building any ``Message`` needs ``TaskIdentity`` (run, node and task ids) to be
set, as inside a running app; the ``task_identity`` fixture of the tests does
that. Replies are built with ``Message(..., reply_to=msg)``, so their
``src_node_id`` is the ``dst_node_id`` of the message they answer, exactly as
on a real SuperNode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

Arrays = Mapping[str, np.ndarray]


def f32(*values) -> np.ndarray:
    """A float32 array of ``values`` (the dtype the strategies keep)."""
    return np.array(values, dtype=np.float32)


def record(arrays: Arrays) -> ArrayRecord:
    """``{key: ndarray}`` -> ArrayRecord (float32 unless the array says otherwise)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def as_numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in rec.items()}


def stats_reply(query: Message, stats: Arrays | None, n: int | float | None) -> Message:
    """What a client answers to the warm-up query: its statistic at x⁰ and its size."""
    content = RecordDict()
    if stats is not None:
        content["stats"] = record(stats)
    content["metrics"] = MetricRecord({} if n is None else {"num-examples": n})
    return Message(content=content, reply_to=query)


def train_reply(
    message: Message,
    model: Arrays | None,
    stats: Arrays | None,
    n: int | float | None,
    loss: float = 0.0,
) -> Message:
    """What a client answers to a train message (model, statistic or state, metrics)."""
    content = RecordDict()
    if model is not None:
        content["arrays"] = record(model)
    if stats is not None:
        content["stats"] = record(stats)
    metrics = {"train_loss": loss}
    if n is not None:
        metrics["num-examples"] = n
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=message)


def error_reply(message: Message, reason: str = "client raised") -> Message:
    return Message(Error(code=1, reason=reason), reply_to=message)


class FakeGrid:
    """Just what a strategy uses of ``flwr.serverapp.Grid``.

    ``answers`` maps a node id to how it answers a query: either
    ``(statistic, num_examples)`` or a callable ``query -> reply Message``.
    Every ``send_and_receive`` call is recorded in ``calls`` as
    ``(messages, replies, timeout)``.
    """

    def __init__(
        self,
        node_ids: Iterable[int],
        answers: Mapping[int, tuple[Arrays | None, int | float | None] | Callable[[Message], Message]] | None = None,
    ) -> None:
        self.node_ids = list(node_ids)
        self.answers = dict(answers or {})
        self.calls: list[tuple[list[Message], list[Message], float | None]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = []
        for message in messages:
            answer = self.answers[message.metadata.dst_node_id]
            if callable(answer):
                replies.append(answer(message))
            else:
                stats, n = answer
                replies.append(stats_reply(message, stats, n))
        self.calls.append((messages, replies, timeout))
        return replies

    @property
    def sent(self) -> list[Message]:
        """All messages sent through ``send_and_receive`` (the warm-up queries)."""
        return [m for messages, _, _ in self.calls for m in messages]

    @property
    def received(self) -> list[Message]:
        return [r for _, replies, _ in self.calls for r in replies]


def flower_warnings_during(action: Callable[[], object]) -> list[str]:
    """The WARNING messages Flower's logger gets while ``action()`` runs (it does not propagate to caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        action()
    finally:
        logger.removeHandler(handler)
    return [record.getMessage() for record in records if record.levelno == logging.WARNING]
