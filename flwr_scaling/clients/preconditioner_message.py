"""The round's ``Preconditioner`` as a Flower train message carries it, for a user's own ClientApp.

``flwr_scaling``'s strategy puts every scaling setting in the message's
ConfigRecord ``config`` and, when there is a state, the state in the
ArrayRecord ``precond`` (encoded as the config's ``precond-dtype`` says, see
``flwr_scaling.protocol.wire``). A client built on ``ScaledSGD`` reads both
here instead of repeating the server's settings by hand::

    try:
        precond = preconditioner_from_message(msg, context)
        optimizer = ScaledSGD(model.named_parameters(), lr=step_size(msg), precond=precond)
    except ValueError as problem:  # settings or a state this client cannot honour
        return refusal(msg, problem)  # the server logs the node and the reason, and counts it failed
    ...  # the user's own loop: optimizer.step(loss=loss) or loss.backward(); optimizer.step()
    put_statistic(reply, optimizer, msg)  # the statistic (global) or state (local), encoded as the server asks

A client that supports only some settings says so with ``require_settings``
(e.g. ``require_settings(msg, precond="adam")``), which refuses the others in
the same way.

This lives in the Flower glue, not beside ``Preconditioner`` in ``core``: the
math layer knows no Flower message.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict

from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.core.optimizer import Preconditioner, ScaledSGD
from flwr_scaling.protocol.wire import DTYPE_KEY, VERSION_KEY, check_dtype, put_encoded, take_encoded

# ConfigRecord key -> Preconditioner field. The rule ("precond") is required: a message
# without it did not come from flwr_scaling's strategy, and guessing a rule would train
# with settings the server does not use.
SETTING_KEYS = {
    "precond-mode": "mode",
    "precond-alpha": "alpha",
    "precond-beta": "beta",
    "adam-beta1": "adam_beta1",
    "momentum": "momentum",
    "precond-probes": "num_probes",
}
STATE_KEY = "precond"  # the ArrayRecord with the state, as the strategy sends it
STATS_KEY = "stats"  # the ArrayRecord with the statistic (or state) in the reply, as the strategy reads it
# Error code of a reply refusing the round's settings (Flower's own codes are below 1000).
SETTINGS_ERROR = 4602


def _config(message: Message):
    if "config" not in message.content.config_records:
        raise ValueError("the train message has no ConfigRecord 'config': it did not come from flwr_scaling's strategy")
    return message.content["config"]


def step_size(message: Message) -> float:
    """The client step size the strategy sends (``lr``)."""
    config = _config(message)
    if "lr" not in config:
        raise ValueError("the train message's config has no step size ('lr'): it did not come from flwr_scaling's strategy")
    return float(config["lr"])


def require_settings(message: Message, **expected: object) -> None:
    """Refuse settings this client cannot train with: ``expected`` maps config keys
    (``-`` written ``_``: ``precond_alpha``) to the only value the client accepts.

    Raises
    ------
    ValueError
        One line per the first disagreement, e.g. ``the server asks for
        precond-alpha = 0.1; this client trains with 0.001 only``.
    """
    config = _config(message)
    for name, wanted in expected.items():
        key = name.replace("_", "-")
        given = config.get(key)
        if given != wanted:
            raise ValueError(f"the server asks for {key} = {given!r}; this client trains with {wanted!r} only")


def refusal(message: Message, problem: BaseException | str) -> Message:
    """The error reply to ``message``: the round's settings cannot be honoured, and why."""
    return Message(Error(code=SETTINGS_ERROR, reason=str(problem)), reply_to=message)


def preconditioner_from_message(message: Message, context: Context | None = None) -> Preconditioner:
    """The ``Preconditioner`` a train message asks this client to train with.

    Parameters
    ----------
    message : Message
        A train message from ``flwr_scaling``'s strategy.
    context : Context, optional
        The ClientApp's context. With it, a state the server did not resend
        (``precond-every K``: the node already holds this version) comes from
        ``context.state``, and a state that did come is kept there for later
        rounds, exactly as ``flwr_scaling``'s own ClientApp does. Without it a
        message that names a state version but carries no state is refused.

    Raises
    ------
    ValueError
        One line: no rule in the config, a bad setting, an unknown encoding,
        a malformed state, or (without ``context``) a state not sent.
    flwr_scaling.clients.client_app.MissingStateError
        With ``context``: the node does not hold the state version the
        message names (an error reply makes the server resend it).
    """
    content = message.content
    config = _config(message)
    if "precond" not in config:
        raise ValueError(
            "the train message's config names no scaling rule ('precond'): it did not come from flwr_scaling's strategy"
        )
    settings = {field: config[key] for key, field in SETTING_KEYS.items() if key in config}
    dtype = str(config.get(DTYPE_KEY, "float32"))
    check_dtype(dtype)
    if context is not None:
        # Deferred: client_app is the ClientApp module and may come to import this one.
        from flwr_scaling.clients.client_app import round_state

        state = round_state(content, context, dtype)
    elif STATE_KEY in content.array_records:
        state = take_encoded(content, STATE_KEY, dtype=dtype)
    elif config.get(VERSION_KEY) is not None:
        raise ValueError(
            f"the train message names the preconditioner state of round {config[VERSION_KEY]} but does not carry it "
            "(precond-every: the node should hold it): pass the ClientApp's context to use the node's cached state"
        )
    else:
        state = None  # v = 1: precond-init "ones" before the first statistics, or a rule without state
    return Preconditioner(str(config["precond"]), state=state, **settings)


def put_statistic(reply: RecordDict, optimizer: ScaledSGD, message: Message) -> None:
    """Add ``optimizer.statistic()`` to ``reply`` under ``"stats"``, encoded as ``message``'s
    config says (``precond-dtype``); nothing for a rule without state (identity)."""
    statistic = optimizer.statistic()
    if statistic is not None:
        dtype = str(_config(message).get(DTYPE_KEY, "float32"))
        put_encoded(reply, STATS_KEY, torch_to_numpy(statistic), dtype=dtype)
