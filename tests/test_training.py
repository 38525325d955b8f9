"""Unit tests for ``flwr_scaling.core.local_sgd`` against manual re-computations.

The models are tiny ``nn.Linear`` layers with hand-set weights, the loaders are
plain lists of ``(x, y)`` batches. Gradients for the expected values are
computed independently in the test with ``torch.autograd`` on the functional
form ``cross_entropy(x @ W.T + b, y)`` (not through the package), and every
update rule (global / local scaling, Adam's first moment, momentum) is re-done
by hand in a small loop. Most tests run in float64 so that "exact" means
agreement to ~1e-12; one test checks float32 models.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flwr_scaling.core.local_sgd import (
    TrainSettings,
    compute_statistic,
    evaluate,
    hutchinson_diagonal,
    train_scaled,
    trainable_parameters,
)

DT = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}

W0 = [[0.5, -0.3], [0.2, 0.8]]
B0 = [0.1, -0.2]

BATCHES = [
    ([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]], [0, 1, 1]),
    ([[0.5, -1.5], [2.0, 1.0]], [1, 0]),
    ([[-0.2, 0.4], [1.1, -0.3], [0.0, 1.0], [0.7, 0.7]], [0, 0, 1, 1]),
]


def make_loader(n: int = 3, dtype=DT):
    return [(torch.tensor(x, dtype=dtype), torch.tensor(y)) for x, y in BATCHES[:n]]


def make_model(weight=W0, bias=None, dtype=DT) -> nn.Linear:
    model = nn.Linear(2, 2, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight, dtype=dtype))
        if bias is not None:
            model.bias.copy_(torch.tensor(bias, dtype=dtype))
    return model


def loss_fn(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    logits = x @ w.T
    if b is not None:
        logits = logits + b
    return F.cross_entropy(logits, y)


def grad_at(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent gradient of the batch loss with respect to the weight matrix."""
    w = w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(w, x, y), [w])
    return g.detach()


def loss_at(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(loss_fn(w.detach(), x, y))


def w0() -> torch.Tensor:
    return torch.tensor(W0, dtype=DT)


# A state whose D̂ is known by hand, with alpha = 0.1:
# sqrt([[4, 0.25], [1e-4, 9]]) = [[2, 0.5], [0.01, 3]] -> clip at 0.1 -> [[2, 0.5], [0.1, 3]]
STATE_V = [[4.0, 0.25], [1e-4, 9.0]]
DHAT = [[2.0, 0.5], [0.1, 3.0]]
ALPHA = 0.1


def state_v(dtype=DT) -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor(STATE_V, dtype=dtype)}


def dhat() -> torch.Tensor:
    return torch.tensor(DHAT, dtype=DT)


# ---------------------------------------------------------------- global mode


def test_global_one_step_rmsprop_exact():
    model, loader = make_model(), make_loader(1)
    x, y = loader[0]
    g = grad_at(w0(), x, y)
    settings = TrainSettings(rule="rmsprop", mode="global", lr=0.1, alpha=ALPHA, beta=0.9)
    result = train_scaled(model, loader, settings, state_v())

    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * g / dhat(), **TIGHT)
    torch.testing.assert_close(result.statistic["weight"], g * g, **TIGHT)
    assert set(result.statistic) == {"weight"}
    assert result.state is None
    assert result.num_steps == 1
    assert result.num_examples == 3
    assert result.train_loss == pytest.approx(loss_at(w0(), x, y), rel=1e-12)
    assert result.precond_min == pytest.approx(0.1, rel=1e-12)
    assert result.precond_max == pytest.approx(3.0, rel=1e-12)


def test_global_one_step_closed_form_gradient():
    # The same step with g from the closed form of the softmax cross-entropy
    # gradient, (softmax(x W^T) - onehot(y))^T x / B, instead of autograd.
    model, loader = make_model(), make_loader(1)
    x, y = loader[0]
    p = torch.softmax(x @ w0().T, dim=1)
    g = (p - F.one_hot(y, 2).to(DT)).T @ x / len(y)
    train_scaled(model, loader, TrainSettings(rule="rmsprop", lr=0.1, alpha=ALPHA), state_v())
    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * g / dhat(), **TIGHT)


def test_global_identity_is_plain_sgd():
    model, loader = make_model(), make_loader(3)
    w = w0()
    losses = []
    for x, y in loader:
        losses.append(loss_at(w, x, y))
        w = w - 0.5 * grad_at(w, x, y)
    # a state given to a stateless rule is ignored
    result = train_scaled(model, loader, TrainSettings(rule="identity", lr=0.5), state_v())
    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    assert result.statistic is None
    assert result.state is None
    assert (result.precond_min, result.precond_max) == (1.0, 1.0)
    assert result.num_steps == 3
    assert result.num_examples == 3 + 2 + 4
    assert result.train_loss == pytest.approx(sum(losses) / 3, rel=1e-12)


