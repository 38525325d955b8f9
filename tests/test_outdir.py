"""Nothing lost: an output folder is owned by one run, another run's results are never deleted or
overwritten unless asked (``--overwrite``), and every output is written whole (``run/outdir.py``).

The runs go through the real command line in this process (``cli.main``) on the in-process backend,
two rounds of logreg on digits with three clients (a few seconds each).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling import cli
from flwr_scaling.run import checkpoint as checkpoint_module
from flwr_scaling.run.checkpoint import load_checkpoint
from flwr_scaling.run.config import ConfigError, RunConfig
from flwr_scaling.run.inprocess import run_inprocess
from flwr_scaling.run.outdir import LOCK, atomic_file, claim_output, write_atomic

TINY = ["--backend", "inprocess", "--num-clients", "3", "--rounds", "2", "--model", "logreg", "--warmup-batches", "1"]


def cli_run(capsys, *args: str) -> tuple[int, str, str]:
    """``flwr-scaling ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A finished two-round run and its files, to copy into each test's folder."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cli.main(["run", *TINY, "--out", str(out)])
    return out, snapshot(out)


def copy_of(finished, folder: Path) -> dict[str, bytes]:
    _, files = finished
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def fail_late(monkeypatch) -> None:
    """The run passes every early check and fails once the server builds the model (as a model too
    large for the images does), after its folder is prepared."""
    import flwr_scaling.server_app as server_app

    def refuse(*args, **kwargs):
        raise ConfigError("the model does not fit the images (late check)")

    monkeypatch.setattr(server_app, "initial_model", refuse)


def interrupt_at_round(monkeypatch, stop_round: int) -> None:
    """The run "dies" (KeyboardInterrupt, as Ctrl-C) when round ``stop_round`` starts training."""
    import flwr_scaling.clients as clients

    app = clients.app

    def dying(message, context):
        if message.metadata.message_type == "train" and int(message.content["config"]["server-round"]) == stop_round:
            raise KeyboardInterrupt
        return app(message, context)

    monkeypatch.setattr(clients, "app", dying)


def test_finished_run_exists_so_fixture_is_complete(finished):
    _, files = finished
    assert set(files) == {"config.json", "metrics.csv", "checkpoint.npz", "partitions.png"}  # no .lock, no temp


