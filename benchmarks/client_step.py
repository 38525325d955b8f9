"""Cost of one local-training step on a client: scaled steps against torch SGD and Adam.

What is measured
----------------
One step = forward + loss + backward + parameter update on one minibatch of
32 random examples, for two models:

* ``digits-cnn``: ``build_model("cnn", (1, 8, 8), 10)`` (the default problem),
* ``a9a-logreg``: ``build_model("logreg", (123,), 2)`` (a9a-sized logistic regression).

Variants (each runs over the same list of K batches, then the time is divided by K):

* ``sgd``: ``torch.optim.SGD`` (lr only), the Local SGD / FedAvg client;
* ``torch-adam``: ``torch.optim.Adam`` created fresh for the round (Local Adam);
* ``<rule>-<mode>``: ``flwr_scaling.core.local_sgd.train_scaled`` with rule adam,
  rmsprop or adagrad in global and local mode (state = a positive v from the
  "server", as in every round after the warm-up);
* ``oasis-global``: ``train_scaled`` with oasis, 1 Hutchinson probe per step
  (alpha 0.1, the package default for oasis);
* ``adam-local-pure``: ``train_scaled(..., fused=False)``, the reference loop
  through the rules' pure functions (what every variant ran before the fused
  in-place path), for comparison in the same run; it has no target.

``train_scaled`` runs its fused path by default: the state, Adam's first
moment and the parameters are updated in place with one ``torch._foreach_*``
kernel per operation for all parameter tensors (see ``ScalingRule.update_``).

The plain loops do what ``train_scaled`` does apart from the scaling:
``zero_grad``, cross-entropy, ``backward``, ``step``, and read the loss as a
float (``train_scaled`` sums the round's loss). Optimizer creation and
``train_scaled``'s per-round set-up (state conversion, D̂, returned statistic)
are inside the timed region: they are part of a client's round and are
amortised over K steps. Every timed run starts from the same initial weights
(reloaded outside the timed region), so no variant drifts into NaNs or
denormals over the repeats.

How
---
``torch.set_num_threads(1)``: the Flower simulation gives each client actor
one CPU (``client_resources = {"num_cpus": 1}``, ``OMP_NUM_THREADS=1`` in
``flwr_scaling/simulation.py``), so a client step runs on one thread; a
multi-threaded figure would not be what a client costs, and on a busy 2-core
machine threads only add noise. In each repeat all variants run once, in a
freshly shuffled order (interleaved, so that load from other processes hits
every variant alike); the table gives the median over repeats of µs per step,
and the ratios are medians over repeats of the per-repeat ratio to ``sgd`` /
``torch-adam`` measured in the same repeat (paired, robust to load changes).

Targets, printed next to the figures: every scaled step (adam, rmsprop,
adagrad, either mode) <= 1.15x SGD and never slower than torch Adam
(<= 1.00x); oasis (1 probe) <= 2.5x SGD.

Run (from the repository root)::

    .venv/bin/python benchmarks/client_step.py            # full: K=50 steps, 21 repeats
    .venv/bin/python benchmarks/client_step.py --quick    # smoke run, a few seconds
    .venv/bin/python benchmarks/client_step.py --steps 5  # ~ a digits client's round (144 examples / 32)
    .venv/bin/python benchmarks/client_step.py --profile adam-local --problem digits-cnn
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flwr_scaling.core.models import build_model
from flwr_scaling.core.local_sgd import TrainSettings, train_scaled, trainable_parameters

PROBLEMS = {
    "digits-cnn": ("cnn", (1, 8, 8), 10),
    "a9a-logreg": ("logreg", (123,), 2),
}
BATCH = 32
LR = 0.01
SCALED = [(rule, mode) for rule in ("adam", "rmsprop", "adagrad") for mode in ("global", "local")]
VARIANTS = ["sgd", "torch-adam"] + [f"{r}-{m}" for r, m in SCALED] + ["oasis-global", "adam-local-pure"]

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Runner = Callable[[nn.Module, Batches], None]


def target(variant: str) -> tuple[float | None, float | None]:
    """(max ratio to SGD, max ratio to torch Adam) this variant should meet."""
    if variant == "oasis-global":
        return 2.5, None
    if variant in ("sgd", "torch-adam", "adam-local-pure"):
        return None, None
    return 1.15, 1.0


def plain_loop(make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Runner:
    def run(model: nn.Module, batches: Batches) -> None:
        optimizer = make_optimizer(list(model.parameters()))
        model.train()
        loss_sum = 0.0
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())

    return run


def scaled_loop(settings: TrainSettings, state: dict[str, torch.Tensor], fused: bool = True) -> Runner:
    def run(model: nn.Module, batches: Batches) -> None:
        train_scaled(model, batches, settings, state, generator=torch.Generator().manual_seed(0), fused=fused)

    return run


def make_runners(model: nn.Module) -> dict[str, Runner]:
    names = list(trainable_parameters(model))
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(1)
    # A positive state of the size a warm-up gives (squared gradients ~1e-4..1e-2).
    state = {n: torch.rand(params[n].shape, generator=gen) * 1e-2 + 1e-4 for n in names}
    runners: dict[str, Runner] = {
        "sgd": plain_loop(lambda p: torch.optim.SGD(p, lr=LR)),
        "torch-adam": plain_loop(lambda p: torch.optim.Adam(p, lr=LR)),
    }
    for rule, mode in SCALED:
        runners[f"{rule}-{mode}"] = scaled_loop(TrainSettings(rule=rule, mode=mode, lr=LR, alpha=1e-3), state)
    runners["oasis-global"] = scaled_loop(
        TrainSettings(rule="oasis", mode="global", lr=LR, alpha=0.1, num_probes=1), state
    )
    runners["adam-local-pure"] = scaled_loop(TrainSettings(rule="adam", mode="local", lr=LR, alpha=1e-3), state, fused=False)
    return runners


def make_batches(input_shape: tuple[int, ...], num_classes: int, steps: int, seed: int = 0) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand((BATCH, *input_shape), generator=gen), torch.randint(0, num_classes, (BATCH,), generator=gen))
        for _ in range(steps)
    ]


def measure(problem: str, steps: int, repeats: int, seed: int) -> dict[str, list[float]]:
    """µs per step of every variant, one list entry per repeat (interleaved, shuffled order)."""
    kind, shape, classes = PROBLEMS[problem]
    torch.manual_seed(seed)
    base = build_model(kind, shape, classes)
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    models = {v: build_model(kind, shape, classes) for v in VARIANTS}
    runners = make_runners(base)
    batches = make_batches(shape, classes, steps, seed)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    rng = random.Random(seed)
    for repeat in range(repeats + 1):  # repeat 0 warms caches and allocators up, not recorded
        rng.shuffle(order)
        for variant in order:
            model = models[variant]
            model.load_state_dict(initial)
            gc.collect()
            gc.disable()
            start = time.perf_counter_ns()
            runners[variant](model, batches)
            elapsed = time.perf_counter_ns() - start
            gc.enable()
            if repeat:
                times[variant].append(elapsed / steps / 1e3)
    return times


def paired_ratio(times: dict[str, list[float]], variant: str, reference: str) -> float:
    return statistics.median(a / b for a, b in zip(times[variant], times[reference], strict=True))


def report(problem: str, times: dict[str, list[float]], steps: int) -> bool:
    """Print the table; return whether every target is met."""
    all_ok = True
    kind, shape, classes = PROBLEMS[problem]
    n_params = sum(p.numel() for p in build_model(kind, shape, classes).parameters())
    print(f"\n### {problem} ({n_params} parameters, batch {BATCH}, K = {steps} steps, "
          f"{len(times['sgd'])} repeats)\n")
    print("| variant | median µs/step | min µs/step | x SGD | x torch Adam | target | met |")
    print("|---|---:|---:|---:|---:|---|---|")
    for variant in VARIANTS:
        med, low = statistics.median(times[variant]), min(times[variant])
        r_sgd, r_adam = paired_ratio(times, variant, "sgd"), paired_ratio(times, variant, "torch-adam")
        max_sgd, max_adam = target(variant)
        parts, ok = [], True
        if max_sgd is not None:
            parts.append(f"<= {max_sgd:.2f}x SGD")
            ok &= r_sgd <= max_sgd
        if max_adam is not None:
            parts.append(f"<= {max_adam:.2f}x Adam")
            ok &= r_adam <= max_adam
        met = "" if not parts else ("yes" if ok else "**NO**")
        all_ok &= ok
        print(f"| {variant} | {med:.1f} | {low:.1f} | {r_sgd:.3f} | {r_adam:.3f} | {', '.join(parts) or '-'} | {met} |")
    return all_ok


def profile(problem: str, variant: str, steps: int) -> None:
    """cProfile of one variant over 20 runs of K steps (Python-level view of where time goes)."""
    import cProfile
    import pstats

    kind, shape, classes = PROBLEMS[problem]
    model = build_model(kind, shape, classes)
    runner = make_runners(model)[variant]
    batches = make_batches(shape, classes, steps)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    runner(model, batches)
    prof = cProfile.Profile()
    for _ in range(20):
        model.load_state_dict(initial)
        prof.enable()
        runner(model, batches)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K=10 steps, 3 repeats")
    parser.add_argument("--steps", type=int, default=None, help="K, steps per timed run (default 50)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per variant (default 21)")
    parser.add_argument("--problem", choices=list(PROBLEMS), action="append", help="default: both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a simulated client)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=VARIANTS, help="print a cProfile of this variant instead")
    args = parser.parse_args()
    steps = args.steps or (10 if args.quick else 50)
    repeats = args.repeats or (3 if args.quick else 21)
    torch.set_num_threads(args.threads)
    problems = args.problem or list(PROBLEMS)
    if args.profile:
        for problem in problems:
            print(f"== cProfile: {args.profile} on {problem}, 20 x {steps} steps")
            profile(problem, args.profile, steps)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"ratios = median over repeats of the paired per-repeat ratio")
    all_ok = True
    for problem in problems:
        all_ok &= report(problem, measure(problem, steps, repeats, args.seed), steps)
    print("\nall targets met" if all_ok else "\nsome targets NOT met (see the 'met' column)")


if __name__ == "__main__":
    main()
