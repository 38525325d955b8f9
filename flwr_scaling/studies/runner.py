"""Running a sweep: its unfinished runs one after another, one progress line each, every run's output in its log.

A restarted sweep skips finished runs, resumes an unfinished run from its
checkpoint when the checkpoint has the same configuration, and reruns any other
unfinished run from scratch (folder state: ``state.py``). So a sweep killed at
any moment loses no finished run and repeats none. When every run is finished
the report is written (``report.py``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from flwr_scaling.errors import first_line
from flwr_scaling.run.config import ConfigError
from flwr_scaling.run.inprocess import BACKENDS, runner_for
from flwr_scaling.run.outdir import claim_output
from flwr_scaling.run.recorder import write_atomic
from flwr_scaling.run.notices import without_known_notices
from flwr_scaling.run.ray_start import RayStart
from flwr_scaling.studies.parallel import clock_text, run_parallel, start_local_ray
from flwr_scaling.studies.logs import output_to
from flwr_scaling.studies.plan import load_sweep, preflight_sweep
from flwr_scaling.studies.report import write_sweep_report
from flwr_scaling.studies.state import (
    DONE, LOG, SWEEP_JSON, clear_run_folder, same_config, completed_rows, is_finished, mark_done, resumable_checkpoint,
)

Runner = Callable[..., Any]  # runner(config, resume=None) runs one resolved configuration into config.out


def run_sweep(
    path: str | Path,
    out: str | Path | None = None,
    *,
    runner: Runner | None = None,
    backend: str | None = None,
    stream: TextIO | None = None,
    overwrite: bool = False,
    parallel: dict[str, Any] | None = None,
) -> Path:
    """Run every unfinished run of the sweep file ``path``, then write the report; return the sweep folder.

    ``backend`` (``simulation`` or ``inprocess``) overrides the file's
    ``backend``; ``runner``, when given, replaces both (tests).
    ``runner(config)`` runs one resolved configuration into ``config.out``
    (writing ``metrics.csv``); it is called as ``runner(config, resume=checkpoint)``
    to continue from a checkpoint of the same configuration. Its stdout and
    stderr go to ``OUT/runs/<name>/log.txt``; ``stream`` (default: sys.stdout)
    gets one line per run. KeyboardInterrupt and the runner's errors stop the
    sweep (re-raised); run it again to continue. The folder is locked for the
    sweep (a second sweep on it fails at once); a run folder that holds a
    finished run of another configuration is refused unless ``overwrite``.
    ``parallel`` (or the file's ``workers``/``ray-address``) runs the runs as Ray
    tasks instead (``parallel.py``): a failing run is then recorded, the others
    go on, and the sweep ends with RuntimeError naming the failed runs.
    """
    stream = stream if stream is not None else sys.stdout
    sweep = load_sweep(path, out, parallel, preflight_runs=False)
    if backend is not None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        sweep = replace(sweep, backend=backend)
    runner = runner or runner_for(sweep.backend)
    # A parallel sweep's Ray starts while the runs' data is checked, and warms its workers up with the
    # first run to do (BENCHMARKS §7: the fixed seconds of a sweep command); the check fails before any
    # run starts, as for a serial sweep, and Ray is stopped then.
    first = None if sweep.parallel is None else next(
        (run for run in sweep.runs if not is_finished(Path(run.config.out), run.config.to_flower())), None)
    with without_known_notices():  # ray.init's notice, printed on the thread that starts Ray
        starting = start_local_ray(sweep.parallel, first.config) if first is not None else None
        try:
            preflight_sweep(sweep)
            # Only the lock: the sweep's own files are judged run by run (finished ones are kept).
            with claim_output(sweep.out, what="sweep", results=(), outputs=()):
                return _run_claimed(sweep, runner, stream, overwrite, starting)
        finally:
            if starting is not None:
                starting.stop()


def _run_claimed(sweep, runner: Runner, stream: TextIO, overwrite: bool, starting: RayStart | None) -> Path:
    """``run_sweep`` once the sweep folder is locked."""
    replaced = [run.name for run in sweep.runs if _finished_otherwise(Path(run.config.out), run.config.to_flower())]
    if replaced and not overwrite:  # a finished run is never rerun over its results unless asked
        more = f" and {len(replaced) - 1} more" if len(replaced) > 1 else ""
        raise ConfigError(f"sweep folder {sweep.out}: run {replaced[0]}{more} finished with another configuration "
                          f"than the sweep file's; choose another out, or pass --overwrite to run them again")
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep.out / SWEEP_JSON, json.dumps(sweep.to_json(), indent=2) + "\n")

    total = len(sweep.runs)
    finished = [is_finished(Path(run.config.out), run.config.to_flower()) for run in sweep.runs]
    pending = finished.count(False)

    def say(text: str, end: str = "\n") -> None:
        print(text, end=end, file=stream, flush=True)

    how = sweep.backend if sweep.parallel is None else "inprocess in Ray tasks"
    say(f"sweep {sweep.source}: {total} runs ({how}), {total - pending} finished already, {pending} to run; "
        f"results in {sweep.out}/")
    for note in sweep.notes:
        say(f"note: {note}")
    start = time.perf_counter()
    if sweep.parallel is not None:
        return _run_in_parallel(sweep, finished, say, start, starting)
    durations: list[float] = []
    for index, (run, done) in enumerate(zip(sweep.runs, finished), start=1):
        prefix = f"[{index}/{total}] {run.name}"
        if done:
            say(f"{prefix} ... finished already, skipped")
            continue
        folder = Path(run.config.out)
        checkpoint = prepare_run_folder(run)
        if checkpoint is None:
            say(f"{prefix} ...", end="")
        else:
            say(f"{prefix} (resuming after round {checkpoint.round} of {run.config.rounds}) ...", end="")
        began = time.perf_counter()
        try:
            with open(folder / LOG, "a" if checkpoint else "w", encoding="utf-8") as log, output_to(log):
                if checkpoint is None:
                    runner(run.config)
                else:
                    runner(run.config, resume=checkpoint)
            rows = completed_rows(folder, run.name, run.config.rounds)
        except KeyboardInterrupt:
            say(" interrupted")
            say(f"sweep interrupted with {sum(finished)} of {total} runs finished; run the same sweep again to "
                f"continue (finished runs are kept and not repeated)")
            raise
        except BaseException as problem:
            say(f" failed: {first_line(problem)}")
            say(f"the run's output is in {folder / LOG}; run the same sweep again to retry it "
                f"(finished runs are kept and not repeated)")
            raise
        seconds = time.perf_counter() - began
        mark_done(folder, run.config.to_flower(), rows, seconds)
        finished[index - 1] = True
        durations.append(seconds)
        left = statistics.fmean(durations) * finished.count(False)
        say(f" done in {seconds:.1f} s | elapsed {clock_text(time.perf_counter() - start)} | ETA {clock_text(left)}")

    write_sweep_report(sweep.out)
    ran = len(durations)
    say(f"sweep finished: {total} runs ({ran} run now, {total - ran} finished before) in "
        f"{clock_text(time.perf_counter() - start)}; report in {sweep.out}/summary.md, results.csv and *.png")
    return sweep.out


def prepare_run_folder(run):
    """Make the run's folder ready to (re)start: no DONE marker, and either the checkpoint to resume
    from or an emptied folder (the one place serial and parallel sweeps decide this)."""
    folder = Path(run.config.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE).unlink(missing_ok=True)
    checkpoint = resumable_checkpoint(folder, run.config.to_flower())
    if checkpoint is None:
        clear_run_folder(folder)
    return checkpoint


def _run_in_parallel(sweep, finished: list[bool], say: Callable[[str], None], start: float,
                     starting: RayStart | None) -> Path:
    """The unfinished runs as Ray tasks (``parallel.py``), each folder prepared as the serial loop does."""
    jobs = []
    for index, (run, done) in enumerate(zip(sweep.runs, finished), start=1):
        if done:
            say(f"[{index}/{len(finished)}] {run.name} ... finished already, skipped")
            continue
        jobs.append((run, prepare_run_folder(run)))
    ran, failed, _ = run_parallel(jobs, sweep.parallel, len(finished), sum(finished), say, starting)
    if ran or any(finished):
        write_sweep_report(sweep.out)
    total = len(finished)
    say(f"sweep finished: {total - len(failed)} of {total} runs ({ran} run now) in "
        f"{clock_text(time.perf_counter() - start)}; report in {sweep.out}/summary.md, results.csv and *.png")
    if failed:
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise RuntimeError(f"{len(failed)} of {total} runs failed: {failed[0]}{more}; their output is in "
                           f"{sweep.out}/runs/<name>/{LOG}; run the same sweep again to retry them")
    return sweep.out


def _finished_otherwise(folder: Path, config: dict[str, Any]) -> bool:
    """``folder`` has a DONE marker of another configuration: a finished run the sweep file no longer describes."""
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and not same_config(done.get("config", {}), config)


__all__ = ["Runner", "output_to", "run_sweep"]
