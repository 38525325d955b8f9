"""Scaled local SGD on one client, usable without Flower.

``train_scaled(model, loader, settings, state)`` runs ``local_epochs`` epochs
of ``x <- x - lr * g / D̂`` over ``loader`` and returns what the client sends
back: in ``global`` mode the round-mean of the per-step statistic (D̂ stays
fixed for the whole round), in ``local`` mode the client's own state, updated
at every step. See ``shared/design/algorithm.md`` for the exact algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# MODES is defined with the rules (their default step size is per mode), and hutchinson_diagonal
# with the statistics; both stay importable from here (hutchinson_diagonal is only re-exported).
from flwr_scaling.core.devices import model_device
from flwr_scaling.core.rules import MODES, STAT_HUTCHINSON, ScalingRule, diagonal_bounds, get_rule
from flwr_scaling.core.optimizer import Preconditioner, ScaledSGD
from flwr_scaling.core.statistics import hutchinson_diagonal, rule_statistic

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """How one client trains in one round.

    Parameters
    ----------
    rule : str (default: "adam")
        Scaling rule name (see ``flwr_scaling.core.rules.RULES``).
    mode : str (default: "global")
        ``"global"``: D̂ fixed for the round, the statistic is accumulated;
        ``"local"``: the state is updated and D̂ recomputed before every step.
    lr : float (default: 0.01)
        Client step size γ.
    alpha : float (default: 1e-3)
        Lower clip of the diagonal, ``D̂ = max(alpha, D(v))``.
    beta : float (default: 0.99)
        Moving-average factor of the state (rmsprop, adam, oasis; local mode).
    local_epochs : int (default: 1)
        Passes over the client's data.
    adam_beta1 : float (default: 0.9)
        First-moment factor of ``adam``; the moment restarts at 0 every round.
    momentum : float (default: 0.0)
        Heavy-ball momentum on ``g / D̂`` (the paper has none).
    num_probes : int (default: 1)
        Hutchinson probes per step for ``oasis``.
    proximal_mu : float (default: 0.0)
        FedProx's μ: the client minimises ``f(x) + μ/2·‖x − x_round‖²``, x_round
        being the model the round started from; its gradient ``μ(x − x_round)``
        is added to ``g`` before scaling. 0 leaves training unchanged.
    """

    rule: str = "adam"
    mode: str = "global"
    lr: float = 0.01
    alpha: float = 1e-3
    beta: float = 0.99
    local_epochs: int = 1
    adam_beta1: float = 0.9
    momentum: float = 0.0
    num_probes: int = 1
    proximal_mu: float = 0.0


@dataclass
class TrainResult:
    """What one client's round produced."""

    statistic: Tensors | None  # global mode: mean per-step statistic
    state: Tensors | None  # local mode: the client's final state
    num_steps: int
    num_examples: int
    train_loss: float  # mean minibatch loss over the round
    precond_min: float  # min D̂ used (last one in local mode)
    precond_max: float


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that are scaled, keyed like ``model.state_dict()``."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _each_batch(loader, epochs: int, device: torch.device):
    """``(x, y, first_epoch)`` for every batch of every local epoch, on ``device`` (the model's).

    Loaders yield CPU tensors; ``to`` returns them as they are when the model is on the CPU.
    """
    for epoch in range(epochs):
        for x, y in loader:
            yield x.to(device), y.to(device), epoch == 0


def _loss_and_gradients(
    model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    # A parameter the forward pass does not use has gradient zero, not None.
    return loss, tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True))


def compute_statistic(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    rule_name: str,
    max_batches: int,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensors, int]:
    """The rule's statistic at the current model, averaged over up to ``max_batches`` batches.

    This is the warm-up: no training, the model is not changed. Returns the
    statistic keyed like the trainable parameters and the number of batches used.
    """
    rule = get_rule(rule_name)
    named = trainable_parameters(model)
    params = list(named.values())
    sums = [torch.zeros_like(p) for p in params]
    batches = 0
    device = model_device(model)
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        _, grads = _loss_and_gradients(model, params, x, y, create_graph=rule.statistic == STAT_HUTCHINSON)
        for acc, value in zip(sums, rule_statistic(rule, params, grads, num_probes, generator), strict=True):
            acc.add_(value)
        batches += 1
        if batches >= max_batches:
            break
    if batches == 0:
        raise ValueError("the data loader yielded no batch: the client has no data")
    return {name: acc / batches for name, acc in zip(named, sums, strict=True)}, batches


