"""``ScaledSGD`` against ``train_scaled`` and against hand-computed steps.

The agreement tests train a small tanh MLP on 240 scikit-learn digits twice
from the same weights, state and probe seed: once with ``train_scaled``, once
with ``ScaledSGD`` in a plain user loop, and compare the final parameters, the
reply (statistic or state) and the D̂ bounds. The one-step tests use a linear
loss ``(w * c).sum()``, whose gradient is ``c`` exactly, so every number is
written out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.datasets import load_digits
from torch import nn

from flwr_scaling import Preconditioner, ScaledSGD, preconditioner_from_message
from flwr_scaling.clients import client_app, node_data
from flwr_scaling.clients.client_app import MissingStateError
from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.core.local_sgd import TrainSettings, train_scaled
from flwr_scaling.core.seeding import client_streams, initial_model
from flwr_scaling.data.federated import load_federated_data, make_loader
from flwr_scaling.protocol.records import numpy_to_record
from flwr_scaling.protocol.wire import VERSION_KEY, put_encoded, take_encoded
from flwr_scaling.run.config import RunConfig

RULES = ("identity", "adagrad", "rmsprop", "adam", "oasis")
MODES = ("global", "local")
CLOSE = {"rtol": 1e-6, "atol": 1e-7}
EPOCHS = 2


def digits_batches(count: int = 240, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    bunch = load_digits()
    features = torch.tensor(bunch.data[:count] / 16.0, dtype=torch.float32)
    labels = torch.tensor(bunch.target[:count])
    return [(features[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, count, batch_size)]


def mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def positive_state(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {n: torch.rand(p.shape, generator=generator) * 0.1 + 1e-3 for n, p in model.named_parameters()}


def user_loop(model: nn.Module, batches, optimizer: ScaledSGD, how: str) -> None:
    """A Flower-quickstart style loop; ``how`` says how the gradient reaches the optimizer."""
    model.train()
    for _ in range(EPOCHS):
        for x, y in batches:
            if how == "loss":
                optimizer.step(loss=F.cross_entropy(model(x), y))
            elif how == "backward":
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            else:  # closure, torch's convention

                def closure():
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                optimizer.step(closure)


# The server's state with plain steps; v = 1 (precond-init "ones") with heavy-ball momentum.
@pytest.mark.parametrize(("with_state", "momentum"), [(True, 0.0), (False, 0.5)], ids=["state", "ones-momentum"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
def test_scaled_sgd_agrees_with_train_scaled(rule, mode, with_state, momentum):
    batches = digits_batches()
    reference, model = mlp(), mlp()
    state = positive_state(model) if with_state else None
    alpha = 0.1 if rule == "oasis" else 1e-3
    settings = TrainSettings(
        rule=rule, mode=mode, lr=0.02, alpha=alpha, beta=0.9, local_epochs=EPOCHS, momentum=momentum, num_probes=2
    )
    result = train_scaled(reference, batches, settings, state, torch.Generator().manual_seed(3))

    precond = Preconditioner(rule, mode, alpha=alpha, beta=0.9, momentum=momentum, num_probes=2, state=state)
    probes = torch.Generator().manual_seed(3)
    optimizer = ScaledSGD(model.named_parameters(), lr=0.02, precond=precond, generator=probes)
    user_loop(model, batches, optimizer, how="loss")

    assert optimizer.num_steps == result.num_steps == EPOCHS * len(batches)
    for (name, expected), actual in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, **CLOSE, msg=name)
    reply = result.statistic if mode == "global" else result.state
    if rule == "identity":
        assert reply is None and optimizer.statistic() is None
    else:
        statistic = optimizer.statistic()
        assert list(statistic) == list(reply) == [n for n, _ in model.named_parameters()]
        for name in reply:
            torch.testing.assert_close(statistic[name], reply[name], **CLOSE, msg=name)
    assert optimizer.diagonal_bounds() == pytest.approx((result.precond_min, result.precond_max), rel=1e-6)


@pytest.mark.parametrize("rule", ["identity", "adam"])
def test_fedprox_term_agrees_with_train_scaled(rule):
    """FedProx's mu (x - x_round) joins the gradient (not the statistic), x_round the parameters at construction."""
    batches = digits_batches(96)
    reference, model = mlp(), mlp()
    state = positive_state(model)
    settings = TrainSettings(rule=rule, mode="local", lr=0.05, beta=0.9, local_epochs=EPOCHS, proximal_mu=0.5)
    result = train_scaled(reference, batches, settings, state)
    precond = Preconditioner(rule, "local", alpha=settings.alpha, beta=0.9, state=state)
    optimizer = ScaledSGD(model.named_parameters(), lr=0.05, precond=precond, proximal_mu=0.5)
    user_loop(model, batches, optimizer, how="loss")
    for expected, actual in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, **CLOSE)
    if rule == "adam":
        for name, value in optimizer.statistic().items():
            torch.testing.assert_close(value, result.state[name], **CLOSE)


