"""Parameter sweeps: every combination of a ``[grid]`` of options over a ``[base]`` configuration.

A sweep file (TOML)::

    out = "runs/digits-methods"        # optional; default runs/<file stem>
    target-accuracy = 0.9              # optional; default 0.9

    [base]                             # run options, as in `flwr-scaling run --config`
    rounds = 30

    [grid]                             # lists; the runs are their cartesian product
    method = ["fedavg", "savic-adam-global"]   # fedavg or savic-<rule>-<mode>
    seed = [0, 1, 2]

Everything is validated before the first run starts (``load_sweep``). Runs go
one after another into ``OUT/runs/<name>``, ``name`` being the grid values
(``method=fedavg,dirichlet-alpha=0.1,seed=0``). A run is finished when its
folder holds a ``DONE`` marker (written atomically after the run returned,
with the configuration it ran) and a ``metrics.csv`` of ``rounds`` rows; a
restarted sweep skips finished runs, resumes an unfinished run from its
checkpoint when the checkpoint has the same configuration, and reruns any
other unfinished run from scratch. So a sweep killed at any moment loses no
finished run and repeats none.

``write_sweep_report`` only reads files: ``results.csv``, ``summary.csv``,
``summary.md`` and three plots, over the runs finished so far, grouping runs
that differ only in their seed.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

from flwr_scaling.run.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint
from flwr_scaling.run.config import ConfigError, RunConfig, check_output_folder, read_toml
from flwr_scaling.run.recorder import read_metrics, write_atomic
from flwr_scaling.studies.report import plot_seed_groups, seed_group_summary
from flwr_scaling.run.inprocess import BACKENDS, runner_for
from flwr_scaling.run.simulation import preflight

METHOD = "method"  # the grid key whose values are labels (fedavg, savic-<rule>-<mode>)
METHOD_OPTIONS = ("strategy", "precond", "precond-mode")  # what a label sets
SEED = "seed"
METHOD_TABLE = "method-options"  # per-method run options, e.g. each method's tuned step size
TOP_LEVEL = ("out", "target-accuracy", "backend", "base", METHOD_TABLE, "grid")
DEFAULT_TARGET = 0.9
SWEEP_JSON = "sweep.json"
RUNS = "runs"
DONE = "DONE"
LOG = "log.txt"
# What a run leaves in its folder; removed before a run starts from scratch.
RUN_FILES = (DONE, "metrics.csv", "config.json", CHECKPOINT, LOG)
MAX_NAME = 200  # folder names longer than this are shortened (with a hash, so they stay distinct)
REPORT_FILES = ("results.csv", "summary.csv", "summary.md", "accuracy.png", "accuracy_vs_mb.png", "gamma_over_alpha.png")

Runner = Callable[..., Any]


@dataclass(frozen=True)
class SweepRun:
    """One combination of the grid: its folder name, its grid values, its resolved configuration."""

    name: str
    values: dict[str, Any]  # grid key -> value (``method`` as its label), in name order
    config: RunConfig  # resolved; ``out`` is OUT/runs/<name>


@dataclass(frozen=True)
class Sweep:
    source: str
    out: Path
    target: float
    grid: dict[str, list[Any]]  # grid key -> values, keys in name order (method first, seed last)
    runs: tuple[SweepRun, ...]  # in run order: seed outermost, so each seed's comparison completes early
    backend: str = "simulation"  # how runs run: Flower's simulation engine or in this process (inprocess.py)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": Path(self.source).stem,
            "target-accuracy": self.target,
            "backend": self.backend,
            "grid": self.grid,
            "runs": [{"name": r.name, "values": r.values, "config": r.config.to_flower()} for r in self.runs],
        }


# ----------------------------------------------------------------- loading
def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and validate a sweep file; every run is resolved and preflighted. Nothing is written.

    ``out`` overrides the file's ``out``. Raises ConfigError with one line that
    names the file and the key (or the run) at fault.
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
        raise error(f"out must be a folder name (a non-empty string), got {_toml(folder)}")
    if out is not None:
        folder = str(out)
    try:
        check_output_folder(folder)
    except ConfigError as problem:
        raise error(str(problem)) from None

    target = raw.get("target-accuracy", DEFAULT_TARGET)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise error(f"target-accuracy must be a number in (0, 1], got {target!r}")

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
        raise error(f"backend must be one of {', '.join(BACKENDS)}, got {_toml(backend)}")

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
            raise error(f"[grid] {key} must be a list of values, e.g. {key} = [{_toml(values)}], got {_toml(values)}")
        if not values:
            raise error(f"[grid] {key} is an empty list; give at least one value")
        if base_method is not None and key in METHOD_OPTIONS:
            raise error(f"[base] method sets strategy, precond and precond-mode; remove {key!r} from [grid]")
        if key in base or (key == METHOD and base_method is not None):
            raise error(f"{key!r} is in both [base] and [grid]; keep it in one of them")
        coerced = [_grid_value(key, value, error) for value in values]
        for index, value in enumerate(coerced):
            if value in coerced[:index]:
                raise error(f"[grid] {key} lists {_toml(value)} twice")
        grid[key] = coerced
    if METHOD in grid:
        for key in METHOD_OPTIONS:
            if key in base:
                raise error(f"[grid] method sets strategy, precond and precond-mode; remove {key!r} from [base]")
            if key in grid:
                raise error(f"[grid] method sets strategy, precond and precond-mode; remove {key!r} from [grid]")

    per_method = _method_table(raw.get(METHOD_TABLE, {}), grid, base, error)

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
                options.update(_parse_label(value))
                options.update(per_method.get(value, {}))
            else:
                options[key] = value
        try:
            config = replace(RunConfig.from_mapping(options), out=str(Path(folder) / RUNS / name)).resolved()
            preflight(config)
        except (ValueError, OSError) as problem:  # ConfigError included; OSError: data that cannot be read
            raise error(f"run {name}: {_first_line(problem)}") from None
        runs.append(SweepRun(name, values, config))
    return Sweep(where, Path(folder), float(target), grid, tuple(runs), backend)


def _method_table(table: Any, grid: Mapping[str, list[Any]], base: Mapping[str, Any],
                  error: Callable[[str], ConfigError]) -> dict[str, dict[str, Any]]:
    """``[method-options.<label>]`` tables: run options for one method of ``[grid] method`` (e.g. its lr)."""
    if not isinstance(table, dict):
        raise error(f"{METHOD_TABLE} must be tables such as [{METHOD_TABLE}.fedavg], got {_toml(table)}")
    methods = grid.get(METHOD, [])
    result = {}
    for label, options in table.items():
        where = f"[{METHOD_TABLE}.{label}]"
        if label not in methods:
            raise error(f"{where} names a method that is not in [grid] method ({', '.join(map(str, methods)) or 'none'})")
        if not isinstance(options, dict):
            raise error(f"{where} must be a table of run options, e.g. lr = 0.01, got {_toml(options)}")
        for key in options:
            if key == METHOD or key in METHOD_OPTIONS or key == "out":
                raise error(f"{where} cannot set {key!r}")
            if key in grid or key in base:
                raise error(f"{where} sets {key!r}, which is also in {'[grid]' if key in grid else '[base]'}; "
                            f"keep it in one place")
        try:
            RunConfig.from_mapping({**base, **_parse_label(label), **options}).validate()
        except ConfigError as problem:
            raise error(f"{where} {problem}") from None
        result[label] = dict(options)
    return result


def run_name(values: Mapping[str, Any]) -> str:
    """A stable, file-system-safe folder name: ``method=savic-adam-global,dirichlet-alpha=0.1,seed=0``."""
    if not values:
        return "run"
    text = ",".join(f"{key}={_text(value)}" for key, value in values.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}~{digest}"
    return name


def _method_options(label: Any, what: str, error: Callable[[str], ConfigError]) -> dict[str, str]:
    if not isinstance(label, str):
        raise error(f"{what} values must be strings such as 'fedavg' or 'savic-adam-global', got {_toml(label)}")
    try:
        return _parse_label(label)
    except ConfigError as problem:
        raise error(f"{what}: {problem}") from None


def _parse_label(label: str) -> dict[str, str]:
    from flwr_scaling.cli import parse_label  # here, not at the top: cli.py may import this module

    return parse_label(label)


def _grid_value(key: str, value: Any, error: Callable[[str], ConfigError]) -> Any:
    """The value as the run will see it (``2`` for a float option is ``2.0``), with the option's own error."""
    if key == METHOD:
        _method_options(value, "[grid] method", error)
        return value
    if isinstance(value, (list, dict)):
        raise error(f"[grid] {key} values must be single numbers or strings, got {_toml(value)}")
    try:
        config = RunConfig.from_mapping({key: value})
    except ConfigError as problem:
        raise error(f"[grid] {problem}") from None
    return getattr(config, key.replace("-", "_"))


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _toml(value: Any) -> str:
    """A value as it would be written in TOML (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices)}"


def _first_line(problem: BaseException) -> str:
    text = str(problem)
    return text.splitlines()[0] if text else type(problem).__name__


# ------------------------------------------------------------ run folders
def _same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from ``out`` (a sweep folder may be moved or named by another path); an option
    missing on one side (saved before the option existed) counts as its default."""
    defaults = {RunConfig.key(f.name): f.default for f in fields(RunConfig)}
    keys = (set(a) | set(b)) - {"out"}
    missing = object()
    return all(a.get(k, defaults.get(k, missing)) == b.get(k, defaults.get(k, missing)) for k in keys)


