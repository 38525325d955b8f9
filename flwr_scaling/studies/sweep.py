"""Parameter sweeps: every combination of a ``[grid]`` of options over a ``[base]`` configuration.

The public entry points, one job per module behind them:

- ``plan.py``: ``load_sweep`` reads and validates a sweep file (format in its
  docstring) and expands the grid into named, resolved runs; nothing is written;
- ``state.py``: a sweep folder's state on disk (``DONE`` markers, finished and
  resumable runs);
- ``runner.py``: ``run_sweep`` runs the unfinished runs one after another into
  ``OUT/runs/<name>``, resumably, then writes the report;
- ``report.py``: ``write_sweep_report`` only reads files: ``results.csv``,
  ``summary.csv``, ``summary.md`` and the plots, over the runs finished so far,
  grouping runs that differ only in their seed (the pipeline ``compare`` uses too).
"""

from __future__ import annotations

from flwr_scaling.studies.plan import Sweep, SweepRun, load_sweep, run_name
from flwr_scaling.studies.report import write_sweep_report
from flwr_scaling.studies.runner import run_sweep
from flwr_scaling.studies.state import DONE, is_finished

__all__ = ["DONE", "Sweep", "SweepRun", "load_sweep", "run_sweep", "write_sweep_report", "run_name", "is_finished"]