@pytest.mark.parametrize("how", ["backward", "closure"])
@pytest.mark.parametrize("rule", ["adagrad", "adam"])
def test_backward_and_closure_give_the_same_round_as_passing_the_loss(rule, how):
    batches = digits_batches(96)
    by_loss, by_grad = mlp(), mlp()
    precond = Preconditioner(rule, "local", beta=0.9, state=positive_state(by_loss))
    first = ScaledSGD(by_loss.named_parameters(), lr=0.02, precond=precond)
    second = ScaledSGD(by_grad.named_parameters(), lr=0.02, precond=precond)
    user_loop(by_loss, batches, first, how="loss")
    user_loop(by_grad, batches, second, how=how)
    for a, b in zip(by_loss.parameters(), by_grad.parameters(), strict=True):
        torch.testing.assert_close(b, a, **CLOSE)
    for name, value in first.statistic().items():
        torch.testing.assert_close(second.statistic()[name], value, **CLOSE)


# torch warns (once per process) that backward(create_graph=True) makes a reference cycle; the optimizer breaks it.
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_oasis_through_backward_with_create_graph_matches_passing_the_loss():
    batches = digits_batches(64)
    by_loss, by_grad = mlp(), mlp()
    precond = Preconditioner("oasis", "global", alpha=0.1, state=positive_state(by_loss))
    first = ScaledSGD(by_loss.named_parameters(), lr=0.02, precond=precond, generator=torch.Generator().manual_seed(1))
    second = ScaledSGD(by_grad.named_parameters(), lr=0.02, precond=precond, generator=torch.Generator().manual_seed(1))
    for x, y in batches:
        first.step(loss=F.cross_entropy(by_loss(x), y))
        second.zero_grad()
        F.cross_entropy(by_grad(x), y).backward(create_graph=True)
        second.step()
        assert all(not p.grad.requires_grad for p in by_grad.parameters())
    for a, b in zip(by_loss.parameters(), by_grad.parameters(), strict=True):
        torch.testing.assert_close(b, a, **CLOSE)
    for name, value in first.statistic().items():
        torch.testing.assert_close(second.statistic()[name], value, **CLOSE)


def linear_steps(precond: Preconditioner, gradients, lr: float = 0.1) -> tuple[torch.Tensor, ScaledSGD]:
    """Steps on ``(w * c).sum()`` from w = [1, -2]: the gradient of step t is ``gradients[t]``, exactly."""
    weight = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = ScaledSGD([("w", weight)], lr=lr, precond=precond)
    for gradient in gradients:
        optimizer.step(loss=(weight * torch.tensor(gradient, dtype=torch.float64)).sum())
    return weight.detach(), optimizer


def as64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_adam_global_one_step_by_hand():
    # D̂ = max(0.1, sqrt([4, 0.25])) = [2, 0.5]; m = 0.1 g, bias-corrected m / (1 - 0.9) = g = [3, -1];
    # w = [1, -2] - 0.1 * [3 / 2, -1 / 0.5] = [0.85, -1.8]; the statistic is g ⊙ g = [9, 1].
    weight, optimizer = linear_steps(Preconditioner("adam", alpha=0.1, state={"w": as64([4.0, 0.25])}), [[3.0, -1.0]])
    torch.testing.assert_close(weight, as64([0.85, -1.8]))
    torch.testing.assert_close(optimizer.statistic()["w"], as64([9.0, 1.0]))
    assert optimizer.diagonal_bounds() == (0.5, 2.0)