def is_finished(folder: str | Path, config: Mapping[str, Any]) -> bool:
    """``folder`` holds a finished run of ``config`` (kebab-case, resolved): DONE for it and all its rounds."""
    folder = Path(folder)
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
        rows = read_metrics(folder / "metrics.csv")
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return (isinstance(done, dict) and _same_config(done.get("config", {}), config)
            and len(rows) == int(config["rounds"]) and [r["round"] for r in rows] == list(range(1, len(rows) + 1)))


def _resumable(folder: Path, config: Mapping[str, Any]) -> Checkpoint | None:
    """The folder's checkpoint, if it belongs to this configuration and can be continued."""
    if not (folder / CHECKPOINT).is_file():
        return None
    try:
        checkpoint = load_checkpoint(folder)
    except Exception:  # an unreadable checkpoint only means: start again
        return None
    if not _same_config(checkpoint.config, config):
        return None
    if not 0 < checkpoint.round <= int(config["rounds"]) or len(checkpoint.rows) != checkpoint.round:
        return None
    return checkpoint


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# ----------------------------------------------------------------- running
def run_sweep(
    path: str | Path,
    out: str | Path | None = None,
    *,
    runner: Runner | None = None,
    backend: str | None = None,
    stream: TextIO | None = None,
) -> Path:
    """Run every unfinished run of the sweep file ``path``, then write the report; return the sweep folder.

    ``backend`` (``simulation`` or ``inprocess``) overrides the file's
    ``backend``; ``runner``, when given, replaces both (tests).
    ``runner(config)`` runs one resolved configuration into ``config.out``
    (writing ``metrics.csv``); it is called as ``runner(config, resume=checkpoint)``
    to continue from a checkpoint of the same configuration. Its stdout and
    stderr go to ``OUT/runs/<name>/log.txt``; ``stream`` (default: sys.stdout)
    gets one line per run. KeyboardInterrupt and the runner's errors stop the
    sweep (re-raised); run it again to continue.
    """
    stream = stream if stream is not None else sys.stdout
    sweep = load_sweep(path, out)
    if backend is not None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        sweep = replace(sweep, backend=backend)
    runner = runner or runner_for(sweep.backend)
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep.out / SWEEP_JSON, json.dumps(sweep.to_json(), indent=2) + "\n")

    total = len(sweep.runs)
    finished = [is_finished(Path(run.config.out), run.config.to_flower()) for run in sweep.runs]
    pending = finished.count(False)

    def say(text: str, end: str = "\n") -> None:
        print(text, end=end, file=stream, flush=True)

    say(f"sweep {sweep.source}: {total} runs ({sweep.backend}), {total - pending} finished already, {pending} to run; "
        f"results in {sweep.out}/")
    start = time.perf_counter()
    durations: list[float] = []
    for index, (run, done) in enumerate(zip(sweep.runs, finished), start=1):
        prefix = f"[{index}/{total}] {run.name}"
        if done:
            say(f"{prefix} ... finished already, skipped")
            continue
        folder = Path(run.config.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DONE).unlink(missing_ok=True)
        checkpoint = _resumable(folder, run.config.to_flower())
        if checkpoint is None:
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
            say(f"{prefix} ...", end="")
        else:
            say(f"{prefix} (resuming after round {checkpoint.round} of {run.config.rounds}) ...", end="")
        began = time.perf_counter()
        try:
            with open(folder / LOG, "a" if checkpoint else "w", encoding="utf-8") as log, _output_to(log):
                if checkpoint is None:
                    runner(run.config)
                else:
                    runner(run.config, resume=checkpoint)
            rows = _check_complete(folder, run)
        except KeyboardInterrupt:
            say(" interrupted")
            say(f"sweep interrupted with {sum(finished)} of {total} runs finished; run the same sweep again to "
                f"continue (finished runs are kept and not repeated)")
            raise
        except BaseException as problem:
            say(f" failed: {_first_line(problem)}")
            say(f"the run's output is in {folder / LOG}; run the same sweep again to retry it "
                f"(finished runs are kept and not repeated)")
            raise
        seconds = time.perf_counter() - began
        done_record = {"config": run.config.to_flower(), "rounds": len(rows), "seconds": round(seconds, 3),
                       "final_test_accuracy": rows[-1]["test_accuracy"]}
        write_atomic(folder / DONE, json.dumps(done_record, indent=2, sort_keys=True) + "\n")
        finished[index - 1] = True
        durations.append(seconds)
        left = statistics.fmean(durations) * finished.count(False)
        say(f" done in {seconds:.1f} s | elapsed {_clock(time.perf_counter() - start)} | ETA {_clock(left)}")

    write_sweep_report(sweep.out)
    ran = len(durations)
    say(f"sweep finished: {total} runs ({ran} run now, {total - ran} finished before) in "
        f"{_clock(time.perf_counter() - start)}; report in {sweep.out}/summary.md, results.csv and *.png")
    return sweep.out


