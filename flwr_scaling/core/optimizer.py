"""``ScaledSGD``: one client's round of scaled Local SGD as a ``torch.optim.Optimizer``.

A Flower user's client is their own loop around a torch optimizer; this one
drops in for ``torch.optim.SGD`` and steps ``x <- x - lr * g / D̂`` with
``D̂ = max(alpha, D(v))`` (see ``shared/design/algorithm.md``). Its life is
one round: build it from the round's ``Preconditioner`` after loading the
global model, take the round's steps, then reply ``optimizer.statistic()``.

- ``global`` mode: D̂ is fixed at construction; every step adds its statistic
  to a round sum, and ``statistic()`` is the round mean.
- ``local`` mode: every step absorbs its statistic into the optimizer's own
  copy of v and recomputes D̂ before stepping; ``statistic()`` is that v.
- ``adam`` steps with the bias-corrected first moment ``m / (1 - beta1^t)``,
  m starting at 0 with the optimizer (so at every round).

How the gradient reaches ``step``:

- ``loss.backward(); optimizer.step()`` as with any torch optimizer (it reads
  ``p.grad``; a parameter without a gradient counts as gradient 0);
- ``optimizer.step(loss=loss)``: the optimizer differentiates ``loss`` itself
  (no ``backward`` call, ``p.grad`` untouched). **This is the way for
  ``oasis``**, whose Hutchinson statistic ``z ⊙ (∇²f z)`` needs a
  Hessian-vector product: the optimizer then builds the gradient with
  ``create_graph=True`` and runs ``num_probes`` double-backward passes on it.
  ``loss.backward(create_graph=True); optimizer.step()`` works too, but torch
  warns that it ties parameters and gradients in a reference cycle; the
  optimizer detaches ``p.grad`` after such a step to break it;
- ``optimizer.step(closure)``: torch's convention, the closure zeroes the
  gradients, calls ``backward`` (``create_graph=True`` for ``oasis``) and
  returns the loss.

``flwr_scaling.core.local_sgd.train_scaled`` is a loop over this optimizer
(the package's clients train with it); its reference loop (``fused=False``),
written through the rules' pure functions, is the independent check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flwr_scaling.core.rules import MODES, STAT_GRAD_SQUARED, STAT_HUTCHINSON, ScalingRule, diagonal_bounds, get_rule
from flwr_scaling.core.statistics import hutchinson_diagonal

Tensors = dict[str, torch.Tensor]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    # A copy: arrays decoded from the wire are read-only views of the received bytes.
    return torch.from_numpy(np.array(value))


def _unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"Preconditioner: {name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class Preconditioner:
    """The round's scaling: a rule, how it is applied, and the state v it starts from.

    Parameters
    ----------
    rule : str (default: "identity")
        Scaling rule name (``flwr_scaling.core.rules.RULES``); ``identity`` is plain SGD.
    mode : str (default: "global")
        ``"global"``: D̂ fixed for the round, the statistic accumulated;
        ``"local"``: v updated and D̂ recomputed before every step.
    alpha : float, optional
        Lower clip of the diagonal, ``D̂ = max(alpha, D(v))``; the rule's
        ``default_alpha`` when not given.
    beta : float (default: 0.99)
        Moving-average factor of the state (rmsprop, adam, oasis; local mode).
    adam_beta1 : float (default: 0.9)
        First-moment factor of the rules that step with a first moment (adam).
    momentum : float (default: 0.0)
        Heavy-ball momentum on ``g / D̂`` (the paper has none).
    num_probes : int (default: 1)
        Hutchinson probes per step (oasis).
    state : mapping of str to tensor or array, optional
        The state v_p keyed like the trainable parameters; ``None`` means the
        rule's starting state (v = 1). Converted to torch tensors; never modified.
    """

    rule: str = "identity"
    mode: str = "global"
    alpha: float | None = None
    beta: float = 0.99
    adam_beta1: float = 0.9
    momentum: float = 0.0
    num_probes: int = 1
    state: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        rule = get_rule(self.rule)  # ValueError naming the known rules
        if self.mode not in MODES:
            raise ValueError(f"Preconditioner: unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        alpha = self.alpha if self.alpha is not None else rule.default_alpha
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"Preconditioner: alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        _unit_interval("beta", self.beta)
        _unit_interval("adam_beta1", self.adam_beta1)
        _unit_interval("momentum", self.momentum)
        if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"Preconditioner: num_probes must be an integer >= 1, got {self.num_probes!r}")
        if self.state is not None:
            object.__setattr__(self, "state", {str(k): _as_tensor(v) for k, v in self.state.items()})


class ScaledSGD(torch.optim.Optimizer):
    """Scaled SGD for one round, in place of ``torch.optim.SGD`` (see the module docstring).

    Parameters
    ----------
    params : iterable of tensors or of (name, tensor) pairs
        One parameter group. ``model.named_parameters()`` names them, and the
        names key ``statistic()``. Unnamed parameters take ``names``, or else
        the state's keys in order (the order of ``model.named_parameters()``,
        which is the order the state travels in).
    lr : float
        Step size γ (``param_groups[0]["lr"]``, so learning-rate schedulers work).
    precond : Preconditioner, optional
        The round's scaling; ``None`` is ``Preconditioner()``, plain SGD.
    names : sequence of str, optional
        Names of unnamed ``params``, in order.
    generator : torch.Generator, optional
        Source of the Hutchinson probes (seed it for reproducible runs).
    proximal_mu : float (default: 0.0)
        FedProx's μ: ``μ (x - x_round)`` is added to the gradient before
        scaling (not to the statistic), x_round being the parameters at
        construction.

    Raises
    ------
    ValueError
        For a bad ``lr``, several parameter groups, missing names, or a state
        whose keys or shapes differ from the parameters'.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        precond: Preconditioner | None = None,
        *,
        names: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        proximal_mu: float = 0.0,
    ) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"ScaledSGD: lr must be a finite number > 0, got {lr!r}")
        if not (isinstance(proximal_mu, (int, float)) and math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"ScaledSGD: proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
        precond = precond if precond is not None else Preconditioner()
        if not isinstance(precond, Preconditioner):
            raise TypeError(f"ScaledSGD: precond must be a Preconditioner, got {type(precond).__name__}")
        super().__init__(params, {"lr": float(lr)})
        if len(self.param_groups) != 1:
            raise ValueError(f"ScaledSGD takes one parameter group, got {len(self.param_groups)}")
        self.precond = precond
        self.rule: ScalingRule = get_rule(precond.rule)
        self.generator = generator
        self.proximal_mu = float(proximal_mu)
        self._params: list[torch.Tensor] = list(self.param_groups[0]["params"])
        self.names = self._parameter_names(names)
        self._init_state()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the statistic and D̂ cover the constructor's parameters."""
        if getattr(self, "_params", None) is not None:
            raise ValueError("ScaledSGD takes one parameter group: pass all parameters to the constructor")
        super().add_param_group(param_group)

    def _parameter_names(self, names: Iterable[str] | None) -> list[str]:
        """The names that key the statistic: ``named_parameters()``'s, ``names``, or the state's keys in order."""
        state, count = self.precond.state, len(self._params)
        chosen = self.param_groups[0].get("param_names") or (list(names) if names is not None else None)
        if chosen is None and self.rule.has_state:
            if state is None:
                raise ValueError(
                    f"ScaledSGD: rule {self.rule.name!r} replies a statistic keyed by parameter name: "
                    "pass model.named_parameters() (or names=[...])"
                )
            if len(state) != count:
                arrays = "array" if len(state) == 1 else "arrays"
                raise ValueError(f"the preconditioner state has {len(state)} {arrays} for {count} parameters")
            chosen = list(state)
        chosen = [str(name) for name in chosen] if chosen is not None else [str(i) for i in range(count)]
        if len(chosen) != count:
            raise ValueError(f"ScaledSGD: {len(chosen)} names for {count} parameters")
        if len(set(chosen)) != count:
            raise ValueError("ScaledSGD: parameter names must be unique")
        return chosen

    def _starting_state(self) -> list[torch.Tensor]:
        """v_p as one tensor per parameter, checked, in each parameter's dtype and device."""
        state = self.precond.state
        if state is None:
            state = self.rule.init({n: p.detach() for n, p in zip(self.names, self._params, strict=True)})
        missing = [n for n in self.names if n not in state]
        extra = [k for k in state if k not in set(self.names)]
        if missing or extra:
            raise ValueError(
                f"the preconditioner state does not match the parameters: missing {missing}, unexpected {extra}"
            )
        values = []
        for name, param in zip(self.names, self._params, strict=True):
            value = _as_tensor(state[name])
            if value.shape != param.shape:
                raise ValueError(
                    f"the preconditioner state of {name!r} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
            values.append(value.detach().to(device=param.device, dtype=param.dtype))
        return values

    def _init_state(self) -> None:
        start = self._starting_state() if self.rule.has_state else None
        diag = self._diagonal(start) if start is not None else None
        local = self.precond.mode == "local"
        for index, param in enumerate(self._params):
            entry: dict[str, Any] = {"step": 0}
            if diag is not None:
                entry["diag"] = diag[index]
                if local:  # the optimizer's own copy of v, updated in place
                    entry["v"] = start[index].clone()
                else:
                    entry["stat_sum"] = torch.zeros_like(param)
            if self.rule.first_moment:
                entry["m"] = torch.zeros_like(param)
            if self.precond.momentum:
                entry["velocity"] = torch.zeros_like(param)
            if self.proximal_mu:
                entry["anchor"] = param.detach().clone()
            self.state[param] = entry

    def _column(self, key: str) -> list[torch.Tensor] | None:
        """``self.state[p][key]`` for every parameter (read each time: ``load_state_dict`` replaces them)."""
        if key not in self.state[self._params[0]]:
            return None
        return [self.state[p][key] for p in self._params]

    def _diagonal(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        alpha = self.precond.alpha
        if self.rule.has_in_place:
            return self.rule.diagonal_many(states, alpha)
        by_name = self.rule.diagonal(dict(zip(self.names, states, strict=True)), alpha)
        return [by_name[n] for n in self.names]

    @property
    def num_steps(self) -> int:
        """Steps taken so far."""
        return int(self.state[self._params[0]]["step"])

    def _gradients(self, loss: torch.Tensor | None) -> list[torch.Tensor]:
        needs_graph = self.rule.statistic == STAT_HUTCHINSON
        if loss is not None:
            grads = torch.autograd.grad(loss, self._params, create_graph=needs_graph, allow_unused=True)
        else:
            if any(p.grad is not None and p.grad.is_sparse for p in self._params):
                raise ValueError("ScaledSGD does not support sparse gradients")
            grads = [p.grad for p in self._params]
            if needs_graph and not any(g is not None and g.requires_grad for g in grads):
                raise ValueError(
                    f"rule {self.rule.name!r} needs a Hessian-vector product at every step: call "
                    "optimizer.step(loss=loss) (the optimizer differentiates the loss itself), "
                    "or loss.backward(create_graph=True) before optimizer.step()"
                )
        # A parameter the loss does not use has gradient zero, not None (as in train_scaled).
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self._params, grads, strict=True)]

    def step(self, closure: Any = None, *, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """One scaled step; returns the loss (the closure's, or ``loss``), if any.

        Parameters
        ----------
        closure : callable, optional
            torch's convention: re-evaluates the model, calls ``backward`` and returns the loss.
        loss : tensor, optional
            A scalar loss to differentiate here instead of reading ``p.grad``
            (needed for ``oasis`` unless ``backward(create_graph=True)`` ran).
        """
        if closure is not None and loss is not None:
            raise ValueError("ScaledSGD.step: pass a closure or a loss, not both")
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
        grads = self._gradients(loss)
        statistic = None
        if self.rule.has_state:  # Hutchinson probes need autograd, so they come before no_grad
            with torch.enable_grad():
                statistic = self._step_statistic(grads)
        with torch.no_grad():
            step = self.num_steps + 1
            for param in self._params:
                self.state[param]["step"] = step
            if statistic is not None:
                self._absorb(grads, statistic)
            self._move(grads, step)
        if loss is None and self.rule.statistic == STAT_HUTCHINSON:
            for param in self._params:  # break the parameter <-> graph cycle of backward(create_graph=True)
                if param.grad is not None and param.grad.requires_grad:
                    param.grad = param.grad.detach()
        return loss if closure is None else returned

    def _step_statistic(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """This step's statistic; for squared-gradient rules with in-place kernels, the gradients themselves."""
        if self.rule.statistic == STAT_GRAD_SQUARED:
            return grads if self.rule.has_in_place else [g.detach() * g.detach() for g in grads]
        if self.rule.statistic == STAT_HUTCHINSON:
            return hutchinson_diagonal(grads, self._params, self.precond.num_probes, self.generator)
        raise ValueError(f"rule {self.rule.name!r} has no statistic this optimizer knows how to compute")

    def _absorb(self, grads: list[torch.Tensor], statistic: list[torch.Tensor]) -> None:
        """Global mode: add the statistic to the round sum. Local mode: update v, then recompute D̂."""
        # With the in-place kernels g ⊙ g is never formed: the gradients go into addcmul kernels.
        squared = self.rule.has_in_place and self.rule.statistic == STAT_GRAD_SQUARED
        sums = self._column("stat_sum")
        if sums is not None:
            if squared:
                torch._foreach_addcmul_(sums, statistic, statistic)
            else:
                torch._foreach_add_(sums, statistic)
            return
        states = self._column("v")
        if self.rule.has_in_place:
            self.rule.update_(states, statistic, self.precond.beta, squared=squared)
        else:
            named_state, named_statistic = (dict(zip(self.names, x, strict=True)) for x in (states, statistic))
            updated = self.rule.update(named_state, named_statistic, self.precond.beta)
            for name, param in zip(self.names, self._params, strict=True):
                self.state[param]["v"] = updated[name]
            states = self._column("v")
        for param, diagonal in zip(self._params, self._diagonal(states), strict=True):
            self.state[param]["diag"] = diagonal

    def _move(self, grads: list[torch.Tensor], step: int) -> None:
        """``x <- x - lr u``, ``u = scale * direction / D̂`` or its heavy-ball velocity."""
        params, lr = self._params, self.param_groups[0]["lr"]
        direction, scale = grads, 1.0
        anchor = self._column("anchor")
        if anchor is not None:  # FedProx gradient g + mu (x - x_round)
            direction = torch._foreach_add(grads, torch._foreach_sub(params, anchor), alpha=self.proximal_mu)
        moment = self._column("m")
        if moment is not None:
            beta1 = self.precond.adam_beta1
            # m <- beta1 m + (1 - beta1) g; the bias correction 1 / (1 - beta1^t) goes into the step's scalar.
            torch._foreach_lerp_(moment, direction, 1.0 - beta1)
            direction, scale = moment, 1.0 / (1.0 - beta1**step)
        diag, velocity = self._column("diag"), self._column("velocity")
        if velocity is not None:
            torch._foreach_mul_(velocity, self.precond.momentum)
            if diag is None:
                torch._foreach_add_(velocity, direction, alpha=scale)
            else:
                torch._foreach_addcdiv_(velocity, direction, diag, value=scale)
            torch._foreach_add_(params, velocity, alpha=-lr)
        elif diag is None:
            torch._foreach_add_(params, direction, alpha=-lr * scale)
        else:
            torch._foreach_addcdiv_(params, direction, diag, value=-lr * scale)

    def statistic(self) -> Tensors | None:
        """What the client replies, keyed by parameter name: the round-mean statistic
        (global mode) or the optimizer's state v (local mode); ``None`` for a rule
        without state (identity). New tensors, on the parameters' device."""
        if not self.rule.has_state:
            return None
        steps = self.num_steps
        if steps == 0:
            raise ValueError("ScaledSGD.statistic(): no step was taken, so there is no statistic")
        sums = self._column("stat_sum")
        if sums is not None:
            return {n: acc / steps for n, acc in zip(self.names, sums, strict=True)}
        return {n: v.clone() for n, v in zip(self.names, self._column("v"), strict=True)}

    def diagonal(self) -> Tensors | None:
        """The D̂ of the last step (of the next one in global mode), keyed by name; ``None`` for identity."""
        diag = self._column("diag")
        return None if diag is None else dict(zip(self.names, diag, strict=True))

    def diagonal_bounds(self) -> tuple[float, float]:
        """``(min D̂, max D̂)`` over all parameters, the paper's empirical ``(alpha, Gamma)``; (1, 1) for identity."""
        diag = self.diagonal()
        return diagonal_bounds(diag) if diag is not None else (1.0, 1.0)