def test_adam_global_two_steps_bias_corrects_the_first_moment():
    # m1 = 0.1 g1 = [0.3, -0.1]; m2 = 0.9 m1 + 0.1 g2 = [0.37, 0.01], corrected / (1 - 0.81) = [0.37, 0.01] / 0.19.
    # D̂ = [2, 0.5] (global: fixed); w2 = w1 - 0.1 * m̂2 / D̂, w1 = [0.85, -1.8] as above.
    precond = Preconditioner("adam", alpha=0.1, state={"w": as64([4.0, 0.25])})
    weight, optimizer = linear_steps(precond, [[3.0, -1.0], [1.0, 1.0]])
    expected = as64([0.85 - 0.1 * (0.37 / 0.19) / 2.0, -1.8 - 0.1 * (0.01 / 0.19) / 0.5])
    torch.testing.assert_close(weight, expected)
    # The round mean of g ⊙ g: ([9, 1] + [1, 1]) / 2.
    torch.testing.assert_close(optimizer.statistic()["w"], as64([5.0, 1.0]))


def test_adam_local_one_step_by_hand():
    # v = 0.5 [4, 0.25] + 0.5 [9, 1] = [6.5, 0.625], then D̂ = sqrt(v); the step uses m̂ = g.
    precond = Preconditioner("adam", "local", alpha=0.1, beta=0.5, state={"w": as64([4.0, 0.25])})
    weight, optimizer = linear_steps(precond, [[3.0, -1.0]])
    torch.testing.assert_close(weight, as64([1.0 - 0.1 * 3.0 / math.sqrt(6.5), -2.0 + 0.1 / math.sqrt(0.625)]))
    torch.testing.assert_close(optimizer.statistic()["w"], as64([6.5, 0.625]))


def test_adagrad_local_one_step_by_hand():
    # v = [7, 3] + [3, -1]² = [16, 4], D̂ = [4, 2]; w = [1, -2] - 0.1 * [3 / 4, -1 / 2] = [0.925, -1.95].
    precond = Preconditioner("adagrad", "local", alpha=0.1, state={"w": as64([7.0, 3.0])})
    weight, optimizer = linear_steps(precond, [[3.0, -1.0]])
    torch.testing.assert_close(weight, as64([0.925, -1.95]))
    torch.testing.assert_close(optimizer.statistic()["w"], as64([16.0, 4.0]))


def test_adagrad_global_clips_the_diagonal_at_alpha():
    # D̂ = max(0.5, sqrt([4, 0.01])) = [2, 0.5]: the tiny state entry steps at lr / alpha.
    precond = Preconditioner("adagrad", alpha=0.5, state={"w": as64([4.0, 0.01])})
    weight, optimizer = linear_steps(precond, [[3.0, -1.0]])
    torch.testing.assert_close(weight, as64([0.85, -1.8]))
    assert optimizer.diagonal_bounds() == (0.5, 2.0)


def test_without_a_state_v_is_one_and_identity_is_plain_sgd():
    # v = 1: D̂ = max(1e-3, 1) = 1, the adagrad step is plain SGD's.
    weight, _ = linear_steps(Preconditioner("adagrad"), [[3.0, -1.0]])
    torch.testing.assert_close(weight, as64([0.7, -1.9]))
    weight, optimizer = linear_steps(Preconditioner(), [[3.0, -1.0]])
    torch.testing.assert_close(weight, as64([0.7, -1.9]))
    assert optimizer.statistic() is None and optimizer.diagonal() is None


def test_unnamed_parameters_take_the_state_keys_in_order():
    model = nn.Linear(3, 2)
    state = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    optimizer = ScaledSGD(model.parameters(), lr=0.1, precond=Preconditioner("adam", state=state))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert list(optimizer.statistic()) == ["weight", "bias"]
    named = ScaledSGD(model.parameters(), lr=0.1, precond=Preconditioner("adam"), names=["weight", "bias"])
    assert named.names == ["weight", "bias"]


