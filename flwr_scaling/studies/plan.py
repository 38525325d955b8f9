"""Sweep plans: read and validate a sweep file, expand its grid into named, resolved runs.

A sweep file (TOML)::

    out = "runs/digits-methods"        # optional; default runs/<file stem>
    target-accuracy = 0.9              # optional; default 0.9; or per Dirichlet alpha (quoted keys):
                                       # {"0.1" = 0.8, "0.5" = 0.9, default = 0.9}
    backend = "inprocess"              # optional; default simulation
    workers = 2                        # optional: runs at a time as Ray tasks (parallel.py); also
                                       # cpus-per-run, gpus-per-run, ray-address (an existing cluster)

    [base]                             # run options, as in `flwr-scaling run --config`
    rounds = 30

    [grid]                             # lists; the runs are their cartesian product
    method = ["fedavg", "savic-adam-global"]   # fedavg or savic-<rule>-<mode>
    seed = [0, 1, 2]

    include = "tuned.toml"             # optional: [method-options] tables from other files (a list, or one),
                                       # relative to this file; this file's own tables override theirs
    [method-options.fedavg]            # optional; run options for one method (e.g. its tuned lr); a block
    lr = 0.4                           # for a method not in [grid] method is ignored (with a note)

Everything is validated before the first run starts (``load_sweep``); nothing is written here. Each run
is named by its grid values (``method=fedavg,seed=0``) and writes to ``OUT/runs/<name>``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr_scaling.errors import first_line
from flwr_scaling.methods import parse_label
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.config_files import check_output_folder, read_toml
from flwr_scaling.run.inprocess import BACKENDS
from flwr_scaling.run.simulation import preflight
from flwr_scaling.studies.parallel import ParallelOptions, parallel_options
from flwr_scaling.studies.state import RUNS

METHOD = "method"  # the grid key whose values are labels (fedavg, savic-<rule>-<mode>)
METHOD_OPTIONS = ("strategy", "precond", "precond-mode")  # what a label sets
SEED = "seed"
METHOD_TABLE = "method-options"  # per-method run options, e.g. each method's tuned step size
PARALLEL_KEYS = ("workers", "cpus-per-run", "gpus-per-run", "ray-address")  # how the runs are spread on Ray
TUNE_TABLE = "tune"  # what ``flwr-scaling tune`` reads (studies/tune.py); a sweep ignores it
INCLUDE = "include"  # files of [method-options] tables (e.g. what flwr-scaling tune wrote), relative to this file
TOP_LEVEL = ("out", "target-accuracy", "backend", *PARALLEL_KEYS, INCLUDE, "base", METHOD_TABLE, "grid", TUNE_TABLE)
DEFAULT_KEY = "default"  # in per-alpha targets: the target of an alpha the table does not name
DEFAULT_TARGET = 0.9
MAX_NAME = 200  # folder names longer than this are shortened (with a hash, so they stay distinct)


@dataclass(frozen=True)
class SweepRun:
    """One combination of the grid: its folder name, its grid values, its resolved configuration."""

    name: str
    values: dict[str, Any]  # grid key -> value (``method`` as its label), in name order
    config: RunConfig  # resolved; ``out`` is OUT/runs/<name>


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file: where it came from, where it writes, its grid and its runs in run order."""

    source: str
    out: Path
    target: float | dict[str, float]  # one target, or per Dirichlet alpha (keys as value_text: "0.1", "1.0", default)
    grid: dict[str, list[Any]]  # grid key -> values, keys in name order (method first, seed last)
    runs: tuple[SweepRun, ...]  # in run order: seed outermost, so each seed's comparison completes early
    backend: str = "simulation"  # how runs run: Flower's simulation engine or in this process (inprocess.py)
    parallel: ParallelOptions | None = None  # runs as Ray tasks (parallel.py); None: one after another
    notes: tuple[str, ...] = ()  # what the file holds that this sweep ignores (method-options of other methods)

    def to_json(self) -> dict[str, Any]:
        """The plan as written to ``sweep.json``: what the report needs without reading the sweep file."""
        return {
            "source": self.source,
            "name": Path(self.source).stem,
            "target-accuracy": self.target,
            "backend": self.backend,
            "grid": self.grid,
            "runs": [{"name": r.name, "values": r.values, "config": r.config.to_flower()} for r in self.runs],
        }


