"""The ClientApp: the same code in simulation and on real SuperNodes.

Messages carry the run's resolved configuration (ConfigRecord ``config``),
the global model (``arrays``) and, from the second round or after the warm-up,
the preconditioner state (``precond``). Replies carry the model, the statistic
or state (``stats``) and a MetricRecord with ``num-examples`` and ``train_loss``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..arrays import numpy_to_record, record_to_numpy
from ..config import ConfigError, RunConfig
from ..training import evaluate as evaluate_model
from . import node_data
from .logic import _loaded_model, local_round, local_statistic

app = ClientApp()


def _config(message: Message) -> RunConfig:
    values = {k: v for k, v in message.content["config"].items() if k != "server-round"}
    return RunConfig.from_mapping(values).resolved()


def _partition_id(context: Context, cfg: RunConfig) -> int:
    """This node's rank and seed (see ``node_data``: a demo partition or the node's own file)."""
    return node_data.node_key(context.node_config, cfg)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of scaled local SGD on this node's partition."""
    cfg = _config(message)
    partition_id = _partition_id(context, cfg)
    content = message.content
    state = record_to_numpy(content["precond"]) if "precond" in content.array_records else None
    result = local_round(
        cfg,
        node_data.train_split(context.node_config, cfg),
        record_to_numpy(content["arrays"]),
        state,
        int(content["config"]["server-round"]),
        partition_id,
    )
    reply = RecordDict(
        {
            "arrays": numpy_to_record(result.arrays),
            "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.train_loss}),
        }
    )
    if result.payload is not None:
        reply["stats"] = numpy_to_record(result.payload)
    return Message(content=reply, reply_to=message)


@app.query("precond_stats")
def precond_stats(message: Message, context: Context) -> Message:
    """The warm-up: this node's statistic at the initial model, no training."""
    cfg = _config(message)
    partition_id = _partition_id(context, cfg)
    split = node_data.train_split(context.node_config, cfg)
    statistic = local_statistic(cfg, split, record_to_numpy(message.content["arrays"]), partition_id)
    reply = RecordDict({"stats": numpy_to_record(statistic), "metrics": MetricRecord({"num-examples": len(split)})})
    return Message(content=reply, reply_to=message)


@app.query("node_info")
def node_info(message: Message, context: Context) -> Message:
    """This node's partition id: lets the server order nodes the same way in every run."""
    cfg = _config(message)
    metrics = MetricRecord({"partition-id": _partition_id(context, cfg)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on this node's held-out data (see client-eval-every)."""
    cfg = _config(message)
    partition_id = _partition_id(context, cfg)
    split = node_data.eval_split(context.node_config, cfg)
    model = _loaded_model(cfg, record_to_numpy(message.content["arrays"]))
    loss, accuracy = evaluate_model(model, *split.tensors())
    metrics = MetricRecord({"num-examples": len(split), "eval_loss": loss, "eval_accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


__all__ = ["app"]
