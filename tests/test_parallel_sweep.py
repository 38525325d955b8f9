"""Parallel sweeps (studies/parallel.py): Ray tasks give the serial sweep's results, record a failing run
without stopping the others, and resume after the driver is killed.

Real runs (in-process backend, digits, 4 runs x 2 rounds) on a local Ray
started by the sweep; the options' validation needs no Ray.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling.run.checkpoint import load_checkpoint, save_checkpoint
from flwr_scaling.run.config import ConfigError
from flwr_scaling.studies.parallel import ParallelOptions, parallel_options
from flwr_scaling.studies.sweep import DONE, load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = """\
backend = "inprocess"
{extra}
[base]
rounds = 2
num-clients = 3
warmup-batches = 1
checkpoint-every = 1

[grid]
method = ["fedavg", "savic-adam-global"]
seed = [0, 1]
"""
NAMES = [f"method={m},seed={s}" for s in (0, 1) for m in ("fedavg", "savic-adam-global")]


def sweep_file(folder: Path, extra: str = "") -> Path:
    path = folder / "grid.toml"
    path.write_text(SWEEP.format(extra=extra), encoding="utf-8")
    return path


def metrics_without_wall(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(handle)]


@pytest.fixture
def serial(tmp_path) -> Path:
    """The reference: the same sweep, one run after another in this process (per test: the code may change)."""
    folder = tmp_path / "serial"
    folder.mkdir()
    with open(os.devnull, "w", encoding="utf-8") as quiet:
        return run_sweep(sweep_file(folder), folder / "out", stream=quiet)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("given, message", [
    (dict(workers=0), "workers must be a whole number of runs at a time (1 or more), got 0"),
    (dict(workers="two"), "workers must be a whole number of runs at a time (1 or more), got 'two'"),
    (dict(workers=2, cpus_per_run=0), "cpus-per-run must be a number at least 0.01, got 0"),
    (dict(workers=2, gpus_per_run="-1"), "gpus-per-run must be a number at least 0, got '-1'"),
    (dict(gpus_per_run=0.5), "gpus-per-run needs a parallel sweep: give workers (--workers N) or a Ray cluster "
                             "(--ray-address ADDR)"),
    (dict(ray_address=" "), "ray-address must be a Ray address such as 'auto', 'HOST:PORT' or 'ray://HOST:10001', "
                            "got ' '"),
])
def test_bad_options_are_one_line_errors(given, message):
    with pytest.raises(ConfigError) as raised:
        parallel_options(**given)
    assert str(raised.value) == message


def test_options_from_the_sweep_file_and_defaults(tmp_path):
    assert parallel_options() is None
    assert parallel_options(workers="3") == ParallelOptions(3, 1.0, 0.0, None)
    assert parallel_options(ray_address="127.0.0.1:6379") == ParallelOptions(1, 1.0, 0.0, "127.0.0.1:6379")
    plan = load_sweep(sweep_file(tmp_path, 'workers = 2\ncpus-per-run = 0.5\ngpus-per-run = 0.25\n'), tmp_path / "o")
    assert plan.parallel == ParallelOptions(2, 0.5, 0.25, None)
    with pytest.raises(ConfigError, match=r"grid.toml: workers must be a whole number .* got -1$"):
        load_sweep(sweep_file(tmp_path, "workers = -1"), tmp_path / "o")


def test_cli_refuses_bad_workers_before_running(tmp_path):
    command = [sys.executable, "-m", "flwr_scaling.cli", "sweep", str(sweep_file(tmp_path)), "--out",
               str(tmp_path / "o"), "--workers", "0"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "flwr-scaling: error: workers must be a whole number of runs at a time (1 or more), got '0'"]
    assert not (tmp_path / "o" / "runs").exists()


# ------------------------------------------------------------------ real runs on Ray
def test_two_workers_give_the_serial_results(tmp_path, serial, capsys):
    out = run_sweep(sweep_file(tmp_path, "workers = 2"), tmp_path / "out")
    for name in NAMES:
        ours, theirs = out / "runs" / name, serial / "runs" / name
        assert metrics_without_wall(ours / "metrics.csv") == metrics_without_wall(theirs / "metrics.csv")
        assert (ours / DONE).is_file() and (ours / "partitions.png").is_file() and (ours / "log.txt").is_file()
        assert f'"out": "{ours}"' in (ours / "config.json").read_text()  # the driver's folder, not the task's
    assert (out / "summary.md").read_text() == (serial / "summary.md").read_text()
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split()[0] for line in progress] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert sorted(line.split()[1] for line in progress) == sorted(NAMES)
    assert all(" done in " in line and "| ETA " in line for line in progress)


def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path, serial, capsys):
    """A checkpoint of the same configuration whose model has the wrong shape: the resumed run fails in its task."""
    broken = tmp_path / "out" / "runs" / NAMES[1]
    broken.mkdir(parents=True)
    save_checkpoint(broken, load_checkpoint(serial / "runs" / NAMES[1]))
    checkpoint = load_checkpoint(broken)
    checkpoint.model = {name: np.zeros(3, dtype=np.float32) for name in checkpoint.model}
    checkpoint.round, checkpoint.rows = 1, checkpoint.rows[:1]
    save_checkpoint(broken, checkpoint)

    with pytest.raises(RuntimeError, match=rf"^1 of 4 runs failed: {NAMES[1]}; "):
        run_sweep(sweep_file(tmp_path, "workers = 2"), tmp_path / "out")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[") and f"{NAMES[1]} failed" in line for line in lines)
    assert not (broken / DONE).exists() and "Traceback" in (broken / "log.txt").read_text()
    for name in NAMES[:1] + NAMES[2:]:
        assert metrics_without_wall(tmp_path / "out" / "runs" / name / "metrics.csv") == \
            metrics_without_wall(serial / "runs" / name / "metrics.csv")
    assert f"Not finished (1 of 4 runs): {NAMES[1]}" in (tmp_path / "out" / "summary.md").read_text()


def test_a_killed_parallel_sweep_resumes_without_repeating_a_run(tmp_path, serial, capsys):
    path = sweep_file(tmp_path, "workers = 2")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "flwr_scaling.cli", "sweep", str(path), "--out", str(out)]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own group: Ray's processes go with it
    try:
        deadline = time.monotonic() + 300
        while not any((out / "runs" / name / DONE).is_file() for name in NAMES):
            assert driver.poll() is None and time.monotonic() < deadline, "no run finished"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = {name: (out / "runs" / name / DONE).read_bytes() for name in NAMES
                   if (out / "runs" / name / DONE).is_file()}

    run_sweep(path, out)
    lines = capsys.readouterr().out.splitlines()
    assert sum("finished already, skipped" in line for line in lines) == len(done_before) >= 1
    for name in NAMES:
        assert metrics_without_wall(out / "runs" / name / "metrics.csv") == \
            metrics_without_wall(serial / "runs" / name / "metrics.csv")
    for name, marker in done_before.items():  # not run again
        assert (out / "runs" / name / DONE).read_bytes() == marker


# ------------------------------------------------------------------ start-up (BENCHMARKS §7: a command's fixed part)
def test_the_local_ray_starts_on_a_thread_and_warms_every_worker_up_with_the_first_run(tmp_path):
    import ray

    from flwr_scaling.studies.parallel import start_local_ray

    plan = load_sweep(sweep_file(tmp_path, "workers = 2"), tmp_path / "o")
    assert start_local_ray(ParallelOptions(2, ray_address="127.0.0.1:1")) is None  # a cluster: attached later
    starting = start_local_ray(plan.parallel, plan.runs[0].config)
    try:
        assert starting.wait() > 0
        deadline = time.monotonic() + 30
        while starting.started is None:  # the warm-up tasks are submitted on the thread, once Ray is up
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ray.get(starting.started, timeout=300) == [None, None]  # both imported and preflighted the run
    finally:
        starting.stop(wait=False)
        starting.stop()
    assert not ray.is_initialized()
    assert not (tmp_path / "o").exists()  # a warm-up writes nothing


def test_a_corrupt_data_file_stops_the_early_ray_and_fails_before_any_run(tmp_path, monkeypatch):
    import ray

    from flwr_scaling.studies import runner

    started = []
    original = runner.start_local_ray

    def recorded(*args):
        started.append(original(*args))
        return started[-1]

    monkeypatch.setattr(runner, "start_local_ray", recorded)
    data = tmp_path / "bad.libsvm"
    data.write_text("+1 1:1\n-1 2:x\n" + "+1 1:1\n" * 40)  # the file exists (checked before Ray), line 2 is not
    path = tmp_path / "grid.toml"
    path.write_text(f'backend = "inprocess"\nworkers = 2\n[base]\ndataset = "libsvm:{data}"\nmodel = "logreg"\n'
                    f'num-clients = 2\npartitioner = "iid"\nrounds = 1\n[grid]\nseed = [0, 1]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        run_sweep(path, tmp_path / "out")
    assert str(raised.value) == f"{path}: run seed=0: {data}:2: expected a number after 2:, got 'x'"
    assert len(started) == 1 and started[0] is not None  # Ray was starting while the data was read ...
    assert not ray.is_initialized()  # ... and is stopped before the error
    assert not (tmp_path / "out").exists()