def load_sweep(path: str | Path, out: str | Path | None = None, parallel: Mapping[str, Any] | None = None, *,
               preflight_runs: bool = True) -> Sweep:
    """Read and validate a sweep file; every run is resolved and preflighted. Nothing is written.

    ``out`` overrides the file's ``out``; ``parallel`` (``PARALLEL_KEYS`` to
    values, ``None`` for not given: the command line's) overrides the file's. Raises ConfigError with one line that
    names the file and the key (or the run) at fault. With ``preflight_runs=False`` the runs' data and
    partitions are not checked (the seconds of it: imports and data loading); ``preflight_sweep`` does it
    later (a parallel sweep starts Ray first).
    """
    where = str(path)

    def error(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    raw = read_toml(where, "sweep file")
    run_keys = RunConfig.keys()
    for key in raw:
        if key not in TOP_LEVEL:
            if key in run_keys or key == METHOD:
                raise error(f"top-level key {key!r} is a run option; put it in [base] (one value) or [grid] (a list)")
            raise error(f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL)}")

    folder = raw.get("out", f"runs/{Path(where).stem}")
    if not isinstance(folder, str) or not folder.strip() or "\0" in folder:
        raise error(f"out must be a folder name (a non-empty string), got {toml_value(folder)}")
    if out is not None:
        folder = str(out)
    try:
        check_output_folder(folder)
    except ConfigError as problem:
        raise error(str(problem)) from None

    target = _target(raw.get("target-accuracy", DEFAULT_TARGET), error)

    base = raw.get("base", {})
    if not isinstance(base, dict):
        raise error(f"base must be a table of run options ([base]), got {base!r}")
    base = dict(base)
    if "out" in base:
        raise error("[base] out is not allowed: each run writes to OUT/runs/<name>; set the sweep's folder "
                    "with a top-level out = \"...\"")
    base_method = base.pop(METHOD, None)
    if base_method is not None:
        for key in METHOD_OPTIONS:
            if key in base:
                raise error(f"[base] method sets strategy, precond and precond-mode; remove {key!r} from [base]")
        base.update(_method_options(base_method, "[base] method", error))
    try:
        RunConfig.from_mapping(base)
    except ConfigError as problem:
        raise error(f"[base] {problem}") from None

    backend = raw.get("backend", "simulation")
    if backend not in BACKENDS:
        raise error(f"backend must be one of {', '.join(BACKENDS)}, got {toml_value(backend)}")
    from_file = {key: raw.get(key) for key in PARALLEL_KEYS}
    spread = parallel_options(*from_file.values(), where=f"{where}: ")
    given = {key: value for key, value in (parallel or {}).items() if value is not None}
    if given:  # the file's values are valid, so an error here is the command line's
        spread = parallel_options(*{**from_file, **given}.values())

    grid_raw = raw.get("grid")
    if grid_raw is None:
        raise error("no [grid] table; list the values to sweep, e.g. [grid] seed = [0, 1, 2]")
    if not isinstance(grid_raw, dict):
        raise error(f"grid must be a table of lists ([grid]), got {grid_raw!r}")
    if not grid_raw:
        raise error("[grid] is empty; give at least one key with a list of values, e.g. seed = [0, 1, 2]")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        if key == "out":
            raise error("[grid] out is not allowed: each run writes to OUT/runs/<name>; set the sweep's folder "
                        "with a top-level out = \"...\"")
        if key != METHOD and key not in run_keys:
            raise error(f"[grid] unknown option {key!r}{_suggest(key, [METHOD, *run_keys])}")
        if not isinstance(values, list):
            raise error(f"[grid] {key} must be a list of values, e.g. {key} = [{toml_value(values)}], got {toml_value(values)}")
        if not values:
            raise error(f"[grid] {key} is an empty list; give at least one value")
        if base_method is not None and key in METHOD_OPTIONS:
            raise error(f"[base] method sets strategy, precond and precond-mode; remove {key!r} from [grid]")
        if key in base or (key == METHOD and base_method is not None):
            raise error(f"{key!r} is in both [base] and [grid]; keep it in one of them")
        coerced = [_grid_value(key, value, error) for value in values]
        for index, value in enumerate(coerced):
            if value in coerced[:index]:
                raise error(f"[grid] {key} lists {toml_value(value)} twice")
        grid[key] = coerced
    if METHOD in grid:
        for key in METHOD_OPTIONS:
            if key in base:
                raise error(f"[grid] method sets strategy, precond and precond-mode; remove {key!r} from [base]")
            if key in grid:
                raise error(f"[grid] method sets strategy, precond and precond-mode; remove {key!r} from [grid]")

    notes: list[str] = []
    per_method = _method_table(_with_included(raw, Path(where), error), grid, base, error, notes)

    order = sorted(grid, key=lambda k: (k != METHOD, k == SEED, k))  # name order: method, others A-Z, seed
    grid = {key: grid[key] for key in order}
    loop = sorted(order, key=lambda k: k != SEED)  # run order: seed outermost
    runs: list[SweepRun] = []
    seen: dict[str, str] = {}
    for combination in itertools.product(*(grid[key] for key in loop)):
        chosen = dict(zip(loop, combination))
        values = {key: chosen[key] for key in order}
        name = run_name(values)
        if name.lower() in seen:  # case-insensitive file systems
            raise error(f"runs {seen[name.lower()]!r} and {name!r} would share the folder {name!r}; "
                        f"make the grid values differ in more than case and punctuation")
        seen[name.lower()] = name
        options = dict(base)
        for key, value in values.items():
            if key == METHOD:
                options.update(parse_label(value))
                options.update(per_method.get(value, {}))
            else:
                options[key] = value
        try:
            config = replace(RunConfig.from_mapping(options), out=str(Path(folder) / RUNS / name)).resolved()
            config.validate()  # the options and that the data files exist: cheap
        except (ValueError, OSError) as problem:  # ConfigError included; OSError: data that cannot be read
            raise error(f"run {name}: {first_line(problem)}") from None
        if isinstance(target, dict) and DEFAULT_KEY not in target and value_text(config.dirichlet_alpha) not in target:
            raise error(f"target-accuracy names no target for dirichlet-alpha {value_text(config.dirichlet_alpha)} "
                        f"(run {name}); add \"{value_text(config.dirichlet_alpha)}\" = T or default = T")
        runs.append(SweepRun(name, values, config))
    sweep = Sweep(where, Path(folder), target, grid, tuple(runs), backend, spread, tuple(notes))
    if preflight_runs:
        preflight_sweep(sweep)
    return sweep


