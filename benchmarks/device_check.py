"""CPU against GPU: the same configuration run with ``--device cpu`` and ``--device cuda``, their
final test accuracies and the ratio of their per-round times.

What is measured
----------------
One configuration (``--dataset``, default ``digits``; ``--model``, default
the data's: the ResNet for 3x32x32 images, the CNN for other images),
``--rounds`` rounds of ``savic-adam-global`` with ``--num-clients`` clients,
run twice through the in-process backend (``run.inprocess.run_inprocess``:
the real ServerApp and ClientApp in this process, no Ray, so the clients and
the server's evaluation all use the one device): once on the CPU, once on
``--gpu`` (default ``cuda``). Same seed, same data, same probes (they are
drawn on the CPU either way); the accuracies differ only by float rounding
of the two devices' kernels, and should agree to about a percent.

Per-round time: the median ``wall_s`` of ``metrics.csv`` over rounds 2 to the
last (round 1 carries SAVIC's warm-up and the first model transfer).

Where torch sees no CUDA device the script says so and exits 0: there is
nothing to compare.

Run (from the repository root)::

    .venv/bin/python benchmarks/device_check.py                                  # digits, CNN, 5 rounds
    .venv/bin/python benchmarks/device_check.py --dataset hf:uoft-cs/cifar10 --rounds 3   # ResNet
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.inprocess import run_inprocess


def steady_round_s(rows: list[dict[str, float]]) -> float:
    """Median ``wall_s`` over rounds 2 onwards (round 1 when it is the only one)."""
    times = [float(row["wall_s"]) for row in rows[1:]] or [float(rows[0]["wall_s"])]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default=None, help="default: the data's (resnet for 3x32x32 images)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--gpu", default="cuda", help="the GPU device: cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(f"no GPU: torch {torch.__version__} sees no CUDA device on this machine, so there is nothing to "
              f"compare; run this script where there is one")
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="device-check-") as folder:
        for device in ("cpu", args.gpu):
            config = RunConfig(dataset=args.dataset, model=args.model, rounds=args.rounds, num_clients=args.num_clients,
                               seed=args.seed, device=device, out=str(Path(folder) / device.replace(":", "-")))
            rows = run_inprocess(config)
            results[device] = (float(rows[-1]["test_accuracy"]), steady_round_s(rows))
    (cpu_acc, cpu_s), (gpu_acc, gpu_s) = results["cpu"], results[args.gpu]
    resolved = RunConfig(dataset=args.dataset, model=args.model, num_clients=args.num_clients).resolved()
    print(f"{args.dataset}, {resolved.model}, {args.num_clients} clients, {args.rounds} rounds, "
          f"savic-adam-global, seed {args.seed}; GPU: {torch.cuda.get_device_name(torch.device(args.gpu))}")
    print(f"{'device':<8} {'final test acc':>15} {'s/round':>10}")
    print(f"{'cpu':<8} {cpu_acc:>15.4f} {cpu_s:>10.3f}")
    print(f"{args.gpu:<8} {gpu_acc:>15.4f} {gpu_s:>10.3f}")
    print(f"accuracy difference {abs(cpu_acc - gpu_acc):.4f}; per-round time CPU / GPU = {cpu_s / gpu_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
