"""The warm-up's x⁰ kept on the clients: round 1 sends no model to the nodes that confirmed holding it.

The warm-up query names a model version (``model-version``: the round it
precedes). This project's ClientApp keeps that x⁰ in its ``context.state`` and
puts the version in its reply's metrics; a node whose good reply says so gets
round 1's train message without the model (and replies an error if it lost
x⁰ meanwhile: the reply is counted failed, and round 2 sends the model anyway).
A ClientApp that does not confirm (a user's own) gets the model as before.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from flwr.app import Message, RecordDict

from flwr_scaling.protocol.wire import MODEL_VERSION_KEY


def holds_model(reply: Message, version: int) -> bool:
    """Whether a warm-up reply is good and confirms that its node kept the x⁰ of ``version``."""
    if reply.has_error():
        return False
    return any(metrics.get(MODEL_VERSION_KEY) == version for metrics in reply.content.metric_records.values())


def without_model_for(
    holders: Collection[int], model_key: str, construct: Callable[[RecordDict, list[int]], list[Message]]
) -> Callable[[RecordDict, list[int]], list[Message]]:
    """``construct`` (record, nodes -> messages), except that nodes in ``holders`` get ``record`` less ``model_key``."""
    if not holders:
        return construct

    def construct_for_holders(record: RecordDict, nodes: list[int]) -> list[Message]:
        without_model = RecordDict({key: value for key, value in record.items() if key != model_key})
        return [message for node in nodes for message in construct(without_model if node in holders else record, [node])]

    return construct_for_holders