@pytest.mark.parametrize("rule", ["rmsprop", "adagrad"])
def test_global_dhat_fixed_for_the_round_and_statistic_is_mean(rule):
    loader = make_loader(3)
    lr, epochs = 0.05, 2
    # manual loop with D̂ fixed for all 6 steps
    w, stats = w0(), []
    for _ in range(epochs):
        for x, y in loader:
            g = grad_at(w, x, y)
            stats.append(g * g)
            w = w - lr * g / dhat()
    expected_stat = sum(stats) / len(stats)

    model = make_model()
    given = state_v()
    settings = TrainSettings(rule=rule, mode="global", lr=lr, alpha=ALPHA, beta=0.5, local_epochs=epochs)
    result = train_scaled(model, loader, settings, given)

    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    torch.testing.assert_close(result.statistic["weight"], expected_stat, **TIGHT)
    assert result.num_steps == 6
    assert result.num_examples == 9  # counted over one epoch only
    assert (result.precond_min, result.precond_max) == pytest.approx((0.1, 3.0), rel=1e-12)
    torch.testing.assert_close(given["weight"], torch.tensor(STATE_V, dtype=DT), rtol=0, atol=0)  # not modified

    # the check discriminates: recomputing D̂ every step (local scaling) gives other weights
    w_local, v = w0(), torch.tensor(STATE_V, dtype=DT)
    for _ in range(epochs):
        for x, y in loader:
            g = grad_at(w_local, x, y)
            v = 0.5 * v + 0.5 * g * g if rule == "rmsprop" else v + g * g
            w_local = w_local - lr * g / v.sqrt().clamp(min=ALPHA)
    assert (w_local - w).abs().max() > 1e-4


def test_global_state_none_means_ones():
    loader = make_loader(2)
    w = w0()
    for x, y in loader:
        w = w - 0.2 * grad_at(w, x, y)  # D̂ = max(1e-3, sqrt(1)) = 1: plain SGD
    model = make_model()
    result = train_scaled(model, loader, TrainSettings(rule="rmsprop", lr=0.2, alpha=1e-3), None)
    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    assert (result.precond_min, result.precond_max) == (1.0, 1.0)


def test_global_state_none_with_alpha_above_one():
    # v = 1 -> D(v) = 1 -> D̂ = max(alpha, 1) = 2
    loader = make_loader(1)
    x, y = loader[0]
    expected = w0() - 0.2 * grad_at(w0(), x, y) / 2.0
    model = make_model()
    result = train_scaled(model, loader, TrainSettings(rule="rmsprop", lr=0.2, alpha=2.0), None)
    torch.testing.assert_close(model.weight.detach(), expected, **TIGHT)
    assert (result.precond_min, result.precond_max) == (2.0, 2.0)


def test_global_float32_model_with_float64_state():
    model, loader = make_model(dtype=torch.float32), make_loader(1, dtype=torch.float32)
    x, y = loader[0]
    g = grad_at(w0(), x.to(DT), y)
    result = train_scaled(model, loader, TrainSettings(rule="rmsprop", lr=0.1, alpha=ALPHA), state_v(DT))
    assert model.weight.dtype == torch.float32
    assert result.statistic["weight"].dtype == torch.float32
    torch.testing.assert_close(model.weight.detach(), (w0() - 0.1 * g / dhat()).float())
    torch.testing.assert_close(result.statistic["weight"], (g * g).float())


def test_only_trainable_parameters_are_scaled():
    model = make_model(bias=B0)
    model.bias.requires_grad_(False)
    assert list(trainable_parameters(model)) == ["weight"]
    loader = make_loader(1)
    x, y = loader[0]
    w = w0().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(w, x, y, torch.tensor(B0, dtype=DT)), [w])
    result = train_scaled(model, loader, TrainSettings(rule="rmsprop", lr=0.1, alpha=ALPHA), state_v())
    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * g / dhat(), **TIGHT)
    torch.testing.assert_close(model.bias.detach(), torch.tensor(B0, dtype=DT), rtol=0, atol=0)
    assert set(result.statistic) == {"weight"}


def test_global_with_bias_two_keys():
    # v_bias = [0.25, 16] -> D̂_bias = [0.5, 4]
    model, loader = make_model(bias=B0), make_loader(1)
    x, y = loader[0]
    w = w0().requires_grad_(True)
    b = torch.tensor(B0, dtype=DT, requires_grad=True)
    gw, gb = torch.autograd.grad(loss_fn(w, x, y, b), [w, b])
    state = {"weight": torch.tensor(STATE_V, dtype=DT), "bias": torch.tensor([0.25, 16.0], dtype=DT)}
    result = train_scaled(model, loader, TrainSettings(rule="adagrad", lr=0.1, alpha=ALPHA), state)
    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * gw / dhat(), **TIGHT)
    torch.testing.assert_close(model.bias.detach(), torch.tensor(B0, dtype=DT) - 0.1 * gb / torch.tensor([0.5, 4.0], dtype=DT), **TIGHT)
    torch.testing.assert_close(result.statistic["bias"], gb * gb, **TIGHT)
    assert (result.precond_min, result.precond_max) == pytest.approx((0.1, 4.0), rel=1e-12)