@dataclass
class _RoundOutcome:
    """What one pass of local training leaves behind, whichever loop ran it."""

    steps: int = 0
    loss_sum: float = 0.0
    num_examples: int = 0
    diag: list[torch.Tensor] | None = None  # the last D̂ used
    # What the client replies, keyed by name: the round-mean statistic (global mode) or its final state (local).
    statistic: Tensors | None = None


def train_scaled(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    state: Tensors | None = None,
    generator: torch.Generator | None = None,
    *,
    fused: bool = True,
) -> TrainResult:
    """Run one round of scaled local SGD in place on ``model``.

    Parameters
    ----------
    model : nn.Module
        Starts at the round's global model; trained in place.
    loader : iterable of (x, y)
        Re-iterable once per epoch (a DataLoader, or data.batches.SeededBatches).
    settings : TrainSettings
        Rule, mode and step sizes.
    state : dict of tensors, optional
        The preconditioner state v_p from the server, keyed like the trainable
        parameters. ``None`` means v = 1 (``precond-init = "ones"``). It is
        never modified.
    generator : torch.Generator, optional
        Source of the Hutchinson probes (seed it for reproducible runs).
    fused : bool (default: True)
        ``True``: a plain loop over ``ScaledSGD`` (``core.optimizer``), the
        optimizer a user's own client steps with, whose in-place
        ``torch._foreach_*`` kernels keep a scaled step close to a plain SGD
        step. ``False``: the reference loop through the rule's pure
        ``update``/``diagonal`` functions, tensor by tensor, written
        independently of ``ScaledSGD`` to test it against. Both give the same
        parameters up to float rounding.

    Raises
    ------
    ValueError
        An unknown rule or mode, a state lacking a parameter, a model without
        trainable parameters, or a loader without batches.
    """
    rule = get_rule(settings.rule)
    if settings.mode not in MODES:
        raise ValueError(f"unknown precond-mode {settings.mode!r}; choose one of {', '.join(MODES)}")
    named = trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters: there is nothing to train")
    names, params = list(named), list(named.values())

    current: Tensors | None = None
    if rule.has_state:
        current = dict(state) if state is not None else rule.init({n: p.detach() for n, p in named.items()})
        missing = set(names) - set(current)
        if missing:
            raise ValueError(f"the preconditioner state lacks parameters {sorted(missing)}")
        # The state arrives on the CPU (from the wire); it is used where the parameters live.
        current = {n: current[n].to(device=named[n].device, dtype=named[n].dtype) for n in names}
    if fused:
        outcome = _optimizer_round(model, loader, settings, names, params, current, generator)
    else:
        outcome = _reference_round(model, loader, settings, rule, names, params, current, generator)
    if outcome.steps == 0:
        raise ValueError("the data loader yielded no batch: the client has no data")

    diag, replied, steps = outcome.diag, outcome.statistic, outcome.steps
    low, high = diagonal_bounds(dict(zip(names, diag, strict=True))) if diag is not None else (1.0, 1.0)
    local = settings.mode == "local"
    return TrainResult(
        statistic=None if local else replied,
        state=replied if local else None,
        num_steps=steps,
        num_examples=outcome.num_examples,
        train_loss=outcome.loss_sum / steps,
        precond_min=low,
        precond_max=high,
    )


def _optimizer_round(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    names: list[str],
    params: list[torch.Tensor],
    current: Tensors | None,
    generator: torch.Generator | None,
) -> _RoundOutcome:
    """The round as a user's loop writes it: ``ScaledSGD`` stepping on each batch's loss."""
    precond = Preconditioner(
        settings.rule, settings.mode, alpha=settings.alpha, beta=settings.beta, adam_beta1=settings.adam_beta1,
        momentum=settings.momentum, num_probes=settings.num_probes, state=current,
    )
    optimizer = ScaledSGD(
        params, settings.lr, precond, names=names, generator=generator, proximal_mu=settings.proximal_mu
    )
    outcome = _RoundOutcome()
    model.train()
    for x, y, first_epoch in _each_batch(loader, settings.local_epochs, model_device(model)):
        outcome.steps += 1
        outcome.num_examples += len(y) if first_epoch else 0
        loss = F.cross_entropy(model(x), y)
        # The optimizer differentiates the loss itself: Hutchinson's probes need the gradient's graph.
        optimizer.step(loss=loss)
        outcome.loss_sum += loss.item()
    if outcome.steps:
        diag = optimizer.diagonal()
        outcome.diag = [diag[n] for n in names] if diag is not None else None
        outcome.statistic = optimizer.statistic()  # global mode: the round mean; local mode: the state v
    return outcome


