"""Fault injection: a ClientApp that answers like this project's, except on chosen partitions.

Used by the tests to check that faulty clients cannot poison the global model
or the preconditioner; useful to anyone who wants to see what their own
deployment does with a misbehaving device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_scaling.clients import client_app as clients_app

FAULTS = (
    "raise",  # the client raises: Flower turns it into an error reply
    "nan-model",  # a NaN in the model
    "inf-stats",  # an Inf in the statistic
    "wrong-key",  # the model has a key the server never sent
    "wrong-shape",  # a model array with another shape
    "wrong-dtype",  # a model array in float64
    "negative-stats",  # a negative squared-gradient statistic
    "no-num-examples",  # the metrics lack num-examples
    "zero-num-examples",  # num-examples is 0
)
# Finite, well-shaped and non-negative, but absurd: only the bounds and the cohort rule (at least
# three replies, most of them honest) catch these, so they are kept apart from the faults above.
ABSURD_FAULTS = (
    "huge-stats",  # every entry of the first statistic array is 1e30
    "huge-num-examples",  # num-examples is 1e308
    "huge-model",  # 1e30 added to the first model array
    "nan-loss",  # train_loss is NaN
)
HUGE = 1e30


def _first(record: ArrayRecord) -> str:
    return next(iter(record.keys()))


def _replace(record: ArrayRecord, key: str, value: np.ndarray) -> ArrayRecord:
    arrays = {k: (Array(value) if k == key else a) for k, a in record.items()}
    return ArrayRecord(arrays)


def corrupt(content: RecordDict, fault: str) -> RecordDict:
    """Return a copy of a reply's content with ``fault`` injected."""
    if fault not in FAULTS + ABSURD_FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS + ABSURD_FAULTS)}")
    records = dict(content.items())
    model = records.get("arrays")
    stats = records.get("stats")
    if fault == "nan-model" and model is not None:
        key = _first(model)
        value = model[key].numpy().copy()
        value.flat[0] = np.nan
        records["arrays"] = _replace(model, key, value)
    elif fault == "inf-stats" and stats is not None:
        key = _first(stats)
        value = stats[key].numpy().copy()
        value.flat[0] = np.inf
        records["stats"] = _replace(stats, key, value)
    elif fault == "negative-stats" and stats is not None:
        key = _first(stats)
        records["stats"] = _replace(stats, key, -np.abs(stats[key].numpy()) - 1.0)
    elif fault == "wrong-key" and model is not None:
        arrays = dict(model.items())
        arrays["not-a-parameter"] = Array(np.zeros(3, dtype=np.float32))
        records["arrays"] = ArrayRecord(arrays)
    elif fault == "wrong-shape" and model is not None:
        key = _first(model)
        records["arrays"] = _replace(model, key, model[key].numpy().reshape(-1)[:-1].copy())
    elif fault == "wrong-dtype" and model is not None:
        key = _first(model)
        records["arrays"] = _replace(model, key, model[key].numpy().astype(np.float64))
    elif fault == "huge-stats" and stats is not None:
        key = _first(stats)
        records["stats"] = _replace(stats, key, np.full_like(stats[key].numpy(), HUGE))
    elif fault == "huge-model" and model is not None:
        key = _first(model)
        records["arrays"] = _replace(model, key, model[key].numpy() + np.float32(HUGE))
    elif fault in ("no-num-examples", "zero-num-examples", "huge-num-examples", "nan-loss"):
        metrics = dict(records["metrics"].items())
        if fault == "no-num-examples":
            metrics.pop("num-examples")
        elif fault == "nan-loss":
            metrics["train_loss"] = float("nan")
        else:
            metrics["num-examples"] = 0 if fault == "zero-num-examples" else 1e308
        records["metrics"] = MetricRecord(metrics)
    return RecordDict(records)


def faulty_client_app(faults: Mapping[int, str], in_warmup: bool = False) -> ClientApp:
    """This project's ClientApp, with ``faults[partition_id]`` injected into that partition's
    training replies (and warm-up replies too when ``in_warmup``)."""
    unknown = sorted(set(faults.values()) - set(FAULTS + ABSURD_FAULTS))
    if unknown:
        raise ValueError(f"unknown faults {unknown}; choose from {', '.join(FAULTS + ABSURD_FAULTS)}")
    app = ClientApp()

    def wrapped(handler):
        def handle(message: Message, context: Context) -> Message:
            fault = faults.get(int(context.node_config.get("partition-id", -1)))
            if fault == "raise":
                raise RuntimeError("injected fault: this client raised")
            reply = handler(message, context)
            if fault is None:
                return reply
            return Message(content=corrupt(reply.content, fault), reply_to=message)

        return handle

    app.train()(wrapped(clients_app.train))
    app.query("precond_stats")(wrapped(clients_app.precond_stats) if in_warmup else clients_app.precond_stats)
    app.query("node_info")(clients_app.node_info)
    return app
