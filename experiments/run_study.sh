#!/usr/bin/env bash
# The whole study: data -> tuned step sizes -> sweep files -> sweeps -> experiments/REPORT.md.
# Run from the project root with the virtual environment at .venv/ (or PYTHON=...).
# Every step skips what is done: data files with the right SHA256, finished tuning and sweep runs,
# tuning results already written. So an interrupted study continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
# The sweep files read a9a and MNIST from ../shared/data; the data helper fetches them from their public
# sources (checksums in flwr_scaling/data/download.py) and keeps files that are already there and correct.
DATA=${DATA:-../shared/data}
if [ ! -f "$DATA/a9a/a9a" ] || [ ! -f "$DATA/a9a/a9a.t" ] || [ ! -f "$DATA/mnist-t10k/t10k-images-idx3-ubyte.gz" ] \
   || [ ! -f "$DATA/mnist-t10k/t10k-labels-idx1-ubyte.gz" ]; then
  "$py" -m flwr_scaling data all --out "$DATA"
fi
start=$(date +%s)
for problem in digits a9a mnist; do
  # Joint grids (client x server step for the FedOpt baselines and SAVIC adam-local), on the validation
  # split, widened on an edge: flwr-scaling tune. Its [method-options] tables go to <problem>-tuned.toml.
  if [ ! -f "experiments/tuning/$problem-tuned.toml" ]; then
    "$py" -m flwr_scaling tune "experiments/tuning/$problem.toml" --write "experiments/tuning/$problem-tuned.toml"
  fi
done
"$py" experiments/make_sweeps.py
for sweep in experiments/sweeps/*.toml; do
  "$py" -m flwr_scaling sweep "$sweep"
done
"$py" experiments/make_report.py
echo "study done in $(( ($(date +%s) - start) / 60 )) min (wall time, this machine)"
