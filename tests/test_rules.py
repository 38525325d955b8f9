"""Unit tests for ``flwr_scaling.core.rules``: every rule against hand-computed numbers.

All expected values below are written out by hand (see the comments for the
arithmetic); they are chosen to be exact in float32 wherever an exact
comparison is made. Every rule is checked on NumPy arrays (server side) and on
torch tensors (client side), and must return the same kind of array.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_scaling.core.rules import (
    RULES,
    STAT_GRAD_SQUARED,
    STAT_HUTCHINSON,
    STAT_NONE,
    diagonal_bounds,
    get_rule,
    ones_like,
)

BACKENDS = ("numpy", "torch")


def arr(values, backend: str):
    """A float32 array of ``values`` in the given backend."""
    if backend == "numpy":
        return np.array(values, dtype=np.float32)
    return torch.tensor(values, dtype=torch.float32)


def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def assert_backend(value, backend: str) -> None:
    """The result stays in the caller's backend and in float32."""
    if backend == "numpy":
        assert isinstance(value, np.ndarray)
        assert value.dtype == np.float32
    else:
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float32


def assert_exact(value, expected, backend: str) -> None:
    assert_backend(value, backend)
    np.testing.assert_array_equal(to_numpy(value), np.array(expected, dtype=np.float32))