def bad(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_bad_arguments_give_one_line_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^unknown scaling rule 'adamw'; choose one of identity, adagrad"):
        Preconditioner("adamw")
    bad(lambda: Preconditioner("adam", "often"), "Preconditioner: unknown mode 'often'; choose one of global, local")
    bad(lambda: Preconditioner("adam", alpha=0.0), "Preconditioner: alpha must be a finite number > 0, got 0.0")
    bad(lambda: Preconditioner("adam", beta=1.0), "Preconditioner: beta must be in [0, 1), got 1.0")
    bad(lambda: Preconditioner("oasis", num_probes=0), "Preconditioner: num_probes must be an integer >= 1, got 0")
    for lr in (0.0, -0.1, float("nan")):
        bad(lambda: ScaledSGD(model.parameters(), lr=lr), f"ScaledSGD: lr must be a finite number > 0, got {lr!r}")
    bad(
        lambda: ScaledSGD(model.parameters(), lr=0.1, precond=Preconditioner("adam")),
        "ScaledSGD: rule 'adam' replies a statistic keyed by parameter name: "
        "pass model.named_parameters() (or names=[...])",
    )
    wrong_keys = Preconditioner("adam", state={"weight": torch.ones(2, 3), "b": torch.ones(2)})
    bad(
        lambda: ScaledSGD(model.named_parameters(), lr=0.1, precond=wrong_keys),
        "the preconditioner state does not match the parameters: missing ['bias'], unexpected ['b']",
    )
    wrong_shape = Preconditioner("adam", state={"weight": torch.ones(3, 2), "bias": torch.ones(2)})
    bad(
        lambda: ScaledSGD(model.named_parameters(), lr=0.1, precond=wrong_shape),
        "the preconditioner state of 'weight' has shape (3, 2), the parameter (2, 3)",
    )
    bad(
        lambda: ScaledSGD(model.parameters(), lr=0.1, precond=Preconditioner("adam", state={"bias": torch.ones(2)})),
        "the preconditioner state has 1 array for 2 parameters",
    )
    bad(lambda: ScaledSGD(model.parameters(), lr=0.1, names=["weight"]), "ScaledSGD: 1 names for 2 parameters")
    groups = [{"params": [model.weight]}, {"params": [model.bias]}]
    bad(lambda: ScaledSGD(groups, lr=0.1), "ScaledSGD takes one parameter group, got 2")
    state = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    optimizer = ScaledSGD(model.named_parameters(), lr=0.1, precond=Preconditioner("adam", state=state))
    bad(optimizer.statistic, "ScaledSGD.statistic(): no step was taken, so there is no statistic")


def test_oasis_without_a_hessian_vector_product_says_how_to_pass_one():
    model = nn.Linear(3, 2)
    optimizer = ScaledSGD(model.named_parameters(), lr=0.1, precond=Preconditioner("oasis"))
    model(torch.ones(1, 3)).sum().backward()
    bad(
        optimizer.step,
        "rule 'oasis' needs a Hessian-vector product at every step: call optimizer.step(loss=loss) "
        "(the optimizer differentiates the loss itself), or loss.backward(create_graph=True) before optimizer.step()",
    )


# ---------------------------------------------------------------- from a Flower train message

ROUND_CONFIG = {
    "precond": "adam", "precond-mode": "local", "precond-alpha": 0.01, "precond-beta": 0.9, "adam-beta1": 0.8,
    "momentum": 0.5, "precond-probes": 2, "precond-dtype": "bfloat16", "lr": 0.05, "server-round": 3,
}
# Exactly representable in bfloat16, so the decoded state equals it.
WIRE_STATE = {"weight": np.full((2, 3), 0.25, dtype=np.float32), "bias": np.array([4.0, 0.5], dtype=np.float32)}


@pytest.fixture
def task_identity(monkeypatch):
    """Building a Message needs run, node and task ids, as inside a running app."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def train_message(config: dict, state: dict | None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if state is not None:
        put_encoded(content, "precond", state, dtype=str(config.get("precond-dtype", "float32")))
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def node_context(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(), run_config={})


@pytest.mark.usefixtures("task_identity")
def test_preconditioner_from_message_reads_every_setting_and_the_state():
    precond = preconditioner_from_message(train_message({**ROUND_CONFIG, VERSION_KEY: 3}, WIRE_STATE))
    assert precond == Preconditioner("adam", "local", alpha=0.01, beta=0.9, adam_beta1=0.8, momentum=0.5, num_probes=2)
    assert list(precond.state) == ["weight", "bias"]
    for name, value in WIRE_STATE.items():
        assert torch.equal(precond.state[name], torch.from_numpy(value))
    optimizer = ScaledSGD(nn.Linear(3, 2).named_parameters(), lr=ROUND_CONFIG["lr"], precond=precond)
    assert optimizer.diagonal_bounds() == (0.5, 2.0)  # sqrt of the state, clipped at 0.01


@pytest.mark.usefixtures("task_identity")
def test_preconditioner_from_message_without_a_state_is_v_one():
    precond = preconditioner_from_message(train_message({"precond": "oasis"}, None))
    assert precond == Preconditioner("oasis") and precond.state is None
    assert precond.alpha == pytest.approx(0.1)  # oasis's default alpha, as the run configuration's


@pytest.mark.usefixtures("task_identity")
def test_preconditioner_from_message_takes_an_unsent_state_from_the_node_cache():
    context = node_context()
    config = {**ROUND_CONFIG, VERSION_KEY: 3}
    sent = preconditioner_from_message(train_message(config, WIRE_STATE), context)
    cached = preconditioner_from_message(train_message(config, None), context)  # precond-every: not resent
    for name in WIRE_STATE:
        assert torch.equal(cached.state[name], sent.state[name])
    bad(
        lambda: preconditioner_from_message(train_message(config, None)),
        "the train message names the preconditioner state of round 3 but does not carry it (precond-every: "
        "the node should hold it): pass the ClientApp's context to use the node's cached state",
    )
    with pytest.raises(MissingStateError, match="holds no preconditioner state of round 4 in bfloat16"):
        preconditioner_from_message(train_message({**ROUND_CONFIG, VERSION_KEY: 4}, None), context)


@pytest.mark.usefixtures("task_identity")
def test_preconditioner_from_message_refuses_a_message_without_a_rule():
    bad(
        lambda: preconditioner_from_message(train_message({"lr": 0.1}, None)),
        "the train message's config names no scaling rule ('precond'): it did not come from flwr_scaling's strategy",
    )
    bad(
        lambda: preconditioner_from_message(train_message({"precond": "adam", "precond-dtype": "int8"}, None)),
        "precond-dtype must be one of float32, bfloat16, float16, got 'int8'",
    )


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("rule", "mode"), [("adam", "local"), ("oasis", "global")])
def test_a_user_loop_on_scaled_sgd_replies_what_the_client_app_replies(rule, mode):
    """The package's ClientApp against a hand-written client: same message, same data order and probes."""
    cfg = RunConfig(dataset="wine", model="logreg", num_clients=3, precond=rule, precond_mode=mode,
                    precond_dtype="bfloat16", local_epochs=2).resolved()
    data = load_federated_data(cfg.data_spec())
    start = initial_model("logreg", data.input_shape, data.num_classes, cfg.seed)
    state = {n: np.full(tuple(p.shape), 0.25, dtype=np.float32) for n, p in start.named_parameters()}
    content = RecordDict({
        "arrays": numpy_to_record(torch_to_numpy(start.state_dict())),
        "config": ConfigRecord({**cfg.to_flower(), "server-round": 2, VERSION_KEY: 2}),
    })
    put_encoded(content, "precond", state, dtype=cfg.precond_dtype)
    message = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    node_config = {"partition-id": 1, "num-partitions": 3}
    reply = client_app.app(message, node_context(node_config))
    assert not reply.has_error()

    config = message.content["config"]
    model = initial_model("logreg", data.input_shape, data.num_classes, cfg.seed)
    precond = preconditioner_from_message(message, node_context(node_config))
    loader_seed, probes = client_streams(cfg.seed, 2, 1)
    loader = make_loader(node_data.train_split(node_config, cfg), cfg.batch_size, loader_seed)
    optimizer = ScaledSGD(model.named_parameters(), lr=config["lr"], precond=precond, generator=probes)
    for _ in range(config["local-epochs"]):
        for x, y in loader:
            optimizer.step(loss=F.cross_entropy(model(x), y))

    for name, value in torch_to_numpy(model.state_dict()).items():
        np.testing.assert_allclose(reply.content["arrays"][name].numpy(), value, rtol=1e-6, atol=1e-7)
    ours = RecordDict()
    put_encoded(ours, "stats", torch_to_numpy(optimizer.statistic()), dtype=cfg.precond_dtype)
    theirs = take_encoded(reply.content, "stats", dtype=cfg.precond_dtype)
    for name, value in take_encoded(ours, "stats", dtype=cfg.precond_dtype).items():
        np.testing.assert_allclose(theirs[name], value, rtol=1e-6, atol=1e-7)