def preflight_sweep(sweep: Sweep) -> None:
    """Every run's data and partitions checked (``run.simulation.preflight``), in run order; ConfigError
    (one line naming the file and the run) for the first that cannot work."""
    for run in sweep.runs:
        try:
            preflight(run.config)
        except (ValueError, OSError) as problem:  # ConfigError included; OSError: data that cannot be read
            raise ConfigError(f"{sweep.source}: run {run.name}: {first_line(problem)}") from None


def target_for(target: float | Mapping[str, float], alpha: Any) -> float:
    """The target accuracy of runs with Dirichlet ``alpha``: the one target, or the alpha's own, else ``default``
    (else the smallest: a report of a folder whose targets do not name the alpha)."""
    if not isinstance(target, Mapping):
        return float(target)
    return float(target.get(value_text(float(alpha)), target.get(DEFAULT_KEY, min(target.values()))))


def _with_included(raw: Mapping[str, Any], path: Path, error: Callable[[str], ConfigError]) -> Any:
    """The ``[method-options]`` tables of the ``include`` files, then the file's own (key by key on top)."""
    files = raw.get(INCLUDE, [])
    files = [files] if isinstance(files, str) else files
    own = raw.get(METHOD_TABLE, {})
    if not isinstance(files, list) or not all(isinstance(f, str) and f.strip() for f in files):
        raise error(f"{INCLUDE} must be a file name or a list of them, got {toml_value(files)}")
    if not files or not isinstance(own, dict):
        return own
    merged: dict[str, dict[str, Any]] = {}
    for name in files:
        included = read_toml(str(path.parent / name), f"{INCLUDE} file")
        extra = [key for key in included if key != METHOD_TABLE]
        if extra:
            raise error(f"{INCLUDE} file {name!r} may hold only [{METHOD_TABLE}.<method>] tables, not {extra[0]!r}")
        tables = included.get(METHOD_TABLE, {})
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise error(f"{INCLUDE} file {name!r}: {METHOD_TABLE} must be tables such as [{METHOD_TABLE}.fedavg]")
        for label, options in tables.items():
            merged.setdefault(label, {}).update(options)
    for label, options in own.items():
        merged[label] = {**merged.get(label, {}), **options} if isinstance(options, dict) else options
    return merged