# ----------------------------------------------------------------------- adam


def test_adam_first_step_is_lr_g_over_dhat():
    # m1 = (1 - b1) g ; m1 / (1 - b1^1) = g  ->  x1 = x0 - lr g / D̂
    model, loader = make_model(), make_loader(1)
    x, y = loader[0]
    g = grad_at(w0(), x, y)
    train_scaled(model, loader, TrainSettings(rule="adam", lr=0.1, alpha=ALPHA, adam_beta1=0.9), state_v())
    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * g / dhat(), **TIGHT)


def test_adam_two_steps_bias_corrected():
    loader = make_loader(2)
    (x1, y1), (x2, y2) = loader
    lr, b1 = 0.1, 0.9
    g1 = grad_at(w0(), x1, y1)
    m = 0.1 * g1  # (1 - 0.9) g1
    w1 = w0() - lr * (m / 0.1) / dhat()  # 1 - 0.9^1 = 0.1
    g2 = grad_at(w1, x2, y2)
    m = 0.9 * m + 0.1 * g2
    w2 = w1 - lr * (m / 0.19) / dhat()  # 1 - 0.9^2 = 0.19

    model = make_model()
    result = train_scaled(model, loader, TrainSettings(rule="adam", lr=lr, alpha=ALPHA, adam_beta1=b1), state_v())
    torch.testing.assert_close(model.weight.detach(), w2, **TIGHT)
    # global mode: the statistic is the mean of the raw g ⊙ g, not of m ⊙ m
    torch.testing.assert_close(result.statistic["weight"], (g1 * g1 + g2 * g2) / 2, **TIGHT)
    # without bias correction the second step would differ
    w2_uncorrected = w1 - lr * m / dhat()
    assert (w2_uncorrected - w2).abs().max() > 1e-3


def test_adam_first_moment_restarts_each_round():
    loader = make_loader(2)
    settings = TrainSettings(rule="adam", lr=0.1, alpha=ALPHA)
    model = make_model()
    train_scaled(model, loader, settings, state_v())
    w_round1 = model.weight.detach().clone()
    x, y = BATCHES[2]
    x, y = torch.tensor(x, dtype=DT), torch.tensor(y)
    g = grad_at(w_round1, x, y)
    train_scaled(model, [(x, y)], settings, state_v())
    # the new round's first step uses m = g again, not a moment carried over
    torch.testing.assert_close(model.weight.detach(), w_round1 - 0.1 * g / dhat(), **TIGHT)


def test_adam_local_mode_moment_and_state():
    loader = make_loader(3)
    lr, b1, beta = 0.05, 0.8, 0.5
    w, v, m = w0(), torch.tensor(STATE_V, dtype=DT), torch.zeros(2, 2, dtype=DT)
    for t, (x, y) in enumerate(loader, start=1):
        g = grad_at(w, x, y)
        v = beta * v + (1 - beta) * g * g
        m = b1 * m + (1 - b1) * g
        w = w - lr * (m / (1 - b1**t)) / v.sqrt().clamp(min=ALPHA)
    model = make_model()
    settings = TrainSettings(rule="adam", mode="local", lr=lr, alpha=ALPHA, beta=beta, adam_beta1=b1)
    result = train_scaled(model, loader, settings, state_v())
    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    torch.testing.assert_close(result.state["weight"], v, **TIGHT)


# ------------------------------------------------------------------ local mode


@pytest.mark.parametrize("epochs", [1, 2])
def test_local_rmsprop_state_every_step(epochs):
    loader = make_loader(3)
    lr, beta = 0.05, 0.5
    w, v = w0(), torch.tensor(STATE_V, dtype=DT)
    for _ in range(epochs):
        for x, y in loader:
            g = grad_at(w, x, y)
            v = beta * v + (1 - beta) * g * g  # absorb this step's statistic ...
            d = v.sqrt().clamp(min=ALPHA)  # ... then recompute D̂ before the step
            w = w - lr * g / d
    model = make_model()
    given = state_v()
    settings = TrainSettings(rule="rmsprop", mode="local", lr=lr, alpha=ALPHA, beta=beta, local_epochs=epochs)
    result = train_scaled(model, loader, settings, given)

    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    torch.testing.assert_close(result.state["weight"], v, **TIGHT)
    assert result.statistic is None
    assert result.num_steps == 3 * epochs
    assert result.precond_min == pytest.approx(float(d.min()), rel=1e-12)  # the last D̂
    assert result.precond_max == pytest.approx(float(d.max()), rel=1e-12)
    torch.testing.assert_close(given["weight"], torch.tensor(STATE_V, dtype=DT), rtol=0, atol=0)