@contextlib.contextmanager
def _output_to(log: TextIO):
    """Send what a run prints (stdout, stderr, and log handlers writing to them: Flower's, Ray's) to ``log``."""
    terminals = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    stderr = sys.stderr

    def stream_handlers():
        loggers = [logging.getLogger()] + [
            logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
        ]
        return [h for logger in loggers for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and not isinstance(getattr(type(h), "stream", None), property)]  # those follow sys.stderr

    swapped = [(h, h.stream) for h in stream_handlers() if id(h.stream) in terminals]
    for handler, _ in swapped:
        handler.setStream(log)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for handler, old in swapped:
            handler.setStream(old)
        for handler in stream_handlers():  # created during the run, on the redirected stderr
            if handler.stream is log:
                handler.setStream(stderr)


def _check_complete(folder: Path, run: SweepRun) -> list[dict[str, float]]:
    metrics = folder / "metrics.csv"
    rows = read_metrics(metrics) if metrics.is_file() else []
    if len(rows) != run.config.rounds:
        raise RuntimeError(f"run {run.name} ended with {len(rows)} of {run.config.rounds} rounds in {metrics}")
    return rows


# ------------------------------------------------------------------ report
def write_sweep_report(out_dir: str | Path) -> None:
    """Tables and plots of the finished runs in the sweep folder ``out_dir``. Only reads; never runs anything.

    Writes (atomically) ``results.csv`` (one row per run and round: the grid
    values, then every metrics.csv column), ``summary.csv`` and ``summary.md``
    (one row per group of runs that differ only in their seed) and
    ``accuracy.png``, ``accuracy_vs_mb.png``, ``gamma_over_alpha.png``. The
    tables depend on the run files alone: regenerating them gives the same bytes.
    """
    out = Path(out_dir)
    spec_file = out / SWEEP_JSON
    if not spec_file.is_file():
        raise ConfigError(f"{out} is not a sweep folder: {SWEEP_JSON} is missing (run the sweep first)")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        target = float(spec["target-accuracy"])
        grid = {key: list(values) for key, values in spec["grid"].items()}
        runs = spec["runs"]
        name = str(spec.get("name", out.name))
    except (ValueError, KeyError, TypeError, AttributeError) as problem:
        raise ConfigError(f"{spec_file} is not a sweep description: {_first_line(problem)}") from None

    keys = list(grid)
    group_keys = [key for key in keys if key != SEED]
    finished, missing = [], []
    for run in runs:
        folder = out / RUNS / run["name"]
        if is_finished(folder, run["config"]):
            finished.append((run, folder / "metrics.csv"))
        else:
            missing.append(run["name"])
    if not finished:
        raise ConfigError(f"{out}: no finished runs yet (0 of {len(runs)}); nothing to report")

    # results.csv: the metrics as written (no re-formatting), the grid values in front.
    metric_columns: list[str] = []
    raw_rows: dict[str, list[dict[str, str]]] = {}
    parsed: dict[str, list[dict[str, float]]] = {}
    for run, metrics in finished:
        with open(metrics, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            metric_columns += [c for c in reader.fieldnames or [] if c not in metric_columns]
            raw_rows[run["name"]] = list(reader)
        parsed[run["name"]] = read_metrics(metrics)
    result_rows = [{"run": run["name"], **{k: _text(run["values"][k]) for k in keys}, **row}
                   for run, _ in finished for row in raw_rows[run["name"]]]
    write_atomic(out / "results.csv", _csv(["run", *keys, *metric_columns], result_rows))

    # Groups: runs equal but for the seed, in grid order (order of first appearance by grid position).
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run, _ in finished:
        groups.setdefault(tuple(run["values"][k] for k in group_keys), []).append(run)
    position = {key: {json.dumps(v): i for i, v in enumerate(grid[key])} for key in group_keys}
    ordered = sorted(groups, key=lambda g: [position[k][json.dumps(v)] for k, v in zip(group_keys, g)])

    def label(group: tuple) -> str:
        if not group_keys:
            return RunConfig.from_mapping(groups[group][0]["config"]).label()
        return ", ".join(str(v) if k == METHOD else f"{k}={_text(v)}" for k, v in zip(group_keys, group))

    summary_columns = [*group_keys, *([] if "lr" in group_keys else ["lr"]), "seeds", "n_seeds",
                       "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean", "best_accuracy_std",
                       "target_accuracy", "rounds_to_target_mean", "reached_target", "mb_to_target_mean",
                       "mb_total_mean", "max_gamma_over_alpha", "final_gap_mean", "final_gap_std",
                       "final_worst10_mean", "final_worst10_std"]
    summary, curves = [], {}
    for group in ordered:
        members = sorted(groups[group], key=lambda r: r["config"]["seed"])
        stats = seed_group_summary([parsed[r["name"]] for r in members], target)
        row: dict[str, Any] = {k: _text(v) for k, v in zip(group_keys, group)}
        if "lr" not in group_keys:
            row["lr"] = _number(members[0]["config"]["lr"])
        row["seeds"] = " ".join(str(r["config"]["seed"]) for r in members)
        row["target_accuracy"] = _number(target)
        row.update({k: _number(v) for k, v in stats.items()})
        summary.append((group, row, stats))
        curves[label(group)] = [parsed[r["name"]] for r in members]
    write_atomic(out / "summary.csv", _csv(summary_columns, [row for _, row, _ in summary]))

    configs = [run["config"] for run in runs]
    context = _common_context(configs)
    lines = [f"# Sweep {name}", "", context, ""] if context else [f"# Sweep {name}", ""]
    header = [*group_keys, *([] if "lr" in group_keys else ["lr"]), "seeds", "final acc", "best acc",
              f"rounds to {target:g}", f"MB to {target:g}", "MB total", "max Γ/α"]
    # Optional columns, shown when every group has them: f - f* (logreg) and the worst clients' accuracy.
    extras = [(key, title) for key, title in (("final_gap", "final f − f*"), ("final_worst10", "final worst-10 % client acc"))
              if all(stats[f"{key}_mean"] is not None for _, _, stats in summary)]
    header += [title for _, title in extras]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, row, stats in summary:
        n = stats["n_seeds"]
        reached = stats["reached_target"]
        rounds_text = ("never" if not reached else _fixed(stats["rounds_to_target_mean"], 1)) + f" ({reached}/{n})"
        cells = [row[k] for k in group_keys] + ([] if "lr" in group_keys else [row["lr"]]) + [
            str(n),
            _pm(stats["final_accuracy_mean"], stats["final_accuracy_std"]),
            _pm(stats["best_accuracy_mean"], stats["best_accuracy_std"]),
            rounds_text,
            "-" if stats["mb_to_target_mean"] is None else _fixed(stats["mb_to_target_mean"], 2),
            _fixed(stats["mb_total_mean"], 2),
            f"{stats['max_gamma_over_alpha']:.3g}",
        ]
        for key, _ in extras:
            mean, std = stats[f"{key}_mean"], stats[f"{key}_std"]
            cells.append(f"{mean:.3g}" + ("" if std is None else f" ± {std:.2g}") if key == "final_gap"
                         else _pm(mean, std))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Mean ± sample standard deviation (n − 1) over seeds. Rounds and MB to {target:g}: first round whose test "
        f"accuracy is >= {target:g}, mean over the seeds that reached it (how many in brackets). MB: bytes sent "
        f"down and up (10^6). Γ/α: largest precond_max / precond_min over rounds and seeds.",
    ]
    partitions = _collect_partition_plots(out, [run for run, _ in finished])
    if partitions:
        lines += ["", "Label distribution of each client (one heatmap per distinct partition): "
                  + ", ".join(f"[{name}](partitions/{name}.png)" for name in partitions)]
    if missing:
        lines += ["", f"Not finished ({len(missing)} of {len(runs)} runs): " + ", ".join(missing)]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")

    styles = _styles([group for group in ordered], group_keys, grid, label)
    seeds = sorted({run["config"]["seed"] for run, _ in finished})
    subtitle = f"{context}" if context else ""
    over = f"mean ± std over seeds ({', '.join(map(str, seeds))})"
    plot_seed_groups(curves, out / "accuracy.png", x="round", y="test_accuracy", styles=styles,
                     title=f"{name}: test accuracy, {over}\n{subtitle}".rstrip(),
                     xlabel="round", ylabel="test accuracy", target=target)
    plot_seed_groups(curves, out / "accuracy_vs_mb.png", x="mb", y="test_accuracy", styles=styles,
                     title=f"{name}: test accuracy against communication, {over}\n{subtitle}".rstrip(),
                     xlabel="MB communicated (down + up, cumulative)", ylabel="test accuracy", target=target)
    plot_seed_groups(curves, out / "gamma_over_alpha.png", x="round", y="gamma_over_alpha", styles=styles,
                     band="range", log_y=True,
                     title=f"{name}: preconditioner spread Γ/α = max D̂ / min D̂, mean and min–max over seeds"
                           f"\n{subtitle}".rstrip(),
                     xlabel="round", ylabel="precond_max / precond_min (log scale)")
    gap = out / "optimality_gap.png"
    if any(math.isfinite(row.get("f_gap", math.nan)) for runs in curves.values() for rows in runs for row in rows):
        plot_seed_groups(curves, gap, x="round", y="f_gap", styles=styles, log_y=True,
                         title=f"{name}: optimality gap f(x) − f* of the convex objective, {over}\n{subtitle}".rstrip(),
                         xlabel="round", ylabel="f(x) − f* (log scale)")
    else:
        gap.unlink(missing_ok=True)
    worst = out / "client_worst10.png"
    if any(math.isfinite(row.get("client_acc_worst10", math.nan)) for runs in curves.values() for rows in runs for row in rows):
        # Heterogeneity hurts the worst clients first: runs with --client-eval-every get this plot.
        plot_seed_groups(curves, worst, x="round", y="client_acc_worst10", styles=styles,
                         title=f"{name}: mean accuracy of the worst 10 % of clients, {over}\n{subtitle}".rstrip(),
                         xlabel="round", ylabel="worst-10 % client accuracy (own held-out data)")
    else:
        worst.unlink(missing_ok=True)


