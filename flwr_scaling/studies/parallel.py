"""Parallel sweeps: a sweep's unfinished runs as Ray tasks, N at a time, on this machine or an existing Ray cluster.

Each run is one Ray task that runs the configuration in-process
(``run/inprocess.py``) in a scratch folder on whichever node Ray placed it, and
streams its files back to the driver: ``config.json``, ``metrics.csv`` and
``checkpoint.npz`` after every checkpoint, then every file (``log.txt`` and
``partitions.png`` too) when the run ends. The driver writes them, atomically,
into ``OUT/runs/<name>``, so the results gather on the driver's disk even when
the nodes share no file system, and the sweep folder is in the state a serial
sweep leaves: a sweep stopped at any moment (Ctrl-C, SIGKILL) and started again
skips the finished runs (DONE markers) and resumes the others from the last
checkpoint the driver received. A failing run is recorded (its log, the line in
the progress output, the summary's "Not finished" note) and the others go on;
the sweep then ends with an error naming it.

Results are the same as a serial sweep's: the same code runs the same
configuration; only the scratch folder differs, and ``config.json`` is
rewritten with the run's real folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr_scaling.errors import first_line
from flwr_scaling.run.checkpoint import CHECKPOINT, Checkpoint
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.outdir import write_atomic
from flwr_scaling.run.ray_cluster import attach, check_address
from flwr_scaling.run.ray_start import RayStart
from flwr_scaling.studies.logs import output_to
from flwr_scaling.studies.state import LOG, METRICS, completed_rows, mark_done

CONFIG_JSON = "config.json"
ROUND_FILES = (CONFIG_JSON, METRICS, CHECKPOINT)  # shipped after every checkpoint: what a resume needs
POLL_S = 0.2  # how often a task looks for a new checkpoint in its scratch folder
LOCAL_OBJECT_STORE = 100 * 2**20  # bytes; runs return files of a few MB at most


@dataclass(frozen=True)
class ParallelOptions:
    """How a sweep runs on Ray: ``workers`` runs at a time, each with these resources, on this cluster."""

    workers: int
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    ray_address: str | None = None  # None: start a local Ray instance for the sweep


def parallel_options(workers: Any = None, cpus_per_run: Any = None, gpus_per_run: Any = None,
                     ray_address: Any = None, *, where: str = "") -> ParallelOptions | None:
    """Validated options (``None`` values: the defaults), or ``None`` for a serial sweep.

    A sweep is parallel when ``workers`` or ``ray_address`` is given (an address
    with no ``workers`` means one run at a time, on the cluster). ``where``
    prefixes error messages (the sweep file); the command-line names are used
    in them because both spell the options the same way.
    """

    def error(message: str) -> ConfigError:
        return ConfigError(f"{where}{message}")

    def number(value: Any, name: str, low: float, high: float | None) -> float:
        try:
            parsed = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or not parsed >= low or (high is not None and parsed > high) or parsed != parsed:
            limit = f"at least {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise error(f"{name} must be a number {limit}, got {value!r}")
        return parsed

    if workers is None and ray_address is None:
        for value, name in ((cpus_per_run, "cpus-per-run"), (gpus_per_run, "gpus-per-run")):
            if value is not None:
                raise error(f"{name} needs a parallel sweep: give workers (--workers N) or a Ray cluster "
                            f"(--ray-address ADDR)")
        return None
    count = 1
    if workers is not None:
        if isinstance(workers, bool) or not str(workers).strip().isdigit() or int(str(workers).strip()) < 1:
            raise error(f"workers must be a whole number of runs at a time (1 or more), got {workers!r}")
        count = int(str(workers).strip())
    cpus = 1.0 if cpus_per_run is None else number(cpus_per_run, "cpus-per-run", 0.01, None)
    gpus = 0.0 if gpus_per_run is None else number(gpus_per_run, "gpus-per-run", 0.0, None)
    if ray_address is not None:
        try:
            ray_address = check_address(ray_address)
        except ConfigError as problem:
            raise error(str(problem)) from None
    return ParallelOptions(count, cpus, gpus, ray_address)


# ----------------------------------------------------------------- in the Ray task
def _files(folder: Path, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """The named files of ``folder`` that exist (all plain files when ``names`` is None), as bytes."""
    paths = [folder / name for name in names] if names is not None else sorted(folder.iterdir())
    return {path.name: path.read_bytes() for path in paths if path.is_file() and not path.name.startswith(".")}


def run_in_task(config: RunConfig, resume: Checkpoint | None) -> Iterator[dict[str, Any]]:
    """The body of one run's Ray task: run ``config`` in a scratch folder, yield its files as they change.

    Yields ``{"files": {...}}`` after each new checkpoint, then a last
    ``{"files": {...}, "node": NODE_ID, "error": None | "one line"}``. The
    run's stdout, stderr and log lines go to its ``log.txt``; an exception is
    written there with its traceback and reported in ``error``.
    """
    import ray

    from flwr_scaling.run.inprocess import run_inprocess

    node = ray.get_runtime_context().get_node_id()
    scratch = Path(tempfile.mkdtemp(prefix="flwr-scaling-run-"))
    outcome: dict[str, str] = {}

    def work() -> None:
        with open(scratch / LOG, "w", encoding="utf-8") as log, output_to(log):
            try:
                run_inprocess(replace(config, out=str(scratch)), resume=resume)
            except BaseException as problem:  # reported to the driver, which records the failed run
                traceback.print_exc()
                outcome["error"] = first_line(problem)

    try:
        thread = threading.Thread(target=work, name="flwr-scaling-run", daemon=True)
        thread.start()
        shipped = None
        while thread.is_alive():
            thread.join(POLL_S)
            checkpoint = scratch / CHECKPOINT
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
            if stamp != shipped and thread.is_alive():
                shipped = stamp
                yield {"files": _files(scratch, ROUND_FILES)}
        yield {"files": _files(scratch), "node": node, "error": outcome.get("error")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def warm_worker(config: RunConfig) -> None:
    """A Ray task that imports what a run imports and loads its data and partitions (kept per process),
    while the driver still checks the sweep: each worker's first run used to wait about 6 s for it."""
    from flwr_scaling.run.inprocess import run_inprocess  # noqa: F401  (torch, Flower, the apps)
    from flwr_scaling.run.simulation import preflight

    preflight(config)


