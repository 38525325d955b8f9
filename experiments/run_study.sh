#!/usr/bin/env bash
# The whole study: data -> tuned step sizes -> sweep files -> sweeps -> experiments/REPORT.md.
# Run from the project root with the virtual environment at .venv/ (or PYTHON=...); WORKERS runs that many
# runs at a time as Ray tasks (default 2: one per core of the 2-core machine the committed study ran on).
# Every step skips what is done: data files with the right SHA256, finished tuning and sweep runs,
# tuning results already written. So an interrupted study continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
workers=${WORKERS:-2}
# The sweep files read a9a and MNIST from ../shared/data; the data helper fetches them from their public
# sources (checksums in flwr_scaling/data/download.py) and keeps files that are already there and correct.
DATA=${DATA:-../shared/data}
if [ ! -f "$DATA/a9a/a9a" ] || [ ! -f "$DATA/a9a/a9a.t" ] || [ ! -f "$DATA/mnist-t10k/t10k-images-idx3-ubyte.gz" ] \
   || [ ! -f "$DATA/mnist-t10k/t10k-labels-idx1-ubyte.gz" ]; then
  "$py" -m flwr_scaling data all --out "$DATA"
fi
start=$(date +%s)
# Each step's wall time goes to experiments/results/timings.csv (REPORT.md states the total from it).
timings=experiments/results/timings.csv
mkdir -p experiments/results
[ -f "$timings" ] || echo "step,seconds" > "$timings"
timed() {  # timed STEP COMMAND...: run COMMAND, then append "STEP,seconds" to the timings file
  local step=$1 began; began=$(date +%s); shift
  "$@"
  echo "$step,$(( $(date +%s) - began ))" >> "$timings"
}
# Joint grids (client x server step for the FedOpt baselines, FedProx's mu, SAVIC's server step and momentum
# in the *-server-step files), on the validation split, widened on an edge: flwr-scaling tune. The chosen
# [method-options] tables go to experiments/tuning/<setting>-tuned.toml, which the sweeps include.
for setting in digits digits-server-step a9a a9a-server-step mnist-partial mnist-partial-server-step; do
  if [ ! -f "experiments/tuning/$setting-tuned.toml" ]; then
    timed "tune $setting" "$py" -m flwr_scaling tune "experiments/tuning/$setting.toml" --workers "$workers" \
      --write "experiments/tuning/$setting-tuned.toml"
  fi
done
"$py" experiments/make_sweeps.py
for sweep in digits-methods digits-server-step a9a-methods a9a-server-step mnist-partial digits-heterogeneity \
             digits-iid a9a-heterogeneity a9a-iid digits-epochs a9a-epochs mnist-partial-server-step; do
  timed "sweep $sweep" "$py" -m flwr_scaling sweep "experiments/sweeps/$sweep.toml" --workers "$workers"
done
"$py" experiments/make_report.py
echo "study done in $(( ($(date +%s) - start) / 60 )) min (wall time, this machine)"