PARTITION_KEYS = ("dataset", "test-path", "partitioner", "dirichlet-alpha", "shard-classes", "num-clients",
                  "client-eval-every", "eval-split", "seed")


def _collect_partition_plots(out: Path, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One label-distribution heatmap per distinct partition of the finished runs, in ``OUT/partitions/``,
    named by the settings that make the partition (a partition does not depend on the method)."""
    folder = out / "partitions"
    wanted = {}
    for run in runs:
        config = run["config"]
        varying = {key: config.get(key) for key in PARTITION_KEYS}
        name = run_name({k: v for k, v in varying.items() if k in ("partitioner", "dirichlet-alpha",
                                                                     "num-clients", "seed")})
        source = out / RUNS / run["name"] / "partitions.png"
        if name not in wanted and source.is_file():
            wanted[name] = source
    if not wanted:
        return []
    folder.mkdir(exist_ok=True)
    for name, source in wanted.items():
        target = folder / f"{name}.png"
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return list(wanted)


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value: Any) -> str:
    """A number for the CSV tables: integers as such, floats to 6 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def _fixed(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _common_context(configs: Sequence[Mapping[str, Any]]) -> str:
    """The setting shared by every run (for titles): dataset, model, clients, split, epochs, rounds."""
    parts = []
    for key, show in (("dataset", "{}"), ("model", "{}"), ("num-clients", "{} clients"),
                      ("clients-per-round", "{} per round"), ("dirichlet-alpha", "Dirichlet {:g}"),
                      ("local-epochs", "{} local epoch(s)"), ("rounds", "{} rounds")):
        values = {json.dumps(c.get(key)) for c in configs}
        if len(values) == 1 and configs[0].get(key) is not None:
            if key == "clients-per-round" and configs[0].get(key) == configs[0].get("num-clients"):
                continue
            parts.append(show.format(configs[0][key]))
    return ", ".join(parts)


def _styles(groups: Sequence[tuple], group_keys: Sequence[str], grid: Mapping[str, list[Any]],
            label: Callable[[tuple], str]) -> dict[str, dict[str, Any]]:
    """Colour by the first grid key (the method, if swept), line style by the other keys."""
    import matplotlib

    if not group_keys:
        return {label(g): {"color": "C0", "linestyle": "-"} for g in groups}
    first = group_keys[0]
    palette = matplotlib.colormaps["tab10" if len(grid[first]) <= 10 else "tab20"]
    colours = {json.dumps(v): palette(i % palette.N) for i, v in enumerate(grid[first])}
    rest = [tuple(g[1:]) for g in groups]
    combos = list(dict.fromkeys(rest))
    line_styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*"]
    styles = {}
    for group, other in zip(groups, rest):
        i = combos.index(other)
        styles[label(group)] = {
            "color": colours[json.dumps(group[0])],
            "linestyle": line_styles[i % len(line_styles)],
            "marker": markers[(i // len(line_styles)) % len(markers)],
        }
    return styles


__all__ = ["Sweep", "SweepRun", "load_sweep", "run_sweep", "write_sweep_report", "run_name", "is_finished"]