def test_local_one_step_by_hand_numbers():
    # one step, beta = 0.5, state [[4, 0.25], [1e-4, 9]]:
    # v1 = 0.5 v0 + 0.5 g², D̂1 = max(0.1, sqrt(v1)), x1 = x0 - lr g / D̂1
    loader = make_loader(1)
    x, y = loader[0]
    g = grad_at(w0(), x, y)
    v1 = 0.5 * torch.tensor(STATE_V, dtype=DT) + 0.5 * g * g
    model = make_model()
    result = train_scaled(model, loader, TrainSettings(rule="rmsprop", mode="local", lr=0.1, alpha=ALPHA, beta=0.5), state_v())
    torch.testing.assert_close(result.state["weight"], v1, **TIGHT)
    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * g / v1.sqrt().clamp(min=ALPHA), **TIGHT)


def test_local_adagrad_accumulates():
    loader = make_loader(3)
    w, v = w0(), torch.tensor(STATE_V, dtype=DT)
    for x, y in loader:
        g = grad_at(w, x, y)
        v = v + g * g  # beta ignored
        w = w - 0.1 * g / v.sqrt().clamp(min=ALPHA)
    model = make_model()
    result = train_scaled(model, loader, TrainSettings(rule="adagrad", mode="local", lr=0.1, alpha=ALPHA, beta=0.3), state_v())
    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    torch.testing.assert_close(result.state["weight"], v, **TIGHT)


def test_local_state_none_starts_from_ones():
    loader = make_loader(2)
    w, v = w0(), torch.ones(2, 2, dtype=DT)
    for x, y in loader:
        g = grad_at(w, x, y)
        v = 0.9 * v + 0.1 * g * g
        w = w - 0.1 * g / v.sqrt().clamp(min=1e-3)
    model = make_model()
    result = train_scaled(model, loader, TrainSettings(rule="rmsprop", mode="local", lr=0.1, alpha=1e-3, beta=0.9), None)
    torch.testing.assert_close(model.weight.detach(), w, **TIGHT)
    torch.testing.assert_close(result.state["weight"], v, **TIGHT)


def test_local_identity_returns_no_state():
    model = make_model()
    result = train_scaled(model, make_loader(2), TrainSettings(rule="identity", mode="local", lr=0.1))
    assert result.state is None and result.statistic is None


# -------------------------------------------------------------------- momentum


def test_momentum_identity_two_steps():
    # heavy ball: u1 = g1, x1 = x0 - lr u1 ; u2 = mu u1 + g2, x2 = x1 - lr u2
    loader = make_loader(2)
    (x1, y1), (x2, y2) = loader
    lr, mu = 0.1, 0.9
    g1 = grad_at(w0(), x1, y1)
    w1 = w0() - lr * g1
    g2 = grad_at(w1, x2, y2)
    w2 = w1 - lr * (mu * g1 + g2)
    model = make_model()
    train_scaled(model, loader, TrainSettings(rule="identity", lr=lr, momentum=mu))
    torch.testing.assert_close(model.weight.detach(), w2, **TIGHT)


def test_momentum_on_scaled_direction():
    # the velocity accumulates g / D̂, not g: u2 = mu g1/D̂ + g2/D̂
    loader = make_loader(2)
    (x1, y1), (x2, y2) = loader
    lr, mu = 0.05, 0.5
    g1 = grad_at(w0(), x1, y1)
    u = g1 / dhat()
    w1 = w0() - lr * u
    g2 = grad_at(w1, x2, y2)
    u = mu * u + g2 / dhat()
    w2 = w1 - lr * u
    model = make_model()
    train_scaled(model, loader, TrainSettings(rule="rmsprop", lr=lr, alpha=ALPHA, momentum=mu), state_v())
    torch.testing.assert_close(model.weight.detach(), w2, **TIGHT)


# ------------------------------------------------------------------ Hutchinson

# A symmetric, non-diagonal 4x4 matrix (indefinite: OASIS may see negative curvature).
A = torch.tensor(
    [
        [2.0, 0.5, -1.0, 0.3],
        [0.5, -1.0, 0.7, 0.0],
        [-1.0, 0.7, 3.0, 0.4],
        [0.3, 0.0, 0.4, 0.5],
    ],
    dtype=DT,
)


def quadratic_gradients(matrix: torch.Tensor, split: bool = False):
    """Gradients (with graph) of f(x) = 0.5 x^T A x at some x, and the parameters."""
    x = torch.tensor([0.3, -1.2, 0.8, 2.0], dtype=DT, requires_grad=True)
    if not split:
        f = 0.5 * x @ matrix @ x
        return torch.autograd.grad(f, [x], create_graph=True), [x]
    # the same quadratic over two parameter tensors: probes must be joint
    a = x.detach()[:2].clone().requires_grad_(True)
    b = x.detach()[2:].clone().requires_grad_(True)
    z = torch.cat([a, b])
    f = 0.5 * z @ matrix @ z
    return torch.autograd.grad(f, [a, b], create_graph=True), [a, b]


