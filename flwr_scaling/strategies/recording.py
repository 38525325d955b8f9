"""What a strategy records per round: bytes on the wire, the history row, the clients' own evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flwr_scaling.protocol.flower_adapter import construct_messages, log
from flwr_scaling.protocol.records import content_bytes


class RoundHistory:
    """The history rows of a run, by true round, and the byte counts of the round in progress.

    A row holds ``train_loss``, ``bytes_down``, ``bytes_up``, ``precond_min``,
    ``precond_max``, ``clients_ok``, ``clients_failed``, ``round_failed`` and,
    in rounds the clients evaluated, ``client_acc_mean``, ``client_acc_std``,
    ``client_acc_worst10`` and ``clients_evaluated``.
    """

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self._round: dict[str, float] = {}

    def start_round(self) -> None:
        """Count the bytes of a new round from zero."""
        self._round = {"bytes_down": 0, "bytes_up": 0}

    def set_bounds(self, low: float, high: float) -> None:
        """The bounds of the D̂ the clients train with this round."""
        self._round.update(precond_min=low, precond_max=high)

    def sent(self, messages: Iterable[Message]) -> None:
        """Count the serialised arrays of messages sent to clients."""
        self._round["bytes_down"] += sum(content_bytes(m.content) for m in messages)

    def received(self, replies: Iterable[Message]) -> None:
        """Count the serialised arrays of the replies that did not fail."""
        self._round["bytes_up"] += sum(content_bytes(m.content) for m in replies if not m.has_error())

    def finish_round(
        self, true_round: int, metrics: MetricRecord | None, *, accepted: int, failed: int, round_failed: bool
    ) -> MetricRecord:
        """Record the round's row; return ``metrics`` (the averaged client metrics) with the row added."""
        row = {
            "train_loss": float(metrics["train_loss"]) if metrics is not None and "train_loss" in metrics else float("nan"),
            "bytes_down": self._round["bytes_down"],
            "bytes_up": self._round["bytes_up"],
            "precond_min": self._round.get("precond_min", 1.0),
            "precond_max": self._round.get("precond_max", 1.0),
            "clients_ok": accepted,
            "clients_failed": failed,
            "round_failed": int(round_failed),
        }
        self.rows[true_round] = row
        metrics = metrics if metrics is not None else MetricRecord()
        for key, value in row.items():
            if key != "train_loss":  # FedAvg's own average already holds it
                metrics[key.replace("_", "-")] = value
        return metrics

    def client_evaluation(self, true_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, standard deviation and worst-10 % mean of the clients' accuracies, added to the round's row."""
        accuracies = []
        for message in replies:
            if message.has_error():
                log(WARNING, "Client evaluation failed on node %s: %s", message.metadata.src_node_id, message.error.reason)
                continue
            metrics = next(iter(message.content.metric_records.values()), {})
            value = metrics.get("eval_accuracy")
            if isinstance(value, int | float) and np.isfinite(value):
                accuracies.append(float(value))
        if not accuracies:
            return None
        ranked = np.sort(np.asarray(accuracies))
        worst = ranked[: max(1, int(np.ceil(0.1 * len(ranked))))]
        summary = {
            "client_acc_mean": float(ranked.mean()),
            "client_acc_std": float(ranked.std()),
            "client_acc_worst10": float(worst.mean()),
            "clients_evaluated": len(ranked),
        }
        self.rows.setdefault(true_round, {}).update(summary)
        return MetricRecord({key.replace("_", "-"): value for key, value in summary.items()})


def client_evaluation_messages(
    strategy: FedAvg, *, every: int, true_round: int, arrays: ArrayRecord, config: ConfigRecord,
    nodes: Callable[[], list[int]],
) -> list[Message]:
    """Every ``every`` rounds (0: never), a message to every node (``nodes()``) to evaluate ``arrays`` on its held-out data."""
    if not every or true_round % every:
        return []
    config["server-round"] = true_round
    record = RecordDict({strategy.arrayrecord_key: arrays, strategy.configrecord_key: config})
    return construct_messages(strategy, record, nodes(), MessageType.EVALUATE)


def failed_round_warning(server_round: int, accepted: int, needed: int) -> None:
    """The log line of a round with too few accepted replies."""
    log(
        WARNING,
        "Round %s failed: %d accepted replies, %d needed; model and preconditioner unchanged",
        server_round, accepted, needed,
    )