def test_a_second_run_failing_late_leaves_the_finished_run_byte_identical(finished, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    files = copy_of(finished, out)
    fail_late(monkeypatch)
    code, stdout, stderr = cli_run(capsys, "run", *TINY, "--lr", "0.5", "--out", str(out))
    assert code == 2
    assert stderr == (f"flwr-scaling: error: output folder {out} holds the results of another run (config.json, "
                      f"metrics.csv, checkpoint.npz); choose another --out, continue it with --resume {out}, "
                      f"or pass --overwrite to replace them\n")
    assert snapshot(out) == files


def test_overwrite_that_fails_before_a_round_puts_the_old_run_back(finished, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    files = copy_of(finished, out)
    fail_late(monkeypatch)
    code, _, stderr = cli_run(capsys, "run", *TINY, "--lr", "0.5", "--out", str(out), "--overwrite")
    assert (code, stderr) == (2, "flwr-scaling: error: the model does not fit the images (late check)\n")
    assert snapshot(out) == files


def test_overwrite_replaces_the_old_run(finished, tmp_path, capsys):
    out = tmp_path / "run"
    copy_of(finished, out)
    code, stdout, _ = cli_run(capsys, "run", *TINY, "--lr", "0.5", "--out", str(out), "--overwrite")
    assert code == 0
    assert load_checkpoint(out).config["lr"] == 0.5
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "metrics.csv", "partitions.png"]


def test_a_run_failing_late_into_a_new_folder_creates_nothing(tmp_path, capsys, monkeypatch):
    fail_late(monkeypatch)
    code, _, stderr = cli_run(capsys, "run", *TINY, "--out", str(tmp_path / "new" / "deeper"))
    assert (code, stderr) == (2, "flwr-scaling: error: the model does not fit the images (late check)\n")
    assert os.listdir(tmp_path) == []


def test_a_run_into_a_folder_with_other_files_keeps_them(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine\n")
    fail_late(monkeypatch)
    code, _, _ = cli_run(capsys, "run", *TINY, "--out", str(tmp_path))
    assert code == 2
    assert snapshot(tmp_path) == {"notes.txt": b"mine\n"}


def test_a_busy_folder_fails_at_once_with_one_line_and_nothing_written(finished, tmp_path, capsys):
    out = tmp_path / "run"
    files = copy_of(finished, out)
    with open(out / LOCK, "w") as lock:  # as another process's claim does
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        code, stdout, stderr = cli_run(capsys, "run", *TINY, "--out", str(out), "--overwrite")
        assert (code, stdout) == (2, "")
        assert stderr == (f"flwr-scaling: error: {out} is in use by another run (pid 4242); wait for it to finish "
                          f"or choose another --out\n")
        assert snapshot(out) == {**files, LOCK: b"4242\n"}


def test_two_processes_cannot_claim_the_same_folder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from flwr_scaling.run.outdir import claim_output
            with claim_output({str(out)!r}):
                print("claimed", flush=True)
                sys.stdin.read()  # until the test closes our stdin
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "claimed\n"
        code, stdout, stderr = cli_run(capsys, "run", *TINY, "--out", str(out))
        assert (code, stdout) == (2, "")
        assert stderr == (f"flwr-scaling: error: {out} is in use by another run (pid {holder.pid}); wait for it to "
                          f"finish or choose another --out\n")
        assert os.listdir(out) == [LOCK]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert os.listdir(out) == []  # the holder ended well and took its lock file with it


def test_an_interrupted_run_keeps_its_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_round(patch, 2)
        code, _, stderr = cli_run(capsys, "run", *TINY, "--out", str(out))
    assert code == 130
    assert load_checkpoint(out).round == 1
    code, _, stderr = cli_run(capsys, "run", *TINY, "--out", str(out))  # not resumed: refused, and told how
    assert code == 2 and f"continue it with --resume {out}," in stderr
    code, stdout, _ = cli_run(capsys, "run", "--resume", str(out), "--backend", "inprocess")
    assert code == 0 and f"resuming {out} after round 1 of 2" in stdout
    assert load_checkpoint(out).round == 2
    assert sorted(os.listdir(out)) == ["checkpoint.npz", "config.json", "metrics.csv", "partitions.png"]


def test_overwrite_and_resume_exclude_each_other(finished, tmp_path, capsys):
    out = tmp_path / "run"
    files = copy_of(finished, out)
    code, _, stderr = cli_run(capsys, "run", "--resume", str(out), "--overwrite")
    assert (code, stderr) == (2, "flwr-scaling: error: --overwrite and --resume exclude each other: a resumed run "
                                 "keeps its folder's results\n")
    assert snapshot(out) == files


def test_the_runner_alone_refuses_another_runs_folder(finished, tmp_path):
    out = tmp_path / "run"
    files = copy_of(finished, out)
    with pytest.raises(ConfigError, match="holds the results of another run"):
        run_inprocess(RunConfig(out=str(out), num_clients=3, rounds=2, model="logreg"))
    assert snapshot(out) == files


def test_compare_refuses_a_folder_of_another_compare(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "summary.md").write_text("old summary\n")
    code, _, stderr = cli_run(capsys, "compare", "--configs", "fedavg", *TINY, "--out", str(out))
    assert (code, stderr) == (2, f"flwr-scaling: error: output folder {out} holds the results of another compare "
                                 f"(summary.md); choose another --out, or pass --overwrite to replace them\n")
    assert snapshot(out) == {"summary.md": b"old summary\n"}


# ----------------------------------------------------------------- atomic writes
def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.csv"
    write_atomic(target, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as handle:
            handle.write(b"half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.csv"]  # no temporary file left


def test_an_interrupted_checkpoint_write_leaves_the_old_checkpoint(finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    files = copy_of(finished, out)
    old = load_checkpoint(out)

    def savez_then_die(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.np, "savez", savez_then_die)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_module.save_checkpoint(out, old)
    assert snapshot(out) == files


def test_claim_removes_only_what_it_created(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError):
        with claim_output(tmp_path):
            write_atomic(tmp_path / "config.json", "{}\n")
            (tmp_path / "partitions.png").write_bytes(b"png")
            raise RuntimeError("failed before the first round")
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("999999\n")  # left by a killed run: the file is there, its flock died with it
    code, _, _ = cli_run(capsys, "run", *TINY, "--out", str(out))
    assert code == 0
    assert np.isfinite(load_checkpoint(out).rows[-1]["test_loss"])
    assert not (out / LOCK).exists()


# ----------------------------------------------------------------- sweeps
SWEEP = """\
backend = "inprocess"

[base]
rounds = 1
num-clients = 3
model = "logreg"

[grid]
seed = [0, 1]
"""


def test_a_second_sweep_on_a_busy_folder_fails_at_once(tmp_path, capsys):
    sweep_file, out = tmp_path / "s.toml", tmp_path / "out"
    sweep_file.write_text(SWEEP)
    out.mkdir()
    with open(out / LOCK, "w") as lock:  # as the first sweep's claim does
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        code, stdout, stderr = cli_run(capsys, "sweep", str(sweep_file), "--out", str(out))
    assert (code, stdout) == (2, "")
    assert stderr == (f"flwr-scaling: error: {out} is in use by another sweep (pid 4242); wait for it to finish "
                      f"or choose another --out\n")
    assert snapshot(out) == {LOCK: b"4242\n"}  # no sweep.json, no run folder


def test_a_sweep_keeps_finished_runs_of_another_configuration_unless_asked(tmp_path, capsys):
    sweep_file, out = tmp_path / "s.toml", tmp_path / "out"
    sweep_file.write_text(SWEEP)
    assert cli_run(capsys, "sweep", str(sweep_file), "--out", str(out))[0] == 0
    before = snapshot(out)
    sweep_file.write_text(SWEEP.replace("rounds = 1", "rounds = 2"))
    code, _, stderr = cli_run(capsys, "sweep", str(sweep_file), "--out", str(out))
    assert (code, stderr) == (2, f"flwr-scaling: error: sweep folder {out}: run seed=0 and 1 more finished with another "
                                 f"configuration than the sweep file's; choose another out, or pass --overwrite to run "
                                 f"them again\n")
    assert snapshot(out) == before
    assert cli_run(capsys, "sweep", str(sweep_file), "--out", str(out), "--overwrite")[0] == 0
    assert len(load_checkpoint(out / "runs" / "seed=0").rows) == 2
