"""Sweeps (flwr_scaling.studies.sweep): validation, the product and its folders, skipping and resuming, the report.

In-process and fast: a fake runner writes a deterministic metrics.csv from the
configuration instead of running Ray. One test runs a sweep in a subprocess and
kills it with SIGKILL.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import signal
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling.run.checkpoint import Checkpoint, save_checkpoint
from flwr_scaling.cli import parse_label
from flwr_scaling.run.config import ConfigError
from flwr_scaling.run.recorder import COLUMNS
from flwr_scaling.studies.sweep import DONE, load_sweep, run_name, run_sweep, write_sweep_report

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """\
target-accuracy = 0.8

[base]
rounds = 4
num-clients = 3

[grid]
method = ["fedavg", "savic-adam-global"]
seed = [0, 1, 2]
"""
# Run order: seed outermost.
NAMES = [f"method={m},seed={s}" for s in (0, 1, 2) for m in ("fedavg", "savic-adam-global")]


# ------------------------------------------------------------------ fakes
def fake_rows(cfg) -> list[dict[str, float]]:
    """accuracy = scale * (1 - 0.5**round): savic scale 0.9 + 0.05 seed, fedavg 0.6 + 0.05 seed.

    savic sends 0.4 MB per round with Γ/α = 10 * round; fedavg 0.2 MB with Γ/α = 1.
    """
    savic = cfg.strategy == "savic"
    scale = (0.9 if savic else 0.6) + 0.05 * cfg.seed
    side = 2e5 if savic else 1e5
    rows = []
    for r in range(1, cfg.rounds + 1):
        accuracy = scale * (1 - 0.5**r)
        rows.append({
            "round": r, "test_loss": 1 - accuracy, "test_accuracy": accuracy, "train_loss": 1.1 - accuracy,
            "bytes_down": side, "bytes_up": side, "wall_s": 0.01,
            "precond_min": 1e-3 if savic else 1.0, "precond_max": 1e-2 * r if savic else 1.0,
            "clients_ok": cfg.num_clients, "clients_failed": 0,
        })
    return rows


def write_fake_run(cfg, rows=None) -> list[dict[str, float]]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_flower(), indent=2, sort_keys=True) + "\n")
    rows = fake_rows(cfg) if rows is None else rows
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / "metrics.csv").write_text(buffer.getvalue())
    return rows


class FakeRunner:
    """Records the runs it is asked for; ``fail_on`` (1-based call) raises ``error`` instead."""

    def __init__(self, fail_on: int | None = None, error: BaseException | None = None, sleep: float = 0.0):
        self.calls: list[str] = []
        self.resumed: list[int | None] = []
        self.fail_on, self.error, self.sleep = fail_on, error, sleep

    def __call__(self, cfg, resume=None):
        self.calls.append(Path(cfg.out).name)
        self.resumed.append(None if resume is None else resume.round)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise self.error
        print("a round of chatter that belongs in log.txt")
        rows = write_fake_run(cfg)
        time.sleep(self.sleep)
        return rows


@pytest.fixture
def fast_plots(monkeypatch):
    """The run and skip tests need the tables, not the pictures (matplotlib takes most of a report's time)."""
    monkeypatch.setattr("flwr_scaling.studies.plots.plot_seed_groups", lambda groups, path, **kwargs: path.write_bytes(b"png"))


def sweep_file(tmp_path: Path, text: str = SWEEP, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(path: Path, out: Path, runner, **kwargs) -> str:
    stream = io.StringIO()
    run_sweep(path, out, runner=runner, stream=stream, **kwargs)
    return stream.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------- validation
BAD = [
    ("unknown-base-key", "[base]\nround = 3\n[grid]\nseed = [0]\n",
     "[base] unknown option 'round'; did you mean 'rounds'?"),
    ("unknown-grid-key", "[grid]\nsed = [0, 1]\n", "[grid] unknown option 'sed'; did you mean 'seed'?"),
    ("grid-not-a-list", "[grid]\nseed = 0\n", "[grid] seed must be a list of values, e.g. seed = [0], got 0"),
    ("grid-empty-list", "[grid]\nseed = []\n", "[grid] seed is an empty list; give at least one value"),
    ("out-in-base", "[base]\nout = \"x\"\n[grid]\nseed = [0]\n",
     "[base] out is not allowed: each run writes to OUT/runs/<name>; set the sweep's folder with a top-level out = \"...\""),
    ("out-in-grid", "[grid]\nout = [\"a\", \"b\"]\n",
     "[grid] out is not allowed: each run writes to OUT/runs/<name>; set the sweep's folder with a top-level out = \"...\""),
    ("grid-bad-type", "[grid]\nseed = [0, \"a\"]\n", "[grid] seed must be an integer, got 'a'"),
    ("grid-duplicate", "[grid]\ndirichlet-alpha = [1, 1.0]\n", "[grid] dirichlet-alpha lists 1.0 twice"),
    ("both-base-and-grid", "[base]\nseed = 1\n[grid]\nseed = [0, 1]\n",
     "'seed' is in both [base] and [grid]; keep it in one of them"),
    ("method-and-precond", "[base]\nprecond = \"adam\"\n[grid]\nmethod = [\"fedavg\"]\n",
     "[grid] method sets strategy, precond and precond-mode; remove 'precond' from [base]"),
    ("method-not-string", "[grid]\nmethod = [1]\n",
     "[grid] method values must be strings such as 'fedavg' or 'savic-adam-global', got 1"),
    ("top-level-run-option", "rounds = 3\n[grid]\nseed = [0]\n",
     "top-level key 'rounds' is a run option; put it in [base] (one value) or [grid] (a list)"),
    ("top-level-typo", "[grids]\nseed = [0]\n", "unknown top-level key 'grids'; did you mean 'grid'?"),
    ("no-grid", "[base]\nrounds = 3\n", "no [grid] table; list the values to sweep, e.g. [grid] seed = [0, 1, 2]"),
    ("target-out-of-range", "target-accuracy = 2\n[grid]\nseed = [0]\n", "target-accuracy must be a number in (0, 1], got 2"),
    ("out-not-a-string", "out = 3\n[grid]\nseed = [0]\n", "out must be a folder name (a non-empty string), got 3"),
    # Every combination is resolved and preflighted before the first one runs.
    ("bad-combination", "[base]\nnum-clients = 3\n[grid]\nclients-per-round = [2, 5]\nseed = [0, 1]\n",
     "run clients-per-round=5,seed=0: clients-per-round (5) cannot exceed num-clients (3)"),
]


@pytest.mark.parametrize("text, message", [(t, m) for _, t, m in BAD], ids=[i for i, _, _ in BAD])
def test_bad_sweep_files_stop_before_anything_runs(tmp_path, text, message):
    path = sweep_file(tmp_path, text)
    runner = FakeRunner()
    with pytest.raises(ConfigError) as caught:
        run_sweep(path, tmp_path / "out", runner=runner, stream=io.StringIO())
    assert str(caught.value) == f"{path}: {message}"
    assert runner.calls == [] and not (tmp_path / "out").exists()


def test_bad_method_label_has_the_label_error(tmp_path):
    path = sweep_file(tmp_path, "[grid]\nmethod = [\"fedavg\", \"savic-adam\"]\n")
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    with pytest.raises(ConfigError) as label:
        parse_label("savic-adam")
    assert str(caught.value) == f"{path}: [grid] method: {label.value}"


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^sweep file '.*nope\.toml' does not exist or is not a file$"):
        load_sweep(tmp_path / "nope.toml")
    path = sweep_file(tmp_path, "[grid\nseed = [0]\n")
    with pytest.raises(ConfigError, match=rf"^sweep file '{re.escape(str(path))}' is not valid TOML: "):
        load_sweep(path)


# ------------------------------------------------------ product and folders
def test_product_names_and_configs(tmp_path):
    text = """\
[base]
rounds = 3
num-clients = 3

[grid]
seed = [0, 1]
dirichlet-alpha = [0.1, 1]
method = ["fedavg", "savic-adam-local"]
"""
    sweep = load_sweep(sweep_file(tmp_path, text), tmp_path / "out")
    # Names: method first, other keys A-Z, seed last; runs: seed outermost.
    assert [r.name for r in sweep.runs] == [
        f"method={m},dirichlet-alpha={a},seed={s}"
        for s in (0, 1) for m in ("fedavg", "savic-adam-local") for a in ("0.1", "1.0")
    ]
    assert list(sweep.grid) == ["method", "dirichlet-alpha", "seed"]
    assert sweep.target == 0.9 and sweep.out == tmp_path / "out"
    local = next(r for r in sweep.runs if r.name == "method=savic-adam-local,dirichlet-alpha=1.0,seed=1")
    cfg = local.config
    assert (cfg.strategy, cfg.precond, cfg.precond_mode, cfg.dirichlet_alpha, cfg.seed) == ("savic", "adam", "local", 1.0, 1)
    assert (cfg.rounds, cfg.num_clients, cfg.lr) == (3, 3, 0.01)  # resolved: the method's default step size
    assert cfg.out == str(tmp_path / "out" / "runs" / local.name)
    assert not (tmp_path / "out").exists()  # loading writes nothing


def test_default_out_is_runs_slash_file_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(sweep_file(tmp_path, "[base]\nnum-clients = 3\n[grid]\nseed = [0]\n", "my-study.toml"))
    assert sweep.out == Path("runs/my-study")
    sweep = load_sweep(sweep_file(tmp_path, "out = \"elsewhere/x\"\n[grid]\nseed = [0]\n", "s.toml"))
    assert sweep.out == Path("elsewhere/x")


def test_run_names_are_file_system_safe_and_short():
    assert run_name({"method": "fedavg", "dataset": "a/b c", "seed": 0}) == "method=fedavg,dataset=a_b_c,seed=0"
    long = run_name({"dataset": "x" * 300})
    assert len(long) == 200 and long != run_name({"dataset": "x" * 299 + "y"})


# ------------------------------------------------------- running, skipping
def test_sweep_runs_every_combination_once_then_skips_them(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    runner = FakeRunner()
    text = run(path, out, runner)
    assert runner.calls == NAMES and runner.resumed == [None] * 6
    lines = text.splitlines()
    assert lines[0] == f"sweep {path}: 6 runs (simulation), 0 finished already, 6 to run; results in {out}/"
    for k, name in enumerate(NAMES, start=1):
        assert re.fullmatch(rf"\[{k}/6\] {re.escape(name)} \.\.\. done in \d+\.\d s \| elapsed \d+s \| ETA \d+s",
                            lines[k]), lines[k]
    assert lines[7].startswith("sweep finished: 6 runs (6 run now, 0 finished before) in ")
    for name in NAMES:
        folder = out / "runs" / name
        assert (folder / DONE).is_file() and (folder / "metrics.csv").is_file()
        assert "chatter" in (folder / "log.txt").read_text()  # the runner's output is not on the progress stream
    spec = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in spec["runs"]] == NAMES and spec["grid"] == {"method": ["fedavg", "savic-adam-global"],
                                                                            "seed": [0, 1, 2]}
    report = {name: (out / name).read_bytes() for name in ("results.csv", "summary.csv", "summary.md")}

    again = FakeRunner()
    text = run(path, out, again)
    assert again.calls == []
    assert text.count("finished already, skipped") == 6
    assert {name: (out / name).read_bytes() for name in report} == report


def test_runner_output_and_log_handlers_go_to_the_run_log(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path, SWEEP.replace("seed = [0, 1, 2]", "seed = [0]")), tmp_path / "out"
    logger = logging.getLogger("flwr_scaling.test_sweep.console")
    handler = logging.StreamHandler(sys.stderr)  # as Flower's console handler: bound to the terminal's stream
    logger.addHandler(handler)
    logger.propagate = False

    def chatty(cfg, resume=None):
        logger.warning("a warning from %s", Path(cfg.out).name)
        print("to stderr", file=sys.stderr)
        late = logging.getLogger("flwr_scaling.test_sweep.late")  # a handler made during the run
        late.handlers = [logging.StreamHandler(sys.stderr)]
        return write_fake_run(cfg)

    try:
        text = run(path, out, chatty)
        log = (out / "runs" / NAMES[0] / "log.txt").read_text()
        assert f"a warning from {NAMES[0]}" in log and "to stderr" in log
        assert "warning" not in text
        assert handler.stream is sys.stderr  # given back
        assert logging.getLogger("flwr_scaling.test_sweep.late").handlers[0].stream is sys.stderr  # not the closed log
    finally:
        logger.removeHandler(handler)
        logging.getLogger("flwr_scaling.test_sweep.late").handlers = []


def test_interrupted_sweep_restarts_with_the_missing_runs_only(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    first = FakeRunner(fail_on=3, error=KeyboardInterrupt())
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, out, runner=first, stream=stream)
    assert first.calls == NAMES[:3]
    assert stream.getvalue().splitlines()[-2:] == [
        f"[3/6] {NAMES[2]} ... interrupted",
        "sweep interrupted with 2 of 6 runs finished; run the same sweep again to continue "
        "(finished runs are kept and not repeated)",
    ]
    assert [(out / "runs" / n / DONE).exists() for n in NAMES[:3]] == [True, True, False]
    # A report of what is finished so far only reads.
    write_sweep_report(out)
    assert f"Not finished (4 of 6 runs): {', '.join(NAMES[2:])}" in (out / "summary.md").read_text()

    second = FakeRunner()
    text = run(path, out, second)
    assert second.calls == NAMES[2:]
    assert "[1/6] method=fedavg,seed=0 ... finished already, skipped" in text
    assert "Not finished" not in (out / "summary.md").read_text()


def test_runner_error_stops_the_sweep_and_the_rest_runs_later(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    with pytest.raises(RuntimeError, match="Ray fell over"):
        run(path, out, FakeRunner(fail_on=2, error=RuntimeError("Ray fell over")))
    runner = FakeRunner()
    run(path, out, runner)
    assert runner.calls == NAMES[1:]


def test_a_run_without_done_or_with_missing_rounds_is_rerun(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, FakeRunner())
    (out / "runs" / NAMES[3] / DONE).unlink()
    metrics = out / "runs" / NAMES[4] / "metrics.csv"
    metrics.write_text("\n".join(metrics.read_text().splitlines()[:3]) + "\n")  # 2 of 4 rounds
    runner = FakeRunner()
    run(path, out, runner)
    assert runner.calls == [NAMES[3], NAMES[4]] and runner.resumed == [None, None]
    assert len(read_csv(metrics)) == 4


def test_a_changed_configuration_reruns_and_a_runner_that_stops_early_fails(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, FakeRunner())
    path.write_text(SWEEP.replace("rounds = 4", "rounds = 5"))
    runner = FakeRunner()
    with pytest.raises(ConfigError, match=rf"run {re.escape(NAMES[0])} and 5 more finished with another configuration"):
        run(path, out, runner)  # finished runs are not replaced unless asked
    assert runner.calls == []
    run(path, out, runner, overwrite=True)
    assert runner.calls == NAMES  # DONE records the configuration: 4 rounds are not 5

    def short(cfg, resume=None):
        write_fake_run(cfg, fake_rows(cfg)[:2])

    (out / "runs" / NAMES[0] / DONE).unlink()
    with pytest.raises(RuntimeError, match=rf"run {re.escape(NAMES[0])} ended with 2 of 5 rounds in "):
        run(path, out, short)
    assert not (out / "runs" / NAMES[0] / DONE).exists()


def test_unfinished_run_resumes_from_a_checkpoint_of_the_same_configuration(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, FakeRunner())
    sweep = load_sweep(path, out)
    same, other = sweep.runs[1], sweep.runs[2]
    for run_, config in ((same, same.config.to_flower()), (other, {**other.config.to_flower(), "lr": 0.5})):
        folder = Path(run_.config.out)
        (folder / DONE).unlink()
        rows = fake_rows(run_.config)[:2]
        model = {"w": np.zeros(1, np.float32)}  # a checkpoint without model arrays is refused as damaged
        save_checkpoint(folder, Checkpoint(2, config, model, None, (3, (0,) * 625, None), rows))
    runner = FakeRunner()
    text = run(path, out, runner)
    assert runner.calls == [same.name, other.name]
    assert runner.resumed == [2, None]  # another configuration's checkpoint is not resumed, it is removed
    assert f"[2/6] {same.name} (resuming after round 2 of 4) ... done in" in text
    assert not (Path(other.config.out) / "checkpoint.npz").exists()


def test_sweep_killed_with_sigkill_loses_and_repeats_no_finished_run(tmp_path, fast_plots):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    pid = os.fork()  # a child with everything imported already: no interpreter start-up to wait for
    if pid == 0:
        try:
            run_sweep(path, out, runner=FakeRunner(sleep=0.3), stream=io.StringIO())
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 60
        while sum((out / "runs" / n / DONE).exists() for n in NAMES) < 2:
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the sweep did not finish two runs in 60 s"
            time.sleep(0.01)
        time.sleep(0.15)  # the third run has written metrics.csv and is still in the runner: no DONE yet
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    done = [n for n in NAMES if (out / "runs" / n / DONE).exists()]
    assert done == NAMES[:2]
    assert (out / "runs" / NAMES[2] / "metrics.csv").exists()
    runner = FakeRunner()
    run(path, out, runner)
    assert runner.calls == NAMES[2:]


# ------------------------------------------------------------------ report
def test_report_values_match_hand_computed_statistics(tmp_path):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, FakeRunner())

    results = read_csv(out / "results.csv")
    assert list(results[0]) == ["run", "method", "seed", *COLUMNS]
    assert len(results) == 6 * 4
    assert results[5] == {**results[5], "run": NAMES[1], "method": "savic-adam-global", "seed": "0", "round": "2"}

    summary = {row["method"]: row for row in read_csv(out / "summary.csv")}
    assert list(summary) == ["fedavg", "savic-adam-global"]
    savic, fedavg = summary["savic-adam-global"], summary["fedavg"]
    # savic: accuracy 0.9375 * (0.90, 0.95, 1.00) after round 4; reaches 0.8 in rounds 4, 3, 3 (0.4 MB per round).
    expected = {
        "final_accuracy_mean": 0.890625, "final_accuracy_std": 0.046875,
        "best_accuracy_mean": 0.890625, "best_accuracy_std": 0.046875,
        "rounds_to_target_mean": 10 / 3, "mb_to_target_mean": (1.6 + 1.2 + 1.2) / 3,
        "mb_total_mean": 1.6, "max_gamma_over_alpha": 40.0, "target_accuracy": 0.8, "lr": 0.003,
    }
    for key, value in expected.items():
        assert float(savic[key]) == pytest.approx(value, rel=1e-5), key
    assert (savic["seeds"], savic["n_seeds"], savic["reached_target"]) == ("0 1 2", "3", "3")
    # fedavg: 0.9375 * (0.60, 0.65, 0.70), never 0.8; 0.2 MB per round.
    assert float(fedavg["final_accuracy_mean"]) == pytest.approx(0.609375, rel=1e-5)
    assert float(fedavg["final_accuracy_std"]) == pytest.approx(0.046875, rel=1e-5)
    assert (fedavg["reached_target"], fedavg["rounds_to_target_mean"], fedavg["mb_to_target_mean"]) == ("0", "", "")
    assert float(fedavg["mb_total_mean"]) == pytest.approx(0.8) and float(fedavg["max_gamma_over_alpha"]) == 1.0

    markdown = (out / "summary.md").read_text()
    # Tuning score: scale * mean(1 - 0.5**r, r = 1..4) = scale * 0.765625; rounds and MB to 0.8 are medians over
    # all seeds (fedavg never: "> 4"; savic rounds 4, 3, 3 -> 3, MB 1.6, 1.2, 1.2 -> 1.2).
    assert float(savic["tuning_score_mean"]) == pytest.approx(0.95 * 0.765625, rel=1e-5)
    assert (savic["rounds_to_target_median"], fedavg["rounds_to_target_median"]) == ("3", "inf")
    assert "| method | lr | seeds | final acc | best acc | mean acc over rounds | rounds to 0.8 | MB to 0.8 |" in markdown
    assert "| fedavg | 0.4 | 3 | 0.609 ± 0.047 | 0.609 ± 0.047 | 0.498 ± 0.038 | > 4 (0/3) | - | 0.80 | 1 |" in markdown
    assert ("| savic-adam-global | 0.003 | 3 | 0.891 ± 0.047 | 0.891 ± 0.047 | 0.727 ± 0.038 | 3 (3/3) | 1.20 | 1.60 "
            "| 40 |") in markdown
    # Paired over seeds: savic − fedavg is 0.3 * 0.765625 in tuning score and 0.3 * 0.9375 in final accuracy
    # for every seed, so the bootstrap interval is that one value.
    assert "| - | savic-adam-global vs fedavg | 3 | +0.230 [+0.230, +0.230] | better |" in markdown
    assert "| - | savic-adam-global vs fedavg | 3 | +0.281 [+0.281, +0.281] | better |" in markdown
    for name in ("accuracy.png", "accuracy_vs_mb.png", "gamma_over_alpha.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "client_worst10.png").exists()  # no run evaluated its clients
    assert not list(out.glob(".*tmp*"))


def test_report_plots_the_worst_clients_when_runs_evaluated_them(tmp_path):
    class ClientEvalRunner(FakeRunner):
        def __call__(self, cfg, resume=None):
            rows = fake_rows(cfg)
            for row in rows:  # client evaluation every second round
                row["client_acc_worst10"] = row["test_accuracy"] - 0.1 if row["round"] % 2 == 0 else ""
            self.calls.append(Path(cfg.out).name)
            return write_fake_run(cfg, rows)

    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, ClientEvalRunner())
    assert (out / "client_worst10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_the_optimality_gap_worst_clients_and_collects_partition_heatmaps(tmp_path):
    """Runs with f_gap (logreg) and client evaluation: both summarised per method, the gap plotted,
    and one heatmap per distinct partition (the partition depends on the seed, not on the method)."""

    class GapRunner(FakeRunner):
        def __call__(self, cfg, resume=None):
            rows = fake_rows(cfg)
            for row in rows:  # gap 1/round (savic: half of it, plus 0.01 * seed); worst clients every 2nd round
                row["f_gap"] = (0.5 if cfg.strategy == "savic" else 1.0) / row["round"] + 0.01 * cfg.seed
                row["client_acc_worst10"] = 0.5 + 0.1 * cfg.seed if row["round"] % 2 == 0 else ""
            self.calls.append(Path(cfg.out).name)
            written = write_fake_run(cfg, rows)
            (Path(cfg.out) / "partitions.png").write_bytes(b"\x89PNG\r\n\x1a\n" + f"seed {cfg.seed}".encode())
            return written

    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, GapRunner())
    summary = {row["method"]: row for row in read_csv(out / "summary.csv")}
    # savic after round 4: 0.125 + (0, 0.01, 0.02) -> mean 0.135, std 0.01; worst clients 0.5, 0.6, 0.7.
    assert float(summary["savic-adam-global"]["final_gap_mean"]) == pytest.approx(0.135)
    assert float(summary["savic-adam-global"]["final_gap_std"]) == pytest.approx(0.01)
    assert float(summary["fedavg"]["final_gap_mean"]) == pytest.approx(0.26)
    assert float(summary["fedavg"]["final_worst10_mean"]) == pytest.approx(0.6)
    markdown = (out / "summary.md").read_text()
    assert "final f − f* | final worst-10 % client acc |" in markdown
    assert "| 0.135 ± 0.01 | 0.600 ± 0.100 |" in markdown
    assert (out / "optimality_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heatmaps = sorted(p.name for p in (out / "partitions").iterdir())
    assert heatmaps == [f"partitioner=dirichlet,dirichlet-alpha=0.5,num-clients=3,seed={s}.png" for s in (0, 1, 2)]
    assert (out / "partitions" / heatmaps[2]).read_bytes().endswith(b"seed 2")
    assert "partitions/partitioner=dirichlet,dirichlet-alpha=0.5,num-clients=3,seed=0.png" in markdown


def test_report_regenerated_from_the_same_results_is_byte_identical(tmp_path):
    path, out = sweep_file(tmp_path), tmp_path / "out"
    run(path, out, FakeRunner())
    names = ("results.csv", "summary.csv", "summary.md")
    before = {name: (out / name).read_bytes() for name in names}
    metrics_before = {n: (out / "runs" / n / "metrics.csv").stat().st_mtime_ns for n in NAMES}
    for name in (*names, "accuracy.png"):
        (out / name).unlink()
    write_sweep_report(out)
    assert {name: (out / name).read_bytes() for name in names} == before
    assert (out / "accuracy.png").is_file()
    assert {n: (out / "runs" / n / "metrics.csv").stat().st_mtime_ns for n in NAMES} == metrics_before


def test_report_of_a_folder_that_is_no_sweep(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a sweep folder: sweep\.json is missing"):
        write_sweep_report(tmp_path)



def test_compare_report_has_one_row_per_run_and_the_first_round_reaching_the_target(tmp_path, monkeypatch):
    """compare's summary.md goes through the sweep report's pipeline with one run per row; numbers by hand:
    run a reaches 0.8 in round 2 after 2 x (0.25 + 0.25) MB, 3 rounds are 1.5 MB; run b never does, 3 x 2 MB."""
    from flwr_scaling.studies.report import write_compare_report

    plotted = []
    monkeypatch.setattr("flwr_scaling.studies.report.plot_accuracy",
                        lambda runs, path, title, target: plotted.append((list(runs), path.name, title, target)))

    def rows(accuracies, side, low, high):
        return [{"round": r, "test_accuracy": a, "bytes_down": side, "bytes_up": side,
                 "precond_min": low, "precond_max": high} for r, a in enumerate(accuracies, start=1)]

    runs = {"a": rows([0.5, 0.85, 0.9], 2.5e5, 1.0, 1.0), "b": rows([0.2, 0.4, 0.6], 1e6, 0.01, 0.5)}
    write_compare_report(tmp_path, runs, {"a": 0.4, "b": 0.003}, 0.8, "digits, cnn, seed 0")
    assert (tmp_path / "summary.md").read_text() == (
        "# digits, cnn, seed 0\n\n"
        "| run | lr | final acc | best acc | first round >= 0.8 | MB to 0.8 | MB total | max Γ/α |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| a | 0.4 | 0.900 | 0.900 | 2 | 1.00 | 1.50 | 1 |\n"
        "| b | 0.003 | 0.600 | 0.600 | never | - | 6.00 | 50 |\n"
    )
    assert plotted == [(["a", "b"], "accuracy.png", "digits, cnn, seed 0", 0.8)]


# ---------------------------------------------------------- shipped sweeps
SHARED = ROOT.parent / "shared" / "data"
SHIPPED = sorted((ROOT / "experiments" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweep_files_are_valid_and_use_the_tuned_step_sizes(path, tmp_path, monkeypatch):
    """The study's sweeps load (data found, every run valid), run 5 seeds, and give each method the step
    sizes flwr-scaling tune chose for it on the validation split (the included <setting>-tuned.toml)."""
    if "shared/data" in path.read_text() and not SHARED.is_dir():
        pytest.skip("needs ../shared/data (a9a, MNIST)")
    monkeypatch.chdir(ROOT)  # the files name the data relative to the project root
    sweep = load_sweep(path, tmp_path / "out")
    assert sweep.backend == "inprocess"
    assert len(sweep.runs) % 5 == 0 and {r.config.seed for r in sweep.runs} == {0, 1, 2, 3, 4}
    included = tomllib.loads(path.read_text(encoding="utf-8"))["include"]
    chosen = tomllib.loads((path.parent / included).read_text(encoding="utf-8"))["method-options"]
    for run in sweep.runs:
        for key, value in chosen[run.values["method"]].items():
            assert getattr(run.config, key.replace("-", "_")) == value, (run.name, key)
