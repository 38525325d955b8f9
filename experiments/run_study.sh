#!/usr/bin/env bash
# The whole study: tuned step sizes -> sweep files -> sweeps -> experiments/REPORT.md.
# Run from the project root with the virtual environment active or at .venv/.
# Finished runs are skipped, so an interrupted study continues where it stopped.
# Steps already done (tuning tables in experiments/tuning/) are not repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for problem in digits a9a mnist; do
  if [ ! -f "experiments/tuning/$problem.md" ]; then
    case $problem in
      digits) "$py" experiments/tune.py digits --seeds 0 --rounds 20 ;;
      a9a) "$py" experiments/tune.py a9a --seeds 0 --rounds 10 ;;
      mnist) "$py" experiments/tune.py mnist --seeds 0 --rounds 8 ;;
    esac
  fi
done
"$py" experiments/make_sweeps.py
for sweep in experiments/sweeps/*.toml; do
  "$py" -m flwr_scaling sweep "$sweep"
done
"$py" experiments/make_report.py
