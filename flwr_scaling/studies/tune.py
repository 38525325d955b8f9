"""``flwr-scaling tune``: choose each method's step sizes on a validation split, by a plain grid search.

A tuning file is a sweep file (``plan.py``) with a ``[tune]`` table::

    backend = "inprocess"
    [base]                         # the problem, as for the sweep that will use the values
    dataset = "digits"
    rounds = 20
    [grid]
    seed = [0, 1]                  # the score is averaged over every run of a grid point (seeds, alphas, ...)
    [tune]
    methods = ["fedavg", "fedyogi", "savic-adam-local"]   # default: [grid] method, else every [tune.grids] entry
    widen = 2                      # widen a grid up to this many times when the best value is on its edge
    widen-factor = 3.0             # each widening adds edge x factor (or edge / factor) to that option's values
    [tune.grids.fedyogi]           # optional: the values of each option tuned (a joint grid: their product)
    lr = [0.01, 0.1, 1.0]
    server-lr = [0.01, 0.1, 1.0]

Every grid point of a method runs as a sweep (``OUT/<method>/sweep.toml``,
written here, then ``run_sweep``: resumable, ``--workers`` for Ray) with
``eval-split = validation``: the server scores the global model on 20 % of
the training split and the test split is never read. The score of a run is
its mean validation accuracy over rounds 1..R (``statistics.tuning_score``: it
rewards speed and the final value), averaged over the point's runs; the best
point wins (a tie goes to the smaller values). When the best value of an option sits on
the edge of its values (and the option is a positive step size or weight,
``WIDENED``), the grid gets one more value beyond that edge and the new points
run; at most ``widen`` times. What is chosen goes to ``OUT/tuned.toml`` (or
``--write``) as ``[method-options.<method>]`` tables, which a sweep file reads
with ``include = "tuned.toml"``; every score is in ``OUT/tuning.md``.

Why a plain grid and not Optuna (or another Bayesian search): a method has
one or two step sizes, and a grid of 3-5 log-spaced values per option costs
tens of short runs; a grid is deterministic (the chosen values follow from
the files alone, reruns skip finished runs), every score of the table can be
checked and plotted, nothing depends on a sampler's seed or version, and it
adds no dependency.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from flwr_scaling.methods import parse_label
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.config_files import read_toml
from flwr_scaling.run.recorder import read_metrics, write_atomic
from flwr_scaling.studies.plan import METHOD, TUNE_TABLE, load_sweep, toml_value
from flwr_scaling.studies.runner import Runner, run_sweep
from flwr_scaling.studies.state import METRICS, RUNS
from flwr_scaling.studies.statistics import tuning_score

METHOD_TABLE = "method-options"
WIDENED = ("lr", "server-lr", "proximal-mu", "server-tau", "precond-alpha")  # positive scales: widened by a factor
SAVIC_STEP = [0.001, 0.003, 0.01, 0.03]
FEDOPT = {"lr": [0.01, 0.1, 1.0], "server-lr": [0.01, 0.1, 1.0]}  # joint: the FedOpt paper tunes both
DEFAULT_GRIDS: dict[str, dict[str, list[float]]] = {
    "fedavg": {"lr": [0.03, 0.1, 0.3, 1.0]},
    "fedadam": FEDOPT, "fedyogi": FEDOPT, "fedadagrad": FEDOPT,
    "fedprox": {"lr": [0.03, 0.1, 0.3, 1.0], "proximal-mu": [0.001, 0.01, 0.1]},
    "local-adam": {"lr": [0.001, 0.003, 0.01, 0.03]},
}
TUNE_KEYS = ("methods", "widen", "widen-factor", "grids")


def default_grid(label: str) -> dict[str, list[float]]:
    """The grid of a method without a ``[tune.grids.<label>]`` table; SAVIC: its client step (oasis: larger,
    with α = 0.1). Add ``server-lr`` values in the table to tune SAVIC's server step too."""
    if label in DEFAULT_GRIDS:
        return {key: list(values) for key, values in DEFAULT_GRIDS[label].items()}
    if parse_label(label).get("precond") == "oasis":
        return {"lr": [0.01, 0.03, 0.1, 0.3]}
    return {"lr": list(SAVIC_STEP)}