@pytest.mark.parametrize("split", [False, True])
def test_hutchinson_mean_matches_diagonal(split):
    n = 4000
    grads, params = quadratic_gradients(A, split)
    gen = torch.Generator().manual_seed(1234)
    estimate = torch.cat(hutchinson_diagonal(grads, params, n, gen))
    # For Rademacher z: z_i (A z)_i = A_ii + sum_{j != i} A_ij z_i z_j. The products
    # z_i z_j (j != i) are ±1, mean 0 and pairwise uncorrelated, so one probe has
    # Var_i = sum_{j != i} A_ij^2 and the mean over N probes has std sqrt(Var_i / N).
    # Tolerance: 5 standard deviations per coordinate.
    off = A - torch.diag(torch.diag(A))
    var = (off**2).sum(dim=1)  # [1.34, 0.74, 2.65, 0.25]
    tol = 5 * torch.sqrt(var / n)  # about [0.092, 0.068, 0.129, 0.040]
    err = (estimate - torch.diag(A)).abs()
    assert torch.all(err <= tol), (estimate, err, tol)
    # and the estimate is informative: it tells A_11 = -1 (negative) from A_00 = 2
    assert estimate[1] < 0 < estimate[0]


def test_hutchinson_one_probe_is_z_times_az():
    # one probe gives z ⊙ (A z) for one of the 16 sign vectors z (unknown to the test)
    grads, params = quadratic_gradients(A)
    (estimate,) = hutchinson_diagonal(grads, params, 1, torch.Generator().manual_seed(7))
    candidates = [torch.tensor(s, dtype=DT) for s in itertools.product([-1.0, 1.0], repeat=4)]
    distances = [float((z * (A @ z) - estimate).abs().max()) for z in candidates]
    assert min(distances) < 1e-12


def test_hutchinson_one_probe_on_diagonal_matrix_is_exact():
    # diagonal A: z_i (A z)_i = A_ii z_i^2 = A_ii for every probe
    diag_a = torch.diag(torch.tensor([2.0, -0.5, 3.0, 0.25], dtype=DT))
    grads, params = quadratic_gradients(diag_a)
    (estimate,) = hutchinson_diagonal(grads, params, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate, torch.tensor([2.0, -0.5, 3.0, 0.25], dtype=DT), rtol=0, atol=0)
    grads, params = quadratic_gradients(diag_a, split=True)
    a, b = hutchinson_diagonal(grads, params, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, torch.tensor([2.0, -0.5], dtype=DT), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.tensor([3.0, 0.25], dtype=DT), rtol=0, atol=0)