# ----------------------------------------------------------------- on the driver
def _store(folder: Path, files: dict[str, bytes], append_log: bool) -> None:
    """Write a run's returned files into its folder: ``config.json`` names the real folder; the log may append."""
    for name, data in files.items():
        if name == CONFIG_JSON:
            record = json.loads(data)
            if isinstance(record, dict) and "out" in record:
                record["out"] = str(folder)
                data = (json.dumps(record, indent=2) + "\n").encode("utf-8")
        if name == LOG and append_log and (folder / LOG).is_file():
            data = (folder / LOG).read_bytes() + data
        write_atomic(folder / name, data)


def _local_settings(options: ParallelOptions) -> dict[str, Any]:
    """``ray.init`` arguments of a sweep's own local Ray."""
    # Ray runs its workers at niceness 15 (to keep its own processes responsive); here the tasks are the work,
    # and at 15 they get almost no CPU on a machine that other programs keep busy (measured: --workers 2 was
    # no faster than 1 at load 9 on 2 cores). A cluster's nodes set this with `RAY_worker_niceness=0 ray start`.
    settings: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False,
                                "object_store_memory": LOCAL_OBJECT_STORE, "_system_config": {"worker_niceness": 0}}
    if not options.gpus_per_run:  # a GPU sweep lets Ray find the GPUs and the cores
        settings["num_cpus"] = max(1, int(round(options.workers * options.cpus_per_run)))
    return settings


def start_local_ray(options: ParallelOptions, warm: RunConfig | None = None) -> RayStart | None:
    """Begin starting the sweep's local Ray on a thread (``run.ray_start``), so that it comes up while the
    driver checks the runs; once up, each worker imports and loads what ``warm`` (the first run to do)
    needs. None when the sweep attaches to a cluster or Ray is running already (``run_parallel`` does it)."""
    import ray

    if options.ray_address is not None or ray.is_initialized():
        return None

    def warm_up() -> list[Any]:
        task = ray.remote(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run, max_retries=0)(warm_worker)
        return [task.remote(warm) for _ in range(options.workers)]

    return RayStart(_local_settings(options), then=warm_up if warm is not None else None)


def _start_ray(options: ParallelOptions, starting: RayStart | None) -> tuple[bool, float]:
    """Attach to the cluster or start a local Ray (or wait for ``starting``); return (whether this
    sweep started it, seconds it took)."""
    import ray

    began = time.perf_counter()
    if starting is None and ray.is_initialized():
        return False, 0.0
    if starting is None and options.ray_address is not None:
        attach(options.ray_address)  # its own one-line ConfigError
        return True, time.perf_counter() - began
    try:
        if starting is not None:
            return True, starting.wait()
        ray.init(**_local_settings(options))
    except (ConnectionError, ValueError, RuntimeError) as problem:
        raise RuntimeError(f"Ray did not start: {first_line(problem)}") from None
    return True, time.perf_counter() - began