def tune(path: str | Path, out: str | Path | None = None, *, write: str | Path | None = None,
         backend: str | None = None, parallel: Mapping[str, Any] | None = None, runner: Runner | None = None,
         stream: TextIO | None = None) -> Path:
    """Tune every method of the file ``path``; return the TOML file written with the chosen values.

    ``out`` (default: the file's ``out``/tune, else ``runs/<stem>/tune``) holds one sweep folder per method;
    ``backend``, ``parallel`` and ``runner`` are passed to ``run_sweep``. Raises ConfigError (one line) on a
    bad ``[tune]`` table before anything runs.
    """
    stream = stream if stream is not None else sys.stdout
    where = str(path)
    raw = read_toml(where, "tuning file")
    settings = _settings(raw, where)
    folder = Path(out) if out is not None else Path(raw.get("out", f"runs/{Path(where).stem}")) / "tune"
    target = Path(write) if write is not None else folder / "tuned.toml"
    grids = {label: settings["grids"].get(label) or default_grid(label) for label in settings["methods"]}
    for label, grid in grids.items():  # every method's first grid is checked before the first run
        load_sweep(_write_sweep(raw, label, grid, folder / label), folder / label)

    chosen, tables, notes = {}, [], []
    for label, grid in grids.items():
        for attempt in range(settings["widen"] + 1):
            sweep_file = _write_sweep(raw, label, grid, folder / label)
            run_sweep(sweep_file, folder / label, runner=runner, backend=backend, stream=stream, parallel=parallel)
            scores = _scores(folder / label, list(grid))
            best = max(scores, key=lambda point: (scores[point][0], [-v for v in point]))
            wider = _widened(grid, dict(zip(grid, best)), settings["widen-factor"])
            if wider == grid or attempt == settings["widen"]:
                break
            print(f"tune {label}: best {_point_text(grid, best)} is on the edge; widening to "
                  f"{_grid_text(wider)}", file=stream, flush=True)
            grid = wider
        edges = [key for key, value in zip(grid, best) if _on_edge(grid[key], value) and len(grid[key]) > 1]
        if edges:
            notes.append(f"{label}: {', '.join(edges)} still on the edge of its values after widening "
                         f"{settings['widen']} time(s); a wider grid may find better")
        chosen[label] = dict(zip(grid, best))
        tables.append((label, grid, scores, best))
        print(f"tune {label}: chose {_point_text(grid, best)} (score {scores[best][0]:.4f})", file=stream, flush=True)

    text = _tuned_toml(where, chosen)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text)
    write_atomic(folder / "tuning.md", _tuning_markdown(where, tables, notes, target))
    print(text, file=stream, end="", flush=True)
    return target