def _reference_round(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    rule: ScalingRule,
    names: list[str],
    params: list[torch.Tensor],
    current: Tensors | None,
    generator: torch.Generator | None,
) -> _RoundOutcome:
    """The round through the rule's pure functions, tensor by tensor (the reference for the fused loop)."""
    diag: list[torch.Tensor] | None = None
    if current is not None:
        diag_map = rule.diagonal(current, settings.alpha)
        diag = [diag_map[n] for n in names]
    stat_sums = [torch.zeros_like(p) for p in params] if rule.has_state and settings.mode == "global" else None
    first_moment = [torch.zeros_like(p) for p in params] if rule.first_moment else None
    velocity = [torch.zeros_like(p) for p in params] if settings.momentum else None
    need_graph = rule.statistic == STAT_HUTCHINSON
    # FedProx: the round's starting model x_round (the model the server sent).
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu else None

    steps, loss_sum, num_examples = 0, 0.0, 0
    model.train()
    for x, y, first_epoch in _each_batch(loader, settings.local_epochs, model_device(model)):
        steps += 1
        num_examples += len(y) if first_epoch else 0
        loss, grads = _loss_and_gradients(model, params, x, y, create_graph=need_graph)
        loss_sum += float(loss.detach())
        if rule.has_state:
            stat = rule_statistic(rule, params, grads, settings.num_probes, generator)
            if stat_sums is not None:
                for acc, value in zip(stat_sums, stat, strict=True):
                    acc.add_(value)
            else:  # local scaling: absorb this step's statistic, then recompute D̂
                current = rule.update(current, dict(zip(names, stat, strict=True)), settings.beta)
                diag_map = rule.diagonal(current, settings.alpha)
                diag = [diag_map[n] for n in names]
        with torch.no_grad():
            for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
                direction = grad.detach()
                if anchor is not None:
                    direction = direction + settings.proximal_mu * (param - anchor[i])
                if first_moment is not None:
                    first_moment[i].mul_(settings.adam_beta1).add_(direction, alpha=1 - settings.adam_beta1)
                    direction = first_moment[i] / (1 - settings.adam_beta1**steps)
                if diag is not None:
                    direction = direction / diag[i]
                if velocity is not None:
                    velocity[i].mul_(settings.momentum).add_(direction)
                    direction = velocity[i]
                param.sub_(direction, alpha=settings.lr)
    replied = None
    if stat_sums is not None and steps:
        replied = {n: acc / steps for n, acc in zip(names, stat_sums, strict=True)}
    elif rule.has_state and settings.mode == "local":
        replied = {n: current[n] for n in names}
    return _RoundOutcome(steps, loss_sum, num_examples, diag, replied)


def train_local_adam(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
) -> TrainResult:
    """The Local Adam baseline: ``torch.optim.Adam`` (lr = ``settings.lr``, default
    betas and eps) from a fresh state, for ``local_epochs`` epochs, in place on ``model``.

    Nothing but the model leaves the client (no preconditioner exchange).
    """
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    steps, loss_sum, num_examples = 0, 0.0, 0
    model.train()
    for x, y, first_epoch in _each_batch(loader, settings.local_epochs, model_device(model)):
        steps += 1
        num_examples += len(y) if first_epoch else 0
        loss, grads = _loss_and_gradients(model, params, x, y, create_graph=False)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.detach()
        optimizer.step()
        loss_sum += float(loss.detach())
    optimizer.zero_grad(set_to_none=True)  # the model object is reused next round
    if steps == 0:
        raise ValueError("the data loader yielded no batch: the client has no data")
    return TrainResult(
        statistic=None, state=None, num_steps=steps, num_examples=num_examples,
        train_loss=loss_sum / steps, precond_min=1.0, precond_max=1.0,
    )


@torch.no_grad()
def evaluate(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on a whole split, on the model's device
    (``features`` and ``labels`` may be on the CPU: each batch is moved)."""
    model.eval()
    device = model_device(model)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(features[start : start + batch_size].to(device))
        target = labels[start : start + batch_size].to(device)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / len(labels), correct / len(labels)
