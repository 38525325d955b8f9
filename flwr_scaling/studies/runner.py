"""Running a sweep: its unfinished runs one after another, one progress line each, every run's output in its log.

A restarted sweep skips finished runs, resumes an unfinished run from its
checkpoint when the checkpoint has the same configuration, and reruns any other
unfinished run from scratch (folder state: ``state.py``). So a sweep killed at
any moment loses no finished run and repeats none. When every run is finished
the report is written (``report.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from flwr_scaling.run.config import ConfigError
from flwr_scaling.run.inprocess import BACKENDS, runner_for
from flwr_scaling.run.recorder import write_atomic
from flwr_scaling.studies.plan import first_line, load_sweep
from flwr_scaling.studies.report import write_sweep_report
from flwr_scaling.studies.state import (
    DONE, LOG, SWEEP_JSON, clear_run_folder, completed_rows, is_finished, mark_done, resumable_checkpoint,
)

Runner = Callable[..., Any]  # runner(config, resume=None) runs one resolved configuration into config.out


def _clock(seconds: float) -> str:
    """A duration for progress lines: ``42s``, ``3m05s``, ``1h02m03s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


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
        checkpoint = resumable_checkpoint(folder, run.config.to_flower())
        if checkpoint is None:
            clear_run_folder(folder)
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


__all__ = ["Runner", "run_sweep"]
