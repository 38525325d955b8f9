"""The ClientApp: the same code in simulation and on real SuperNodes.

Messages carry the run's resolved configuration (ConfigRecord ``config``),
the global model (``arrays``) and, from the second round or after the warm-up,
the preconditioner state (``precond``). Replies carry the model, the statistic
or state (``stats``) and a MetricRecord with ``num-examples`` and ``train_loss``.

The state and the statistic travel encoded as the config's ``precond-dtype``
says (``flwr_scaling.protocol.wire``). With ``precond-every K`` the server sends the
state only when it changes for this node: the config's ``precond-version``
names the round whose state to train with, and the node keeps the last state
it received in ``context.state``, the one place that persists between
messages (in deployment every message may run in a fresh process).

The warm-up query names a model version (``model-version``, the round it
precedes): the node keeps that x⁰ in ``context.state`` and says so in its
reply, and round 1's train message to it then carries no model; the node
trains from the x⁰ it kept and forgets it (a train message that does carry a
model also clears it).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_scaling.protocol.records import numpy_to_record, record_to_numpy
from flwr_scaling.protocol.wire import MODEL_VERSION_KEY, SCALE_SUFFIX, VERSION_KEY, put_encoded, take_encoded
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.core.local_sgd import evaluate as evaluate_model
from flwr_scaling.clients import node_data
from flwr_scaling.clients.logic import MODEL_KEYS, ModelShape, loaded_model, local_round, local_statistic, model_shape

app = ClientApp()

# Keys the server adds to the run configuration for one round only.
ROUND_KEYS = ("server-round", VERSION_KEY, MODEL_VERSION_KEY)
# context.state entries: the last state received, as it came (encoded), and its version and encoding.
CACHED_STATE = "precond-cache"
CACHED_INFO = "precond-cache-info"
# context.state entries: x⁰ from the warm-up query, and the round it precedes (its version).
CACHED_MODEL = "model-cache"
CACHED_MODEL_INFO = "model-cache-info"
# Error code of a reply that could not train because the state it needs never arrived.
MISSING_STATE_ERROR = 4601


class MissingStateError(Exception):
    """The server expects this node to hold a state it does not hold (it resends it next time)."""


def _config(message: Message) -> RunConfig:
    values = {k: v for k, v in message.content["config"].items() if k not in ROUND_KEYS and k not in MODEL_KEYS}
    # The run's dataset files are the server's: a device holds only its own data.
    return RunConfig.from_mapping(values).resolved(check_files=False)


def _model_shape(message: Message) -> ModelShape | None:
    """The model's input shape and classes as the server sent them (``None``: load the run's dataset)."""
    return model_shape(message.content["config"])


def round_state(content: RecordDict, context: Context, dtype: str) -> dict | None:
    """The float32 preconditioner state to train with this round, or ``None`` (v = 1, or no state).

    A state in the message is used and, when it has a version, kept in
    ``context.state``; without one, the cached state must be of the version
    the config names, else ``MissingStateError``.
    """
    version = content["config"].get(VERSION_KEY)
    if "precond" in content.array_records:
        state = take_encoded(content, "precond", dtype=dtype)
        if version is not None:
            context.state[CACHED_STATE] = content["precond"]
            info = {"version": int(version), "dtype": dtype}
            scale = content.get("precond" + SCALE_SUFFIX)
            info.update({f"scale:{key}": value for key, value in (scale.items() if scale is not None else [])})
            context.state[CACHED_INFO] = ConfigRecord(info)
        return state
    if version is None:
        return None
    info = context.state.get(CACHED_INFO)
    held = (int(info["version"]), str(info["dtype"])) if info is not None and CACHED_STATE in context.state else None
    if held != (int(version), dtype):
        have = "none" if held is None else f"round {held[0]}'s in {held[1]}"
        raise MissingStateError(
            f"precond-every: this node holds no preconditioner state of round {version} in {dtype} "
            f"(it holds {have}); the server must send it"
        )
    cached = RecordDict({"precond": context.state[CACHED_STATE]})
    exponents = {key[len("scale:"):]: value for key, value in info.items() if key.startswith("scale:")}
    if exponents:
        cached["precond" + SCALE_SUFFIX] = ConfigRecord(exponents)
    return take_encoded(cached, "precond", dtype=dtype)


def round_model(content: RecordDict, context: Context) -> dict:
    """The model to train from: the message's, or the warm-up's x⁰ this node kept (then forgotten).

    Raises ``MissingStateError`` when the message carries no model and the
    node does not hold the x⁰ of the version the config names.
    """
    info = context.state.config_records.get(CACHED_MODEL_INFO)
    cached = context.state.array_records.get(CACHED_MODEL)
    # Only round 1 can use x⁰: whatever this message says, the copy is not needed again.
    context.state.pop(CACHED_MODEL, None)
    context.state.pop(CACHED_MODEL_INFO, None)
    if "arrays" in content.array_records:
        return record_to_numpy(content["arrays"])
    version = content["config"].get(MODEL_VERSION_KEY)
    held = int(info["version"]) if info is not None and cached is not None else None
    if version is None or held != int(version):
        have = "none" if held is None else f"round {held}'s"
        raise MissingStateError(
            f"warm-up: this train message carries no model and this node holds no x⁰ of round {version} "
            f"(it holds {have}); the server must send it"
        )
    return record_to_numpy(cached)


def _partition_id(context: Context, cfg: RunConfig) -> int:
    """This node's rank and seed (see ``node_data``: a demo partition or the node's own file)."""
    return node_data.node_key(context.node_config, cfg, context.node_id)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of scaled local SGD on this node's partition."""
    cfg = _config(message)
    partition_id = _partition_id(context, cfg)
    content = message.content
    try:
        state = round_state(content, context, cfg.precond_dtype)
        initial = round_model(content, context)
    except MissingStateError as problem:
        # An error reply, not an exception: the server counts it as failed and resends the state.
        return Message(Error(code=MISSING_STATE_ERROR, reason=str(problem)), reply_to=message)
    shape = _model_shape(message)
    result = local_round(
        cfg,
        node_data.train_split(context.node_config, cfg, context.node_id, shape),
        initial,
        state,
        int(content["config"]["server-round"]),
        partition_id,
        shape,
    )
    reply = RecordDict(
        {
            "arrays": numpy_to_record(result.arrays),
            "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.train_loss}),
        }
    )
    if result.payload is not None:
        put_encoded(reply, "stats", result.payload, dtype=cfg.precond_dtype)
    return Message(content=reply, reply_to=message)