def _settings(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``[tune]`` table, checked: methods, widen, widen-factor, grids (label -> option -> values)."""
    def error(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    table = raw.get(TUNE_TABLE)
    if not isinstance(table, dict):
        raise error("no [tune] table; add one, e.g. [tune] methods = [\"fedavg\", \"fedyogi\"] (see README, Tuning)")
    for key in table:
        if key not in TUNE_KEYS:
            raise error(f"[tune] unknown key {key!r}; known: {', '.join(TUNE_KEYS)}")
    grids = table.get("grids", {})
    if not isinstance(grids, dict) or not all(isinstance(g, dict) for g in grids.values()):
        raise error("[tune.grids.<method>] must be tables of option = [values]")
    grid = raw.get("grid", {}) if isinstance(raw.get("grid", {}), dict) else {}
    methods = table.get("methods", grid.get(METHOD) or list(grids))
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise error("[tune] methods must be a non-empty list of method labels, e.g. [\"fedavg\", \"savic-adam-local\"]")
    for label in [*methods, *grids]:
        try:
            parse_label(label)
        except ConfigError as problem:
            raise error(f"[tune] {problem}") from None
    widen, factor = table.get("widen", 2), table.get("widen-factor", 3.0)
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 0:
        raise error(f"[tune] widen must be an integer >= 0, got {widen!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise error(f"[tune] widen-factor must be a number > 1, got {factor!r}")
    base = raw.get("base", {}) if isinstance(raw.get("base", {}), dict) else {}
    if base.get("eval-split", "validation") != "validation":
        raise error("[base] eval-split: tuning scores on the validation split; remove eval-split from [base]")
    checked = {}
    for label, options in grids.items():
        checked[label] = {}
        for key, values in options.items():
            if key not in RunConfig.keys() or key in (METHOD, "out", "seed", "strategy", "precond", "precond-mode"):
                raise error(f"[tune.grids.{label}] cannot tune {key!r}; give run options such as lr, server-lr")
            if not isinstance(values, list) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise error(f"[tune.grids.{label}] {key} must be a non-empty list of numbers, got {values!r}")
            if key in grid or key in base:
                raise error(f"[tune.grids.{label}] tunes {key!r}, which is also in {'[grid]' if key in grid else '[base]'}")
            checked[label][key] = sorted(float(v) for v in values)
    return {"methods": list(dict.fromkeys(methods)), "widen": widen, "widen-factor": float(factor), "grids": checked}


def _write_sweep(raw: Mapping[str, Any], label: str, grid: Mapping[str, list[float]], folder: Path) -> Path:
    """``folder/sweep.toml``: the file's base and grid (but method), the method's own options, eval-split
    validation, and the tuned options as grid lists. Written so that the tuning runs can be rerun from it."""
    base = {**raw.get("base", {}), "eval-split": "validation"}
    fixed = {k: v for k, v in raw.get(METHOD_TABLE, {}).get(label, {}).items() if k not in grid}
    others = {k: v for k, v in raw.get("grid", {}).items() if k != METHOD}
    top = {key: raw[key] for key in ("backend", "workers", "cpus-per-run", "gpus-per-run", "ray-address") if key in raw}
    lines = [f"# Tuning runs of {label}, written by flwr-scaling tune (rerun with flwr-scaling sweep THIS_FILE)",
             f"out = {toml_value(str(folder))}"]
    lines += [f"{key} = {toml_value(value)}" for key, value in top.items()]
    lines += ["", "[base]", *(f"{key} = {toml_value(value)}" for key, value in base.items())]
    if fixed:
        lines += ["", f"[{METHOD_TABLE}.\"{label}\"]", *(f"{key} = {toml_value(value)}" for key, value in fixed.items())]
    lines += ["", "[grid]", f"{METHOD} = [{toml_value(label)}]"]
    lines += [f"{key} = {toml_value(list(values))}" for key, values in {**grid, **others}.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.toml"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _scores(folder: Path, keys: Sequence[str]) -> dict[tuple[float, ...], tuple[float, float, int]]:
    """Per grid point (the tuned options' values, in ``keys`` order): mean tuning score, mean final
    validation accuracy and the number of runs, over every finished run of the sweep folder."""
    plan = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    collected: dict[tuple[float, ...], list[tuple[float, float]]] = {}
    for run in plan["runs"]:
        rows = read_metrics(folder / RUNS / run["name"] / METRICS)
        point = tuple(float(run["values"][key]) for key in keys)
        collected.setdefault(point, []).append((tuning_score(rows), float(rows[-1]["test_accuracy"])))
    return {point: (statistics.fmean(s for s, _ in runs), statistics.fmean(f for _, f in runs), len(runs))
            for point, runs in collected.items()}


def _on_edge(values: Sequence[float], value: float) -> bool:
    return value in (min(values), max(values))


def _widened(grid: Mapping[str, list[float]], best: Mapping[str, float], factor: float) -> dict[str, list[float]]:
    """The grid with one more value beyond each edge the best point sits on (positive scales only)."""
    wider = {}
    for key, values in grid.items():
        values = list(values)
        value = best[key]
        if key in WIDENED and len(values) > 1 and value > 0:
            if value == max(values):
                values.append(float(f"{value * factor:.6g}"))
            elif value == min(values):
                values.insert(0, float(f"{value / factor:.6g}"))
        wider[key] = values
    return wider


def _tuned_toml(source: str, chosen: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f"# Step sizes chosen by flwr-scaling tune {source} (validation split, mean accuracy over rounds).",
             "# Use them from a sweep file with: include = \"<this file>\""]
    for label, values in chosen.items():
        lines += ["", f"[{METHOD_TABLE}.\"{label}\"]", *(f"{key} = {value:g}" for key, value in values.items())]
    return "\n".join(lines) + "\n"


def _tuning_markdown(source: str, tables, notes: Sequence[str], written: Path) -> str:
    lines = [f"# Tuning: {source}", "",
             "Score: mean validation accuracy over rounds, averaged over each point's runs (the test split is "
             f"never read). Chosen values: `{written}`.", "",
             "| method | values | runs | score (mean val acc over rounds) | final val acc | chosen |",
             "|---|---|---|---|---|---|"]
    for label, grid, scores, best in tables:
        for point in sorted(scores):
            score, final, runs = scores[point]
            lines.append(f"| {label} | {_point_text(grid, point)} | {runs} | {score:.4f} | {final:.4f} | "
                         f"{'yes' if point == best else ''} |")
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def _point_text(grid: Mapping[str, Any], point: Sequence[float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in zip(grid, point))


def _grid_text(grid: Mapping[str, list[float]]) -> str:
    return "; ".join(f"{key} " + ", ".join(f"{v:g}" for v in values) for key, values in grid.items())


__all__ = ["DEFAULT_GRIDS", "WIDENED", "default_grid", "tune"]
