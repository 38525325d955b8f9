"""The round's ``Preconditioner`` as a Flower train message carries it, for a user's own ClientApp.

``flwr_scaling``'s strategy puts every scaling setting in the message's
ConfigRecord ``config`` and, when there is a state, the state in the
ArrayRecord ``precond`` (encoded as the config's ``precond-dtype`` says, see
``flwr_scaling.protocol.wire``). A client built on ``ScaledSGD`` reads both
here instead of repeating the server's settings by hand::

    precond = preconditioner_from_message(msg, context)
    optimizer = ScaledSGD(model.named_parameters(), lr=msg.content["config"]["lr"], precond=precond)
    ...  # the user's own loop: optimizer.step(loss=loss) or loss.backward(); optimizer.step()
    put_encoded(reply, "stats", torch_to_numpy(optimizer.statistic()), dtype=config["precond-dtype"])

This lives in the Flower glue, not beside ``Preconditioner`` in ``core``: the
math layer knows no Flower message.
"""

from __future__ import annotations

from flwr.app import Context, Message

from flwr_scaling.core.optimizer import Preconditioner
from flwr_scaling.protocol.wire import DTYPE_KEY, VERSION_KEY, check_dtype, take_encoded

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
    if "config" not in content.config_records:
        raise ValueError("the train message has no ConfigRecord 'config': it did not come from flwr_scaling's strategy")
    config = content["config"]
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