@app.query("precond_stats")
def precond_stats(message: Message, context: Context) -> Message:
    """The warm-up: this node's statistic at the initial model, no training.

    When the config names a ``model-version``, the node keeps x⁰ for round 1
    and confirms it in the reply's metrics (the server then sends round 1 no model).
    """
    cfg = _config(message)
    partition_id = _partition_id(context, cfg)
    shape = _model_shape(message)
    split = node_data.train_split(context.node_config, cfg, context.node_id, shape)
    statistic = local_statistic(cfg, split, record_to_numpy(message.content["arrays"]), partition_id, shape)
    metrics = MetricRecord({"num-examples": len(split)})
    version = message.content["config"].get(MODEL_VERSION_KEY)
    if version is not None:
        context.state[CACHED_MODEL] = message.content["arrays"]
        context.state[CACHED_MODEL_INFO] = ConfigRecord({"version": int(version)})
        metrics[MODEL_VERSION_KEY] = int(version)
    reply = RecordDict({"metrics": metrics})
    put_encoded(reply, "stats", statistic, dtype=cfg.precond_dtype)
    return Message(content=reply, reply_to=message)


@app.query("node_info")
def node_info(message: Message, context: Context) -> Message:
    """This node's partition id, if it was started with one: lets the server rank nodes the
    same way in every run (a node without one is ranked by the server, ``assign_ranks``)."""
    cfg = _config(message)
    _partition_id(context, cfg)  # a node config that names no data fails here, in one line
    rank = node_data.reported_rank(context.node_config)
    metrics = MetricRecord({} if rank is None else {"partition-id": rank})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on this node's held-out data (see client-eval-every)."""
    cfg = _config(message)
    partition_id = _partition_id(context, cfg)
    shape = _model_shape(message)
    split = node_data.eval_split(context.node_config, cfg, context.node_id, shape)
    model = loaded_model(cfg, record_to_numpy(message.content["arrays"]), shape)
    loss, accuracy = evaluate_model(model, *split.tensors())
    metrics = MetricRecord({"num-examples": len(split), "eval_loss": loss, "eval_accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=message)


__all__ = ["app"]
