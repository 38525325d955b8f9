"""What a local adam-scaled step must cost beyond an SGD step: ScaledSGD against hand-written loops.

What is measured
----------------
µs per training step (forward, cross-entropy, backward, update) on one batch of
32 random examples, one torch thread, for a9a's logistic regression
(``build_model("logreg", (123,), 2)``, 248 parameters) or the digits CNN:

* ``scaled-sgd``: ``ScaledSGD`` with rule identity (the FedAvg client of this package);
* ``scaled-adam-local``: ``ScaledSGD`` with rule adam in local mode (SAVIC adam-local's client);
* ``torch-adam``: ``torch.optim.Adam(foreach=True)`` (local Adam);
* ``floor-sgd`` / ``floor-adam-local``: the same updates written out as bare
  ``torch._foreach_*`` calls with no optimizer class around them: SGD is one
  kernel (``x -= lr g``); adam-local is six (v ← β v + (1 − β) g², D̂ = max(α, √v),
  m ← lerp(m, g), x -= lr m / D̂ with the bias correction in the scalar);
* ``floor-adam-local-numpy``: the same update in NumPy on views of the
  tensors (not bit-identical to the torch kernels, see its class).

The floor ratio is what any implementation of the rule pays in eager PyTorch
when every kernel launch costs about as much as the arithmetic (a model this
small); ScaledSGD's own ratio is compared with it. Each timing starts from the
same initial weights and a fresh optimizer, and cycles through 64 random
batches; after 200 warm-up steps, the best of 5 timings of ``--steps`` steps
is kept (best, not mean: on a shared machine the minimum is the least
disturbed figure).

Run (from the repository root)::

    .venv/bin/python benchmarks/step_floor.py                  # a9a logreg
    .venv/bin/python benchmarks/step_floor.py --model cnn      # digits CNN
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from flwr_scaling.core.models import build_model
from flwr_scaling.core.optimizer import Preconditioner, ScaledSGD

SHAPES = {"logreg": ((123,), 2), "cnn": ((1, 8, 8), 10)}


class FloorSGD:
    """``x -= lr g``: one foreach kernel, no optimizer machinery."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.1) -> None:
        self.params, self.lr = list(model.parameters()), lr

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_add_(self.params, [p.grad for p in self.params], alpha=-self.lr)


class FloorAdamLocal(FloorSGD):
    """Adam-local scaling written out: six foreach kernels per step."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.01, beta: float = 0.99, beta1: float = 0.9,
                 alpha: float = 1e-3) -> None:
        super().__init__(model, lr)
        self.state = [torch.zeros_like(p) for p in self.params]
        self.moment = [torch.zeros_like(p) for p in self.params]
        self.beta, self.beta1, self.alpha, self.steps = beta, beta1, alpha, 0

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        self.steps += 1
        torch._foreach_mul_(self.state, self.beta)
        torch._foreach_addcmul_(self.state, grads, grads, value=1.0 - self.beta)
        diagonal = torch._foreach_sqrt(self.state)
        torch._foreach_clamp_min_(diagonal, self.alpha)
        torch._foreach_lerp_(self.moment, grads, 1.0 - self.beta1)
        torch._foreach_addcdiv_(self.params, self.moment, diagonal, value=-self.lr / (1.0 - self.beta1**self.steps))


class NumpyAdamLocal(FloorSGD):
    """The same six steps in NumPy on views of the tensors (``p.detach().numpy()``), one ufunc call each per
    tensor: a NumPy call on 246 floats costs less than a torch kernel launch. Not bit-identical to the
    torch kernels (they fuse multiply-adds: about half the steps differ in the last bit), and it bypasses
    autograd's version counters; measured here to size what leaving torch for the update would buy."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.01, beta: float = 0.99, beta1: float = 0.9,
                 alpha: float = 1e-3) -> None:
        super().__init__(model, lr)
        self.arrays = [p.detach().numpy() for p in self.params]
        self.state = [np.zeros_like(a) for a in self.arrays]
        self.moment = [np.zeros_like(a) for a in self.arrays]
        self.diagonal = [np.empty_like(a) for a in self.arrays]
        self.scratch = [np.empty_like(a) for a in self.arrays]
        self.beta, self.beta1, self.alpha, self.steps = np.float32(beta), beta1, np.float32(alpha), 0
        self.keep, self.mix = np.float32(1.0 - beta), np.float32(1.0 - beta1)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        scale = np.float32(-self.lr / (1.0 - self.beta1**self.steps))
        for param, x, v, m, d, t in zip(self.params, self.arrays, self.state, self.moment, self.diagonal,
                                        self.scratch):
            g = param.grad.numpy()
            np.multiply(v, self.beta, out=v)
            np.multiply(g, g, out=t)
            np.multiply(t, self.keep, out=t)
            np.add(v, t, out=v)
            np.sqrt(v, out=d)
            np.maximum(d, self.alpha, out=d)
            np.subtract(g, m, out=t)
            np.multiply(t, self.mix, out=t)
            np.add(m, t, out=m)
            np.divide(m, d, out=t)
            np.multiply(t, scale, out=t)
            np.add(x, t, out=x)


VARIANTS = {
    "scaled-sgd": lambda m: ScaledSGD(m.named_parameters(), 0.1, Preconditioner(rule="identity")),
    "scaled-adam-local": lambda m: ScaledSGD(m.named_parameters(), 0.01, Preconditioner(rule="adam", mode="local")),
    "torch-adam": lambda m: torch.optim.Adam(m.parameters(), 0.01, foreach=True),
    "floor-sgd": FloorSGD,
    "floor-adam-local": FloorAdamLocal,
    "floor-adam-local-numpy": NumpyAdamLocal,
}


def microseconds_per_step(model_name: str, make, steps: int) -> float:
    input_shape, classes = SHAPES[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, input_shape, classes)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    # 64 different batches, cycled: one batch repeated would be fitted exactly, and the tiny gradients
    # (denormal numbers) would make the later steps slow for reasons that are not the optimizer's.
    batches = [(torch.randn(32, *input_shape), torch.randint(0, classes, (32,))) for _ in range(64)]
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(count: int) -> float:
        model.load_state_dict(initial)  # every timing starts from the same weights and a fresh optimizer
        optimizer = make(model)
        start = time.perf_counter()
        for step in range(count):
            features, labels = batches[step % len(batches)]
            optimizer.zero_grad()
            loss_fn(model(features), labels).backward()
            optimizer.step()
        return time.perf_counter() - start

    run(200)
    return min(run(steps) / steps for _ in range(5)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(SHAPES), default="logreg")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = {name: microseconds_per_step(args.model, make, args.steps) for name, make in VARIANTS.items()}
    print(f"{args.model}, batch 32, one thread, best of 5 x {args.steps} steps")
    print("| variant | µs / step | x its SGD |")
    print("|---|---:|---:|")
    for name, micros in times.items():
        sgd = times["floor-sgd"] if name.startswith("floor") else times["scaled-sgd"]
        print(f"| {name} | {micros:.1f} | {micros / sgd:.2f} |")


if __name__ == "__main__":
    main()
