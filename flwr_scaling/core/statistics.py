"""The per-step statistics the scaling rules consume: ``g ⊙ g`` and Hutchinson's Hessian-diagonal estimate.

Pure torch, no Flower: the client's training loop (``local_sgd``) and the
torch optimizer (``optimizer``) both draw their statistics from here, so that
the probes, and thus a seeded run's numbers, are the same in both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from flwr_scaling.core.rules import STAT_GRAD_SQUARED, STAT_HUTCHINSON, ScalingRule


def _drawn_on(generator: torch.Generator | None) -> torch.device:
    """Where probes are drawn: the generator's device (the CPU for the package's seeded streams), so that
    a run draws the same probes whichever device it trains on; they are then moved to the parameters'."""
    return generator.device if generator is not None else torch.device("cpu")


def _rademacher(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8, device=_drawn_on(generator))
    return bits.to(device=like.device, dtype=like.dtype) * 2 - 1


def _rademacher_many(likes: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
    """One Rademacher (±1) probe shaped like each tensor.

    When all tensors share a dtype the probes are drawn in one call and split:
    the CPU generator fills elements in order, so these are the very numbers
    that one draw per tensor gives, for a third of the kernel launches.
    """
    dtype = likes[0].dtype
    if any(t.dtype != dtype for t in likes):
        return [_rademacher(t, generator) for t in likes]
    sizes = [t.numel() for t in likes]
    flat = torch.randint(0, 2, (sum(sizes),), generator=generator, dtype=dtype, device=_drawn_on(generator))
    flat = flat.to(likes[0].device)  # the same tensor when the parameters are on the CPU
    flat.mul_(2).sub_(1)
    return [chunk.view(t.shape) for chunk, t in zip(flat.split(sizes), likes, strict=True)]


def hutchinson_diagonal(
    gradients: Iterable[torch.Tensor],
    parameters: Iterable[torch.Tensor],
    num_probes: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Mean over probes of ``z ⊙ (∇²f z)``, z Rademacher: an unbiased Hessian-diagonal estimate.

    ``gradients`` must come from ``torch.autograd.grad(..., create_graph=True)``;
    each probe costs one Hessian-vector product (a second backward pass).
    """
    gradients, parameters = list(gradients), list(parameters)
    if not gradients:
        return []
    # A gradient outside the graph (an unused parameter) has a zero Hessian block.
    live = [i for i, g in enumerate(gradients) if g.requires_grad]
    total: list[torch.Tensor] = []
    for probe in range(num_probes):
        probes = _rademacher_many(gradients, generator)
        products = torch.autograd.grad(
            [gradients[i] for i in live],
            parameters,
            grad_outputs=[probes[i] for i in live],
            retain_graph=probe < num_probes - 1,
            allow_unused=True,
        )
        # hz is None where the gradient does not depend on the parameter: a zero block.
        estimate = [
            torch.zeros_like(p) if hz is None else z * hz.detach()
            for p, z, hz in zip(parameters, probes, products, strict=True)
        ]
        if probe == 0:
            total = estimate
        else:
            torch._foreach_add_(total, estimate)
    if num_probes > 1:
        torch._foreach_div_(total, num_probes)
    return total


def rule_statistic(
    rule: ScalingRule,
    params: list[torch.Tensor],
    grads: tuple[torch.Tensor, ...],
    num_probes: int,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """The statistic ``rule`` consumes at one step, from the step's gradients (``g ⊙ g`` or Hutchinson's).

    For ``hutchinson`` the gradients must come from ``torch.autograd.grad(..., create_graph=True)``.
    """
    if rule.statistic == STAT_GRAD_SQUARED:
        return [g.detach() * g.detach() for g in grads]
    if rule.statistic == STAT_HUTCHINSON:
        return hutchinson_diagonal(grads, params, num_probes, generator)
    raise ValueError(f"rule {rule.name!r} has no statistic")