def _target(value: Any, error: Callable[[str], ConfigError]) -> float | dict[str, float]:
    """``target-accuracy``: a number in (0, 1], or a table Dirichlet alpha -> number (keys quoted: "0.1")."""
    def number(text: str, target: Any) -> float:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise error(f"target-accuracy{text} must be a number in (0, 1], got {toml_value(target)}")
        return float(target)

    if not isinstance(value, dict):
        return number("", value)
    if not value:
        raise error("target-accuracy is an empty table; give a number, or targets per alpha such as "
                    "{\"0.1\" = 0.8, \"0.5\" = 0.9}")
    targets = {}
    for key, target in value.items():
        if isinstance(target, dict):  # TOML reads {0.1 = 0.8} as the dotted key 0 -> 1
            raise error("target-accuracy: quote each alpha, e.g. {\"0.1\" = 0.8}; an unquoted 0.1 is a "
                        "dotted key in TOML")
        if key == DEFAULT_KEY:
            targets[key] = number(f" {key}", target)
            continue
        try:
            alpha = float(key)
        except ValueError:
            raise error(f"target-accuracy keys are Dirichlet alphas (\"0.1\") or default, got {key!r}") from None
        if not alpha > 0:
            raise error(f"target-accuracy keys are Dirichlet alphas (> 0), got {key!r}")
        targets[value_text(alpha)] = number(f" for alpha {key}", target)
    return targets


def _method_table(table: Any, grid: Mapping[str, list[Any]], base: Mapping[str, Any],
                  error: Callable[[str], ConfigError], notes: list[str]) -> dict[str, dict[str, Any]]:
    """``[method-options.<label>]`` tables: run options for one method of ``[grid] method`` (e.g. its lr).

    A table for a method the grid does not run is checked as a label and then
    ignored, with a line in ``notes`` (so a file of tuned options can be kept
    whole while the grid runs a subset).
    """
    if not isinstance(table, dict):
        raise error(f"{METHOD_TABLE} must be tables such as [{METHOD_TABLE}.fedavg], got {toml_value(table)}")
    methods = grid.get(METHOD, [])
    result = {}
    for label, options in table.items():
        where = f"[{METHOD_TABLE}.{label}]"
        if label not in methods:
            _method_options(label, where, error)
            notes.append(f"{where} ignored: {label} is not in [grid] method ({', '.join(map(str, methods)) or 'none'})")
            continue
        if not isinstance(options, dict):
            raise error(f"{where} must be a table of run options, e.g. lr = 0.01, got {toml_value(options)}")
        for key in options:
            if key == METHOD or key in METHOD_OPTIONS or key == "out":
                raise error(f"{where} cannot set {key!r}")
            if key in grid or key in base:
                raise error(f"{where} sets {key!r}, which is also in {'[grid]' if key in grid else '[base]'}; "
                            f"keep it in one place")
        try:
            RunConfig.from_mapping({**base, **parse_label(label), **options}).validate()
        except ConfigError as problem:
            raise error(f"{where} {problem}") from None
        result[label] = dict(options)
    return result


def run_name(values: Mapping[str, Any]) -> str:
    """A stable, file-system-safe folder name: ``method=savic-adam-global,dirichlet-alpha=0.1,seed=0``."""
    if not values:
        return "run"
    text = ",".join(f"{key}={value_text(value)}" for key, value in values.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}~{digest}"
    return name


def _method_options(label: Any, what: str, error: Callable[[str], ConfigError]) -> dict[str, str]:
    """The run options a method label sets, or the sweep file's error naming ``what`` (the key at fault)."""
    if not isinstance(label, str):
        raise error(f"{what} values must be strings such as 'fedavg' or 'savic-adam-global', got {toml_value(label)}")
    try:
        return parse_label(label)
    except ConfigError as problem:
        raise error(f"{what}: {problem}") from None


def _grid_value(key: str, value: Any, error: Callable[[str], ConfigError]) -> Any:
    """The value as the run will see it (``2`` for a float option is ``2.0``), with the option's own error."""
    if key == METHOD:
        _method_options(value, "[grid] method", error)
        return value
    if isinstance(value, (list, dict)):
        raise error(f"[grid] {key} values must be single numbers or strings, got {toml_value(value)}")
    try:
        config = RunConfig.from_mapping({key: value})
    except ConfigError as problem:
        raise error(f"[grid] {problem}") from None
    return getattr(config, key.replace("-", "_"))


def value_text(value: Any) -> str:
    """A grid value as run names and tables show it: floats by ``repr`` (``0.1``, ``1.0``), the rest by ``str``."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def toml_value(value: Any) -> str:
    """A value as it is written in TOML (strings, booleans, numbers including inf and nan, lists, tables):
    for messages, and for the sweep files ``tune`` writes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _suggest(word: str, choices: Sequence[str]) -> str:
    """The end of an unknown-key message: the closest known key, else all of them."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices)}"


__all__ = ["METHOD", "SEED", "Sweep", "SweepRun", "load_sweep", "preflight_sweep", "run_name", "value_text", "target_for"]