@dataclass
class _Job:
    run: Any  # a studies.plan.SweepRun (not imported: plan imports this module)
    folder: Path
    resume: Checkpoint | None
    began: float = 0.0
    stream: Any = None  # the task's ObjectRefGenerator


def run_parallel(jobs: list[tuple[Any, Checkpoint | None]], options: ParallelOptions, total: int,
                 finished_before: int, say: Callable[[str], None],
                 starting: RayStart | None = None) -> tuple[int, list[str], dict[str, str]]:
    """Run ``jobs`` (each a run and the checkpoint it resumes from) as Ray tasks, ``options.workers`` at a time.

    Prints one line per finished or failed run (with the ETA across workers).
    Returns (runs finished now, failed run names, node id of every run that
    returned). KeyboardInterrupt cancels the tasks and is re-raised; the runs'
    folders keep their last checkpoint. ``starting``: the local Ray that
    ``start_local_ray`` began (stopped here at the end).
    """
    import ray

    started, startup = _start_ray(options, starting)
    how = "attached" if options.ray_address or not started else "started"
    say(f"Ray {how} in {startup:.1f} s"
        f"{' at ' + options.ray_address if options.ray_address else ''}; {options.workers} runs at a time, "
        f"{options.cpus_per_run:g} CPU{'s' if options.cpus_per_run != 1 else ''}"
        f"{f' and {options.gpus_per_run:g} GPU' if options.gpus_per_run else ''} each")
    remote = ray.remote(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run,
                        num_returns="streaming", max_retries=0)(run_in_task)
    waiting = [_Job(run, Path(run.config.out), resume) for run, resume in jobs]
    running: list[_Job] = []
    durations: list[float] = []
    failed: list[str] = []
    nodes: dict[str, str] = {}
    done = finished_before
    clock = time.perf_counter()
    try:
        while waiting or running:
            while waiting and len(running) < options.workers:
                job = waiting.pop(0)
                job.began = time.perf_counter()
                job.stream = remote.remote(job.run.config, job.resume)
                running.append(job)
            ready, _ = ray.wait([job.stream for job in running], num_returns=1, timeout=None)
            job = next(j for j in running if j.stream is ready[0])
            try:
                message = ray.get(next(job.stream))
            except StopIteration:  # the task ended without its last message (cannot happen unless killed)
                message = {"files": {}, "node": "", "error": "the task ended without returning the run's files"}
            except ray.exceptions.RayError as problem:  # the worker or its node died
                message = {"files": {}, "node": "", "error": f"the Ray task failed: {first_line(problem)}"}
            _store(job.folder, message["files"], append_log=job.resume is not None)
            if "error" not in message:
                continue  # a checkpoint; the run goes on
            running.remove(job)
            seconds = time.perf_counter() - job.began
            done += 1
            where = f" on node {message['node'][:8]}" if message["node"] else ""
            error = message["error"]
            if error is None:
                try:
                    rows = completed_rows(job.folder, job.run.name, job.run.config.rounds)
                except RuntimeError as problem:
                    error = first_line(problem)
            if error is not None:
                failed.append(job.run.name)
                say(f"[{done}/{total}] {job.run.name} failed{where}: {error} (output in {job.folder / LOG})")
                continue
            mark_done(job.folder, job.run.config.to_flower(), rows, seconds)
            nodes[job.run.name] = message["node"]
            durations.append(seconds)
            left = len(waiting) + len(running)
            eta = statistics.fmean(durations) * left / max(1, min(options.workers, left)) if left else 0.0
            say(f"[{done}/{total}] {job.run.name} done in {seconds:.1f} s{where} | "
                f"elapsed {clock_text(time.perf_counter() - clock)} | ETA {clock_text(eta)}")
    except KeyboardInterrupt:
        for job in running:
            ray.cancel(job.stream, force=True)
        say(f"sweep interrupted with {done - len(failed)} of {total} runs finished; run the same sweep again to "
            f"continue (finished runs are kept, interrupted ones resume from their last checkpoint)")
        raise
    finally:
        if starting is not None:
            starting.stop(wait=False)  # Ray shuts down while the report is written; run_sweep waits for it
        elif started:
            ray.shutdown()
    return len(durations), failed, nodes


def clock_text(seconds: float) -> str:
    """A duration for progress lines: ``42s``, ``3m05s``, ``1h02m03s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


__all__ = ["ParallelOptions", "parallel_options", "run_in_task", "run_parallel", "start_local_ray", "warm_worker"]
