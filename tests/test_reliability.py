"""Same seed, same result; a killed run resumes to exactly the uninterrupted result.

These start Ray (about 10 s a run on an idle 2-core machine).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

try:
    from .processes import kill_marked
except ImportError:  # tests run as top-level modules
    from processes import kill_marked

from flwr_scaling.run.checkpoint import load_checkpoint

BIN = Path(sys.executable).parent
SMALL = ["--num-clients", "4", "--clients-per-round", "2", "--precond", "rmsprop"]


def rows_without_wall_clock(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.pop("wall_s")
    return rows


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "flwr-scaling"), *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_same_seed_same_result(tmp_path: Path, backend: str) -> None:
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        run_cli(["run", *SMALL, "--rounds", "3", "--seed", seed, "--backend", backend, "--out", str(tmp_path / name)],
                tmp_path)
    first = rows_without_wall_clock(tmp_path / "a" / "metrics.csv")
    assert first == rows_without_wall_clock(tmp_path / "b" / "metrics.csv")
    assert first != rows_without_wall_clock(tmp_path / "c" / "metrics.csv")
    same = [load_checkpoint(tmp_path / name).model for name in ("a", "b")]
    assert all(np.array_equal(same[0][k], same[1][k]) for k in same[0])


@pytest.mark.slow  # three Ray simulations: about 150 s on 2 cores
def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    check_same_seed_same_result(tmp_path, "simulation")


def test_same_seed_gives_identical_metrics_in_process(tmp_path):
    # The default suite's determinism check: the same ServerApp and ClientApp without Ray's start-up.
    check_same_seed_same_result(tmp_path, "inprocess")


@pytest.mark.slow
def test_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path):
    rounds = ["--rounds", "12"]  # enough rounds after round 3 that the kill lands mid-run on a fast machine
    run_cli(["run", *SMALL, *rounds, "--out", str(tmp_path / "whole")], tmp_path)

    marker = f"FLWR_SCALING_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "flwr-scaling"), "run", *SMALL, *rounds, "--out", str(killed)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            metrics = killed / "metrics.csv"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 1 + 3:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach round 3")
        time.sleep(0.1)  # into round 4
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(marker)
        proc.wait()
    done = load_checkpoint(killed).round
    assert 3 <= done < 12

    resumed = run_cli(["run", "--resume", str(killed)], tmp_path)
    assert f"resuming {killed} after round {done} of 12" in resumed.stdout
    assert rows_without_wall_clock(killed / "metrics.csv") == rows_without_wall_clock(tmp_path / "whole" / "metrics.csv")
    final, reference = load_checkpoint(killed), load_checkpoint(tmp_path / "whole")
    assert final.round == reference.round == 12
    for key, value in reference.model.items():
        assert np.array_equal(final.model[key], value), key
    for key, value in reference.precond_state.items():
        assert np.array_equal(final.precond_state[key], value), key


def test_resume_refuses_a_different_configuration(tmp_path):
    run_cli(["run", *SMALL, "--rounds", "1", "--out", str(tmp_path / "r")], tmp_path)
    proc = subprocess.run([str(BIN / "flwr-scaling"), "run", "--resume", str(tmp_path / "r"), "--lr", "0.5"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "flwr-scaling: error: --lr 0.5 differs from the checkpoint's lr = 0.003; a resumed run keeps its "
        "configuration (start a new run in another folder instead)"
    )