def test_hutchinson_seeded_is_reproducible():
    grads, params = quadratic_gradients(A)
    (first,) = hutchinson_diagonal(grads, params, 5, torch.Generator().manual_seed(3))
    grads, params = quadratic_gradients(A)
    (second,) = hutchinson_diagonal(grads, params, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def joint_hessian(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hessian of the batch loss over theta = (W flattened, b), 6x6, at (W0, B0)."""

    def f(theta):
        return loss_fn(theta[:4].view(2, 2), x, y, theta[4:])

    theta = torch.cat([w0().flatten(), torch.tensor(B0, dtype=DT)])
    return torch.autograd.functional.hessian(f, theta)


def matches_some_probe(statistic: torch.Tensor, hessian: torch.Tensor) -> bool:
    """Whether ``statistic`` equals z ⊙ (H z) for some z in {-1, 1}^d."""
    d = hessian.shape[0]
    for signs in itertools.product([-1.0, 1.0], repeat=d):
        z = torch.tensor(signs, dtype=DT)
        if float((z * (hessian @ z) - statistic).abs().max()) < 1e-12:
            return True
    return False


def test_oasis_global_statistic_is_one_joint_probe():
    model, loader = make_model(bias=B0), make_loader(1)
    x, y = loader[0]
    w = w0().requires_grad_(True)
    b = torch.tensor(B0, dtype=DT, requires_grad=True)
    gw, gb = torch.autograd.grad(loss_fn(w, x, y, b), [w, b])
    # oasis state may be negative: D̂ = max(0.1, |v|)
    state = {"weight": torch.tensor([[-4.0, 0.25], [-1e-4, 9.0]], dtype=DT), "bias": torch.tensor([-0.5, 2.0], dtype=DT)}
    d_w = torch.tensor([[4.0, 0.25], [0.1, 9.0]], dtype=DT)
    d_b = torch.tensor([0.5, 2.0], dtype=DT)
    settings = TrainSettings(rule="oasis", mode="global", lr=0.1, alpha=ALPHA, num_probes=1)
    result = train_scaled(model, loader, settings, state, generator=torch.Generator().manual_seed(11))

    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * gw / d_w, **TIGHT)
    torch.testing.assert_close(model.bias.detach(), torch.tensor(B0, dtype=DT) - 0.1 * gb / d_b, **TIGHT)
    stat = torch.cat([result.statistic["weight"].flatten(), result.statistic["bias"]])
    assert matches_some_probe(stat, joint_hessian(x, y))
    assert (result.precond_min, result.precond_max) == pytest.approx((0.1, 9.0), rel=1e-12)


def test_oasis_local_one_step():
    model, loader = make_model(bias=B0), make_loader(1)
    x, y = loader[0]
    w = w0().requires_grad_(True)
    b = torch.tensor(B0, dtype=DT, requires_grad=True)
    gw, gb = torch.autograd.grad(loss_fn(w, x, y, b), [w, b])
    v0 = {"weight": torch.tensor([[-4.0, 0.25], [-1e-4, 9.0]], dtype=DT), "bias": torch.tensor([-0.5, 2.0], dtype=DT)}
    settings = TrainSettings(rule="oasis", mode="local", lr=0.1, alpha=ALPHA, beta=0.5)
    result = train_scaled(model, loader, settings, v0, generator=torch.Generator().manual_seed(5))
    v1 = result.state
    # v1 = 0.5 v0 + 0.5 s with s one Hutchinson probe: recover s and check it
    s = torch.cat([(v1[k] - 0.5 * v0[k]).flatten() / 0.5 for k in ("weight", "bias")])
    assert matches_some_probe(s, joint_hessian(x, y))
    # the step uses D̂ = max(alpha, |v1|) (after absorbing the statistic)
    torch.testing.assert_close(model.weight.detach(), w0() - 0.1 * gw / v1["weight"].abs().clamp(min=ALPHA), **TIGHT)
    torch.testing.assert_close(
        model.bias.detach(), torch.tensor(B0, dtype=DT) - 0.1 * gb / v1["bias"].abs().clamp(min=ALPHA), **TIGHT
    )


def probe_candidates(hessian: torch.Tensor) -> torch.Tensor:
    """All z ⊙ (H z), z in {-1, 1}^d, as rows (2^d x d)."""
    z = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=hessian.shape[0])), dtype=DT)
    return z * (z @ hessian)  # H symmetric: (z @ H)_i = (H z)_i


def matches_some_pair(statistic: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether ``statistic`` is (a + b) / 2 for a row a of ``first`` and a row b of ``second``."""
    pairs = (first[:, None, :] + second[None, :, :]) / 2
    return bool(((pairs - statistic).abs().amax(dim=-1) < 1e-12).any())


def test_oasis_warmup_averages_probes():
    # compute_statistic with 2 probes on one batch: (z1 ⊙ H z1 + z2 ⊙ H z2) / 2
    model, loader = make_model(bias=B0), make_loader(1)
    hess = joint_hessian(*loader[0])
    stats, batches = compute_statistic(model, loader, "oasis", max_batches=5, num_probes=2, generator=torch.Generator().manual_seed(2))
    assert batches == 1
    estimate = torch.cat([stats["weight"].flatten(), stats["bias"]])
    candidates = probe_candidates(hess)
    assert matches_some_pair(estimate, candidates, candidates)
    assert not bool(((candidates - estimate).abs().amax(dim=-1) < 1e-12).any())  # not a single probe


def test_oasis_warmup_averages_batches():
    # one probe on each of two batches: (z1 ⊙ H1 z1 + z2 ⊙ H2 z2) / 2, H_k the Hessian of batch k
    model, loader = make_model(bias=B0), make_loader(3)
    stats, batches = compute_statistic(model, loader, "oasis", max_batches=2, num_probes=1, generator=torch.Generator().manual_seed(4))
    assert batches == 2
    estimate = torch.cat([stats["weight"].flatten(), stats["bias"]])
    first, second = probe_candidates(joint_hessian(*loader[0])), probe_candidates(joint_hessian(*loader[1]))
    assert matches_some_pair(estimate, first, second)
    torch.testing.assert_close(model.weight.detach(), w0(), rtol=0, atol=0)  # no training


# ------------------------------------------------------------ compute_statistic


def test_compute_statistic_mean_over_max_batches_and_model_unchanged():
    model, loader = make_model(bias=B0), make_loader(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = []
    for x, y in loader[:2]:
        w = w0().requires_grad_(True)
        b = torch.tensor(B0, dtype=DT, requires_grad=True)
        gw, gb = torch.autograd.grad(loss_fn(w, x, y, b), [w, b])
        expected.append((gw * gw, gb * gb))
    stats, batches = compute_statistic(model, loader, "adam", max_batches=2)
    assert batches == 2
    torch.testing.assert_close(stats["weight"], (expected[0][0] + expected[1][0]) / 2, **TIGHT)
    torch.testing.assert_close(stats["bias"], (expected[0][1] + expected[1][1]) / 2, **TIGHT)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model.weight.grad is None and model.bias.grad is None


def test_compute_statistic_fewer_batches_than_max():
    model, loader = make_model(), make_loader(3)
    expected = sum(grad_at(w0(), x, y) ** 2 for x, y in loader) / 3
    stats, batches = compute_statistic(model, loader, "rmsprop", max_batches=10)
    assert batches == 3
    torch.testing.assert_close(stats["weight"], expected, **TIGHT)
    torch.testing.assert_close(model.weight.detach(), w0(), rtol=0, atol=0)


def test_compute_statistic_one_batch():
    model, loader = make_model(), make_loader(3)
    x, y = loader[0]
    stats, batches = compute_statistic(model, loader, "adagrad", max_batches=1)
    assert batches == 1
    torch.testing.assert_close(stats["weight"], grad_at(w0(), x, y) ** 2, **TIGHT)


def test_compute_statistic_errors():
    with pytest.raises(ValueError, match=r"^the data loader yielded no batch: the client has no data$"):
        compute_statistic(make_model(), [], "rmsprop", max_batches=4)
    with pytest.raises(ValueError, match=r"^rule 'identity' has no statistic$"):
        compute_statistic(make_model(), make_loader(1), "identity", max_batches=4)
    with pytest.raises(ValueError, match=r"^unknown scaling rule 'nope'"):
        compute_statistic(make_model(), make_loader(1), "nope", max_batches=4)


# -------------------------------------------------------------------- evaluate


def test_evaluate_loss_and_accuracy_by_hand():
    # W = I, no bias: logits = x.
    # [1, 0] label 0: CE = log(1 + e^-1) ; predicted 0 (correct)
    # [0, 1] label 0: CE = log(1 + e^1)  ; predicted 1 (wrong)
    # [2, 0] label 1: CE = log(1 + e^2)  ; predicted 0 (wrong)
    # [0, 3] label 1: CE = log(1 + e^-3) ; predicted 1 (correct)
    model = make_model(weight=[[1.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]], dtype=DT)
    labels = torch.tensor([0, 0, 1, 1])
    expected_loss = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log1p(math.exp(2)) + math.log1p(math.exp(-3))) / 4
    for batch_size in (1, 3, 1024):  # the split is reduced by sum, so batching must not matter
        loss, accuracy = evaluate(model, features, labels, batch_size=batch_size)
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        assert accuracy == 0.5


def test_evaluate_perfect_and_zero_accuracy():
    features = torch.tensor([[3.0, 0.0], [0.0, 3.0]], dtype=DT)
    labels = torch.tensor([0, 1])
    loss, acc = evaluate(make_model(weight=[[1.0, 0.0], [0.0, 1.0]]), features, labels)
    assert acc == 1.0
    assert loss == pytest.approx(math.log1p(math.exp(-3)), rel=1e-12)
    loss, acc = evaluate(make_model(weight=[[0.0, 1.0], [1.0, 0.0]]), features, labels)
    assert acc == 0.0
    assert loss == pytest.approx(math.log1p(math.exp(3)), rel=1e-12)


# ---------------------------------------------------------------------- errors


def test_train_empty_loader():
    model = make_model()
    with pytest.raises(ValueError) as info:
        train_scaled(model, [], TrainSettings(rule="rmsprop"), state_v())
    assert str(info.value) == "the data loader yielded no batch: the client has no data"
    torch.testing.assert_close(model.weight.detach(), w0(), rtol=0, atol=0)


def test_train_unknown_mode():
    model = make_model()
    with pytest.raises(ValueError) as info:
        train_scaled(model, make_loader(1), TrainSettings(rule="rmsprop", mode="sideways"))
    assert str(info.value) == "unknown precond-mode 'sideways'; choose one of global, local"
    torch.testing.assert_close(model.weight.detach(), w0(), rtol=0, atol=0)


def test_train_unknown_rule():
    with pytest.raises(ValueError) as info:
        train_scaled(make_model(), make_loader(1), TrainSettings(rule="lion"))
    assert str(info.value) == "unknown scaling rule 'lion'; choose one of identity, adagrad, rmsprop, adam, oasis"


def test_train_state_missing_parameter():
    with pytest.raises(ValueError) as info:
        train_scaled(make_model(bias=B0), make_loader(1), TrainSettings(rule="rmsprop"), state_v())
    assert str(info.value) == "the preconditioner state lacks parameters ['bias']"


class _WithUnusedParameter(torch.nn.Module):
    """A model with a trainable parameter its forward pass never touches."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2, bias=False)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("rule", ["rmsprop", "oasis"])
def test_unused_parameter_gets_zero_statistic_and_no_step(rule):
    model = _WithUnusedParameter()
    batches = [(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))]
    settings = TrainSettings(rule=rule, mode="global", lr=0.1, alpha=0.1, local_epochs=1)
    result = train_scaled(model, batches, settings, state=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.unused.detach(), torch.ones(3))
    assert torch.equal(result.statistic["unused"], torch.zeros(3))


def test_warmup_reads_no_more_batches_than_it_uses():
    model = torch.nn.Linear(2, 2)
    pulled = []

    def batches():
        for i in range(5):
            pulled.append(i)
            yield torch.tensor([[1.0, float(i)]]), torch.tensor([i % 2])

    compute_statistic(model, batches(), "rmsprop", max_batches=2)
    assert pulled == [0, 1]


# ------------------------------------------- ScaledSGD loop (fused) against reference loop


def _cnn_problem(rule: str, seed: int = 0):
    """The digits CNN in float32, 6 random batches and a state like a warm-up's (signed for oasis)."""
    from flwr_scaling.core.models import build_model

    torch.manual_seed(seed)
    model = build_model("cnn", (1, 8, 8), 10)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.rand(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(6)]
    state = {}
    for name, param in trainable_parameters(model).items():
        values = torch.rand(param.shape, generator=gen) * 1e-2 + 1e-4
        if rule == "oasis":  # Hessian-diagonal estimates have either sign
            values = values * (torch.randint(0, 2, param.shape, generator=gen) * 2 - 1)
        state[name] = values
    return model, batches, state


PATH_CASES = [
    {},
    {"momentum": 0.9},
    {"proximal_mu": 0.5},
    {"local_epochs": 2},
    {"momentum": 0.5, "proximal_mu": 0.1, "adam_beta1": 0.8},
]


@pytest.mark.parametrize("extra", PATH_CASES, ids=lambda extra: ",".join(extra) or "plain")
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("rule", ["identity", "adagrad", "rmsprop", "adam", "oasis"])
def test_fused_path_equals_reference_path(rule, mode, extra):
    alpha = 0.1 if rule == "oasis" else 1e-3
    settings = TrainSettings(rule=rule, mode=mode, lr=0.01, alpha=alpha, beta=0.9, **extra)
    results, models = {}, {}
    for fused in (True, False):
        model, batches, state = _cnn_problem(rule)
        given = {k: v.clone() for k, v in state.items()}
        results[fused] = train_scaled(model, batches, settings, given, generator=torch.Generator().manual_seed(7), fused=fused)
        models[fused] = model
        for key, value in state.items():  # the caller's state is never written, in either path
            assert torch.equal(given[key], value)
    fast, reference = results[True], results[False]
    untrained, _, _ = _cnn_problem(rule)
    assert not torch.equal(models[True].classifier.weight, untrained.classifier.weight)  # it did train
    # 6 or 12 steps: the same parameters to float32 rounding
    for (name, a), b in zip(models[True].state_dict().items(), models[False].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for attr in ("statistic", "state"):
        got, expected = getattr(fast, attr), getattr(reference, attr)
        assert (got is None) == (expected is None), attr
        if expected is not None:
            assert list(got) == list(expected)
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)
    if rule != "identity":  # a state (local) or a statistic (global) comes back, as the mode says
        assert (fast.state is not None) == (mode == "local")
        assert (fast.statistic is not None) == (mode == "global")
    assert (fast.num_steps, fast.num_examples) == (reference.num_steps, reference.num_examples)
    assert fast.train_loss == pytest.approx(reference.train_loss, rel=1e-5)
    assert fast.precond_min == pytest.approx(reference.precond_min, rel=1e-5)
    assert fast.precond_max == pytest.approx(reference.precond_max, rel=1e-5)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_fused_path_by_hand_local_adagrad_float64(mode):
    # the hand-computed check of test_local_adagrad_accumulates / test_global_one_step_rmsprop_exact,
    # through both loops in float64: they agree to 1e-12 after 3 steps
    settings = TrainSettings(rule="adagrad", mode=mode, lr=0.1, alpha=ALPHA, beta=0.3, momentum=0.5)
    weights = []
    for fused in (True, False):
        model = make_model(bias=B0)
        state = {"weight": torch.tensor(STATE_V, dtype=DT), "bias": torch.tensor([0.5, 2.0], dtype=DT)}
        train_scaled(model, make_loader(3), settings, state, fused=fused)
        weights.append(torch.cat([model.weight.detach().flatten(), model.bias.detach()]))
    torch.testing.assert_close(weights[0], weights[1], **TIGHT)


def test_rule_without_in_place_variants_trains_as_the_reference_loop(monkeypatch):
    # a rule registered with only its pure functions still trains through ScaledSGD (its pure
    # update/diagonal, then the fused step), as the reference loop does, to float64 rounding
    import dataclasses

    from flwr_scaling.core.rules import RULES

    monkeypatch.setitem(RULES, "rmsprop", dataclasses.replace(RULES["rmsprop"], update_in_place_fn=None))
    assert not RULES["rmsprop"].has_in_place
    settings = TrainSettings(rule="rmsprop", mode="local", lr=0.1, alpha=ALPHA, beta=0.5)
    weights = []
    for fused in (True, False):
        model = make_model()
        train_scaled(model, make_loader(3), settings, state_v(), fused=fused)
        weights.append(model.weight.detach().clone())
    assert not torch.equal(weights[0], make_model().weight.detach())  # it did train
    torch.testing.assert_close(weights[0], weights[1], **TIGHT)


def test_model_without_trainable_parameters_is_refused():
    model = make_model()
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError) as info:
        train_scaled(model, make_loader(1), TrainSettings(rule="rmsprop"))
    assert str(info.value) == "the model has no trainable parameters: there is nothing to train"
