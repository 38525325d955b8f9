"""One source of truth: ``Savic`` puts every client setting into each train and warm-up message.

A client reads rule, mode, alpha, beta, adam's beta1, the probes, the dtype,
the state version and the step size from the message; a client that cannot
honour them replies an error that the server logs (node and reason) and
counts as failed; a train config that contradicts the strategy is refused.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_scaling import Preconditioner, ScaledSGD
from flwr_scaling.clients.preconditioner_message import (
    SETTINGS_ERROR,
    preconditioner_from_message,
    refusal,
    require_settings,
    step_size,
)
from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.protocol.wire import put_encoded
from flwr_scaling.run.inprocess import FIRST_NODE_ID, InProcessGrid, server_identity
from flwr_scaling.strategies import Savic
from flwr_scaling.strategies.client_settings import ClientSettings

SEEN: list[dict] = []  # the config of every train message the clients below received


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def node_batch(node_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(node_id)
    return torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 0, 1])


def client_app(alpha_it_supports: float | None = None, refusing_node: int | None = None) -> ClientApp:
    """A hand-built client on ``ScaledSGD``; ``refusing_node`` only trains with ``alpha_it_supports``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        SEEN.append(dict(msg.content["config"]))
        model = tiny_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        try:
            if context.node_id == refusing_node:
                require_settings(msg, precond_alpha=alpha_it_supports)
            optimizer = ScaledSGD(model.named_parameters(), lr=step_size(msg),
                                  precond=preconditioner_from_message(msg, context))
        except ValueError as problem:
            return refusal(msg, problem)
        x, y = node_batch(context.node_id)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.step(loss=loss)
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "metrics": MetricRecord({"num-examples": len(y), "train_loss": float(loss.detach())})})
        put_encoded(reply, "stats", torch_to_numpy(optimizer.statistic()),
                    dtype=msg.content["config"]["precond-dtype"])
        return Message(content=reply, reply_to=msg)

    return app


def run(strategy: Savic, app: ClientApp, train_config: dict | None = None, rounds: int = 1):
    grid = InProcessGrid(client_app=app, num_nodes=3)
    with server_identity():
        return strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_model().state_dict()), num_rounds=rounds,
                              train_config=ConfigRecord(train_config or {}))


def test_every_setting_the_client_needs_travels_in_the_train_message():
    SEEN.clear()
    strategy = Savic(precond="rmsprop", precond_mode="local", precond_alpha=0.05, precond_beta=0.9,
                     adam_beta1=0.8, precond_probes=2, precond_init="ones", precond_dtype="bfloat16",
                     fraction_train=1.0, min_train_nodes=3, min_available_nodes=3, sampling_seed=0)
    run(strategy, client_app(), rounds=2)
    assert len(SEEN) == 6
    for config in SEEN:
        settings = {key: config[key] for key in ("precond", "precond-mode", "precond-alpha", "precond-beta",
                                                 "adam-beta1", "precond-probes", "precond-dtype", "lr")}
        # lr: rmsprop's default step size in local mode, as the rule registry says
        assert settings == {"precond": "rmsprop", "precond-mode": "local", "precond-alpha": 0.05,
                            "precond-beta": 0.9, "adam-beta1": 0.8, "precond-probes": 2,
                            "precond-dtype": "bfloat16", "lr": ClientSettings("rmsprop", "local", 1, 0.5).step_size()}
    # round 1 trains from v = 1 (no state sent), round 2 from the server's state of round 2
    assert [config.get("precond-version") for config in SEEN] == [None] * 3 + [2] * 3
    assert strategy.history[2]["clients_ok"] == 3


def test_the_train_configs_lr_overrides_the_default_and_unset_options_take_its_values():
    SEEN.clear()
    strategy = Savic(precond="adam", precond_init="ones", min_train_nodes=3, min_available_nodes=3)
    run(strategy, client_app(), {"lr": 0.125, "adam-beta1": 0.5, "precond-probes": 3})
    assert {(c["lr"], c["adam-beta1"], c["precond-probes"], c["precond-alpha"]) for c in SEEN} == {(0.125, 0.5, 3, 1e-3)}


def test_a_client_that_disagrees_is_refused_with_a_logged_reason(caplog):
    """Node 2 trains only with alpha 1e-3; the server asks for 0.1: its error reply is logged and counted."""
    refusing = FIRST_NODE_ID + 1
    strategy = Savic(precond="adam", precond_alpha=0.1, precond_init="ones", min_train_nodes=3,
                     min_available_nodes=3, sampling_seed=0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = run(strategy, client_app(alpha_it_supports=1e-3, refusing_node=refusing))
    assert (strategy.history[1]["clients_ok"], strategy.history[1]["clients_failed"]) == (2, 1)
    reason = "the server asks for precond-alpha = 0.1; this client trains with 0.001 only"
    assert f"Rejected reply from node {refusing}: client raised: {reason}" in caplog.text
    assert result.arrays is not None  # the two others trained


def test_refusal_is_an_error_reply_with_the_reason():
    with server_identity():
        msg = Message(RecordDict({"config": ConfigRecord({"precond": "lion"})}), dst_node_id=1, message_type="train")
        with pytest.raises(ValueError) as info:
            preconditioner_from_message(msg)
        reply = refusal(msg, info.value)
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (
        SETTINGS_ERROR, "unknown scaling rule 'lion'; choose one of identity, adagrad, rmsprop, adam, oasis"
    )


def test_a_state_for_other_parameters_is_refused_by_the_optimizer():
    with server_identity():
        msg = Message(RecordDict({"config": ConfigRecord({"precond": "adam"})}), dst_node_id=1, message_type="train")
    assert preconditioner_from_message(msg).state is None
    wrong = Preconditioner("adam", state={"weight": np.ones((2, 3), np.float32)})  # a state without the bias
    with pytest.raises(ValueError) as info:
        ScaledSGD(tiny_model().named_parameters(), lr=0.1, precond=wrong)
    assert str(info.value) == "the preconditioner state does not match the parameters: missing ['bias'], unexpected []"


@pytest.mark.parametrize(
    "train_config, message",
    [
        ({"precond": "oasis"}, "train_config sets precond = 'oasis' but the strategy trains with 'adam': "
                               "leave precond out of train_config (the strategy sends it to the clients)"),
        ({"precond-alpha": 0.1}, "train_config sets precond-alpha = 0.1 but the strategy trains with 0.001: "
                                 "leave precond-alpha out of train_config (the strategy sends it to the clients)"),
    ],
)
def test_a_train_config_that_contradicts_the_strategy_is_refused_before_any_message(train_config, message):
    SEEN.clear()
    strategy = Savic(precond="adam", precond_alpha=1e-3, precond_init="ones", min_train_nodes=3,
                     min_available_nodes=3)
    with pytest.raises(ValueError) as info:
        run(strategy, client_app(), train_config)
    assert str(info.value) == message
    assert SEEN == []