def assert_near(value, expected, backend: str) -> None:
    assert_backend(value, backend)
    np.testing.assert_allclose(to_numpy(value), np.array(expected, dtype=np.float32), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ registry


def test_registry_names_and_order():
    assert list(RULES) == ["identity", "adagrad", "rmsprop", "adam", "oasis"]
    for name, rule in RULES.items():
        assert rule.name == name
        assert get_rule(name) is rule


def test_rule_flags():
    assert RULES["identity"].statistic == STAT_NONE
    assert not RULES["identity"].has_state
    for name in ("adagrad", "rmsprop", "adam"):
        assert RULES[name].statistic == STAT_GRAD_SQUARED
        assert RULES[name].has_state
        assert RULES[name].nonnegative
    assert RULES["oasis"].statistic == STAT_HUTCHINSON
    assert RULES["oasis"].has_state
    assert not RULES["oasis"].nonnegative  # Hessian-diagonal estimates can be negative
    assert [n for n, r in RULES.items() if r.first_moment] == ["adam"]


def test_get_rule_unknown_name_message():
    with pytest.raises(ValueError) as info:
        get_rule("sgd")
    assert str(info.value) == "unknown scaling rule 'sgd'; choose one of identity, adagrad, rmsprop, adam, oasis"


# -------------------------------------------------------------------- update


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_update_keeps_state(backend):
    state = {"w": arr([4.0, 0.25], backend)}
    new = RULES["identity"].update(state, {"w": arr([1.0, 9.0], backend)}, 0.5)
    assert new is not state  # a new dict ...
    assert_exact(new["w"], [4.0, 0.25], backend)  # ... with the statistic ignored


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.5, 0.99, 0.0])
def test_adagrad_update_sums_and_ignores_beta(backend, beta):
    # [4, 0.25] + [1, 9] = [5, 9.25], whatever beta is
    state = {"w": arr([4.0, 0.25], backend), "b": arr([[0.0], [2.0]], backend)}
    stat = {"w": arr([1.0, 9.0], backend), "b": arr([[3.0], [0.5]], backend)}
    new = RULES["adagrad"].update(state, stat, beta)
    assert set(new) == {"w", "b"}
    assert_exact(new["w"], [5.0, 9.25], backend)
    assert_exact(new["b"], [[3.0], [2.5]], backend)
    # the inputs are not modified
    assert_exact(state["w"], [4.0, 0.25], backend)
    assert_exact(stat["w"], [1.0, 9.0], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rmsprop", "adam", "oasis"])
def test_moving_average_update_beta_half(backend, name):
    # 0.5*4 + 0.5*1 = 2.5 ; 0.5*0.25 + 0.5*9 = 0.125 + 4.5 = 4.625
    state = {"w": arr([4.0, 0.25], backend)}
    new = RULES[name].update(state, {"w": arr([1.0, 9.0], backend)}, 0.5)
    assert_exact(new["w"], [2.5, 4.625], backend)
    assert_exact(state["w"], [4.0, 0.25], backend)  # not modified in place


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_moving_average_update_beta_09(backend, name):
    # 0.9*4 + 0.1*1 = 3.7 ; 0.9*0.25 + 0.1*9 = 0.225 + 0.9 = 1.125 ; 0.9*0 + 0.1*2 = 0.2
    state = {"w": arr([[4.0, 0.25, 0.0]], backend)}
    new = RULES[name].update(state, {"w": arr([[1.0, 9.0, 2.0]], backend)}, 0.9)
    assert_near(new["w"], [[3.7, 1.125, 0.2]], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_average_beta_extremes(backend):
    state = {"w": arr([4.0, 0.25], backend)}
    stat = {"w": arr([1.0, 9.0], backend)}
    assert_exact(RULES["rmsprop"].update(state, stat, 1.0)["w"], [4.0, 0.25], backend)  # keeps v
    assert_exact(RULES["rmsprop"].update(state, stat, 0.0)["w"], [1.0, 9.0], backend)  # takes s


@pytest.mark.parametrize("backend", BACKENDS)
def test_oasis_update_with_negative_state_and_statistic(backend):
    # 0.5*(-4) + 0.5*1 = -1.5 ; 0.5*0.25 + 0.5*(-9) = 0.125 - 4.5 = -4.375
    state = {"w": arr([-4.0, 0.25], backend)}
    new = RULES["oasis"].update(state, {"w": arr([1.0, -9.0], backend)}, 0.5)
    assert_exact(new["w"], [-1.5, -4.375], backend)


# ------------------------------------------------------------------ diagonal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam"])
def test_sqrt_diagonal_and_clip(backend, name):
    # sqrt: 4 -> 2, 0.25 -> 0.5, 9 -> 3 ; sqrt(1e-8) = 1e-4 < alpha = 1e-3 -> 1e-3 ; 0 -> 1e-3
    state = {"w": arr([[4.0, 0.25], [1e-8, 9.0]], backend), "b": arr([0.0, 1.0], backend)}
    diag = RULES[name].diagonal(state, 1e-3)
    assert set(diag) == {"w", "b"}
    assert_near(diag["w"], [[2.0, 0.5], [1e-3, 3.0]], backend)
    assert_near(diag["b"], [1e-3, 1.0], backend)
    # the clipped entry is alpha itself (as float32), not sqrt(v) = 1e-4
    assert to_numpy(diag["w"])[1, 0] == np.float32(1e-3)
    assert_exact(state["w"], [[4.0, 0.25], [1e-8, 9.0]], backend)  # not modified


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqrt_diagonal_clip_with_large_alpha(backend):
    # alpha = 1: sqrt(4) = 2 stays, sqrt(0.25) = 0.5 -> 1, sqrt(9) = 3 stays
    diag = RULES["rmsprop"].diagonal({"w": arr([4.0, 0.25, 9.0], backend)}, 1.0)
    assert_exact(diag["w"], [2.0, 1.0, 3.0], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oasis_diagonal_is_abs_then_clip(backend):
    # |v|: -4 -> 4, 0.25 -> 0.25, -1e-4 -> 1e-4 < 1e-3 -> 1e-3, 0 -> 1e-3, -2.5 -> 2.5
    state = {"w": arr([-4.0, 0.25, -1e-4, 0.0, -2.5], backend)}
    diag = RULES["oasis"].diagonal(state, 1e-3)
    assert_near(diag["w"], [4.0, 0.25, 1e-3, 1e-3, 2.5], backend)
    # oasis uses |v|, NOT sqrt(v): for v = 0.25 sqrt would give 0.5
    assert to_numpy(diag["w"])[1] == np.float32(0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oasis_diagonal_alpha_01(backend):
    # the documented oasis guard alpha = 0.1: |-0.05| = 0.05 -> 0.1 ; |0.5| = 0.5 ; |-3| = 3
    diag = RULES["oasis"].diagonal({"w": arr([-0.05, 0.5, -3.0], backend)}, 0.1)
    assert_near(diag["w"], [0.1, 0.5, 3.0], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_diagonal_is_one_then_clip(backend):
    state = {"w": arr([[4.0, -7.0], [0.0, 1e-8]], backend)}
    assert_exact(RULES["identity"].diagonal(state, 1e-3)["w"], [[1.0, 1.0], [1.0, 1.0]], backend)
    # max(alpha, 1) = alpha when alpha > 1
    assert_exact(RULES["identity"].diagonal(state, 2.0)["w"], [[2.0, 2.0], [2.0, 2.0]], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_cycle_update_then_diagonal(backend):
    # rmsprop, beta = 0.5: v = [2.5, 4.625] -> D = sqrt(v) = [1.5811388, 2.1505813]
    rule = RULES["rmsprop"]
    state = rule.update({"w": arr([4.0, 0.25], backend)}, {"w": arr([1.0, 9.0], backend)}, 0.5)
    diag = rule.diagonal(state, 1e-3)
    assert_near(diag["w"], [1.5811388, 2.1505813], backend)


@pytest.mark.parametrize("name", ["rmsprop", "oasis", "identity"])
def test_diagonal_on_zero_dim_numpy_array(name):
    state = {"scale": np.asarray(np.float32(4.0))}
    diag = RULES[name].diagonal(state, 1e-3)
    expected = {"rmsprop": 2.0, "oasis": 4.0, "identity": 1.0}[name]
    assert float(diag["scale"]) == expected


def test_diagonal_on_zero_dim_torch_tensor():
    # the torch side handles 0-d tensors (sqrt(1e-8) = 1e-4 -> 1e-3)
    diag = RULES["rmsprop"].diagonal({"s": torch.tensor(1e-8), "t": torch.tensor(4.0)}, 1e-3)
    assert float(diag["s"]) == pytest.approx(1e-3, rel=1e-6)
    assert float(diag["t"]) == 2.0


# ------------------------------------------------------------ helpers: bounds


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_bounds(backend):
    diag = {"w": arr([[2.0, 0.5], [3.0, 1.0]], backend), "b": arr([0.125, 7.0], backend)}
    low, high = diagonal_bounds(diag)
    assert (low, high) == (0.125, 7.0)
    assert type(low) is float and type(high) is float


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_bounds_single_array_and_constant(backend):
    assert diagonal_bounds({"w": arr([0.25, 0.25], backend)}) == (0.25, 0.25)
    # min and max may come from different arrays
    assert diagonal_bounds({"a": arr([5.0], backend), "b": arr([0.5, 9.0], backend)}) == (0.5, 9.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_bounds_of_clipped_rule(backend):
    # rmsprop, alpha = 1e-3: D = [2, 1e-3 (clipped), 3] -> (1e-3, 3)
    diag = RULES["rmsprop"].diagonal({"w": arr([4.0, 0.0, 9.0], backend)}, 1e-3)
    low, high = diagonal_bounds(diag)
    assert low == pytest.approx(1e-3, rel=1e-6)
    assert high == 3.0


# --------------------------------------------------------- helpers: ones_like


@pytest.mark.parametrize("backend", BACKENDS)
def test_ones_like(backend):
    source = {"w": arr([[4.0, -7.0], [0.0, 0.5]], backend), "b": arr([3.0], backend)}
    ones = ones_like(source)
    assert set(ones) == {"w", "b"}
    assert_exact(ones["w"], [[1.0, 1.0], [1.0, 1.0]], backend)
    assert_exact(ones["b"], [1.0], backend)
    assert_exact(source["w"], [[4.0, -7.0], [0.0, 0.5]], backend)  # not modified


def test_ones_like_keeps_dtype():
    ones = ones_like({"a": np.zeros(3, dtype=np.float64), "t": torch.zeros(2, dtype=torch.float64)})
    assert ones["a"].dtype == np.float64
    assert ones["t"].dtype == torch.float64
    np.testing.assert_array_equal(ones["a"], [1.0, 1.0, 1.0])
    assert torch.equal(ones["t"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam", "oasis"])
def test_ones_state_gives_unit_diagonal(backend, name):
    # precond-init = "ones": D = sqrt(1) = |1| = 1 -> D̂ = max(alpha, 1)
    state = ones_like({"w": arr([0.3, -2.0], backend)})
    assert_exact(RULES[name].diagonal(state, 1e-3)["w"], [1.0, 1.0], backend)
    assert_exact(RULES[name].diagonal(state, 4.0)["w"], [4.0, 4.0], backend)


# ------------------------------------------- in-place variants (client fast path)


def tensors(*rows) -> list[torch.Tensor]:
    return [torch.tensor(row, dtype=torch.float32) for row in rows]


def test_every_rule_has_in_place_variants():
    assert all(rule.has_in_place for rule in RULES.values())


@pytest.mark.parametrize("name", ["rmsprop", "adam", "oasis"])
def test_moving_average_update_in_place_beta_half(name):
    # same numbers as the pure update: 0.5*4 + 0.5*1 = 2.5 ; 0.5*0.25 + 0.5*9 = 4.625 ; 0.5*2 + 0.5*0 = 1
    states = tensors([4.0, 0.25], [[2.0]])
    before = [s.data_ptr() for s in states]
    RULES[name].update_(states, tensors([1.0, 9.0], [[0.0]]), 0.5)
    assert_exact(states[0], [2.5, 4.625], "torch")
    assert_exact(states[1], [[1.0]], "torch")
    assert [s.data_ptr() for s in states] == before  # written in place, not replaced


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_moving_average_update_in_place_squared_gradients(name):
    # squared: the statistic is g*g = [1, 9] for g = [-1, 3]: 0.5*4 + 0.5*1 = 2.5 ; 0.5*0.25 + 0.5*9 = 4.625
    states = tensors([4.0, 0.25])
    grads = tensors([-1.0, 3.0])
    RULES[name].update_(states, grads, 0.5, squared=True)
    assert_exact(states[0], [2.5, 4.625], "torch")
    assert_exact(grads[0], [-1.0, 3.0], "torch")  # the gradients are not modified


@pytest.mark.parametrize("squared", [False, True])
def test_adagrad_update_in_place_sums_and_ignores_beta(squared):
    # [4, 0.25] + [1, 9] = [5, 9.25]; squared: g = [1, -3] gives the same statistic [1, 9]
    states = tensors([4.0, 0.25])
    statistic = tensors([1.0, -3.0] if squared else [1.0, 9.0])
    RULES["adagrad"].update_(states, statistic, 0.9, squared=squared)
    assert_exact(states[0], [5.0, 9.25], "torch")


def test_oasis_update_in_place_with_negative_values():
    # 0.5*(-4) + 0.5*1 = -1.5 ; 0.5*0.25 + 0.5*(-9) = -4.375
    states = tensors([-4.0, 0.25])
    RULES["oasis"].update_(states, tensors([1.0, -9.0]), 0.5)
    assert_exact(states[0], [-1.5, -4.375], "torch")


def test_identity_update_in_place_keeps_state():
    states = tensors([4.0, 0.25])
    RULES["identity"].update_(states, tensors([1.0, 9.0]), 0.5)
    assert_exact(states[0], [4.0, 0.25], "torch")


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("alpha", [1e-3, 0.5, 2.0])
def test_diagonal_many_equals_pure_diagonal(name, alpha):
    # every rule, several clips: bit for bit the pure diagonal (NaN where sqrt meets -2.5, in both),
    # and the inputs stay as they were
    values = {"w": [[4.0, 0.25], [1e-8, 9.0]], "b": [0.0, -2.5], "s": 0.09}
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
    expected = RULES[name].diagonal(state, alpha)
    got = RULES[name].diagonal_many(list(state.values()), alpha)
    for key, value in zip(state, got, strict=True):
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(state[key], torch.tensor(values[key], dtype=torch.float32))


def test_diagonal_many_by_hand():
    # rmsprop: sqrt([4, 0.25, 1e-8]) = [2, 0.5, 1e-4] -> clip at 1e-3 -> [2, 0.5, 1e-3]; oasis: |[-4, 0.25]| = [4, 0.25]
    (diag,) = RULES["rmsprop"].diagonal_many(tensors([4.0, 0.25, 1e-8]), 1e-3)
    assert_near(diag, [2.0, 0.5, 1e-3], "torch")
    (diag,) = RULES["oasis"].diagonal_many(tensors([-4.0, 0.25]), 1e-3)
    assert_exact(diag, [4.0, 0.25], "torch")


@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "oasis"])
def test_update_in_place_equals_pure_update_over_many_steps(name):
    # 20 updates with random statistics: the in-place state follows the pure one to float32 rounding
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]
    pure = {f"k{i}": torch.rand(s, generator=gen) for i, s in enumerate(shapes)}
    in_place = [v.clone() for v in pure.values()]
    for _ in range(20):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        squared = name != "oasis"
        statistic = [g * g for g in grads] if squared else grads
        pure = RULES[name].update(pure, dict(zip(pure, statistic, strict=True)), 0.9)
        RULES[name].update_(in_place, grads, 0.9, squared=squared)
    for got, expected in zip(in_place, pure.values(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(RULES))
def test_in_place_variants_accept_empty_lists(name):
    # a model without trainable parameters: nothing to update, no diagonal
    RULES[name].update_([], [], 0.9, squared=True)
    assert RULES[name].diagonal_many([], 1e-3) == []
