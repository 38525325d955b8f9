"""One line, every path: each subcommand given a bad file, folder, checkpoint or sweep folder stops with one line.

Where ``tests/test_bad_input.py`` walks the options of ``run`` and ``compare``,
this walks what a user points the commands at: damaged or edited checkpoints
given to ``run --resume``, paths no file system accepts (a path over 4095 bytes,
a 300-byte name) for every path option of every command, folders where a run or
a report writes a file, sweep folders with a missing, damaged or edited part
given to ``report``, sweep and TOML files that are not what they should be, and
key tools pointed at files. Every case must exit with its status (2: the input
is bad), print exactly one line on stderr that starts with
``flwr-scaling: error:`` and names the file (or option) and what is wrong, and
leave the working folder exactly as it was: no file created, deleted or changed.

The cases call ``flwr_scaling.cli.main`` in this process (fast); a few run
``python -m flwr_scaling`` in a fresh interpreter, so that the whole path from
start-up to exit status is covered too.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling import cli
from flwr_scaling.run.checkpoint import CHECKPOINT, Checkpoint, save_checkpoint
from flwr_scaling.run.config import RunConfig
from flwr_scaling.studies.sweep import run_sweep
from test_bad_input import PREFIX, _files  # the option walk's line prefix and folder listing
from test_sweep import SWEEP, FakeRunner

LONG = "p" * 5000  # a path over PATH_MAX (4095 bytes)
NAME = "n" * 300  # one name over NAME_MAX (255 bytes)
RUN = "runs/method=fedavg,seed=0"  # one run of the template sweep
REDO = "start the run again in a new folder (or restore a copy of the checkpoint)"


# ------------------------------------------------------------------ templates
def _config() -> dict:
    cfg = RunConfig(rounds=3, num_clients=2).resolved()
    return {RunConfig.key(name): getattr(cfg, name) for name in cfg.__dataclass_fields__}


def write_checkpoint(folder: Path, round_: int = 1) -> Path:
    """A checkpoint as ``save_checkpoint`` writes it (a stand-in model: the cases fail before it is used)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"round": r} for r in range(1, round_ + 1)]
    return save_checkpoint(folder, Checkpoint(round_, _config(), {"w": np.zeros(2, np.float32)}, None,
                                              random.Random(0).getstate(), rows))


def edit_meta(edit: Callable[[dict], object], drop: str | None = None) -> Callable[[Path], None]:
    """Setup: a checkpoint in ``ck/`` whose meta is ``edit``ed (``edit`` may return a replacement, bytes: as is), or whose
    entries starting with ``drop`` are left out."""
    def setup(folder: Path) -> None:
        path = write_checkpoint(folder / "ck")
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files if not (drop and key.startswith(drop))}
        if "meta" in arrays:
            meta = json.loads(str(arrays["meta"]))
            replaced = edit(meta)
            text = replaced.decode() if isinstance(replaced, bytes) else json.dumps(meta if replaced is None else replaced)
            arrays["meta"] = np.array(text)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    return setup


def without(meta: dict, key: str) -> None:
    del meta[key]


def raw_checkpoint(data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        path = write_checkpoint(folder / "ck")
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
    return setup


@pytest.fixture(scope="module")
def sweep_template(tmp_path_factory) -> Path:
    """A finished sweep folder (two methods, two seeds, fake runs), made once; each report case edits a copy."""
    base = tmp_path_factory.mktemp("sweep-template")
    (base / "study.toml").write_text(SWEEP.replace("seed = [0, 1, 2]", "seed = [0, 1]"))
    plots = pytest.MonkeyPatch()
    plots.setattr("flwr_scaling.studies.plots.plot_seed_groups", lambda groups, path, **kw: path.write_bytes(b"png"))
    try:
        run_sweep(base / "study.toml", base / "sweep", runner=FakeRunner(), stream=io.StringIO())
    finally:
        plots.undo()
    return base / "sweep"


def sweep_edit(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """Setup: a copy of the template sweep in ``sw/``, then ``edit(sw)``; the template comes in as ``_template``."""
    def setup(folder: Path) -> None:
        shutil.copytree(setup.template, folder / "sw")
        edit(folder / "sw")
    setup.needs_template = True
    return setup


def each_run(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda sweep: [edit(run) for run in (sweep / "runs").iterdir()]


def plan_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def change(sweep: Path) -> None:
        spec = json.loads((sweep / "sweep.json").read_text())
        replaced = edit(spec)
        (sweep / "sweep.json").write_text(json.dumps(spec if replaced is None else replaced))
    return change


def replace_by_folder(*names: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        for name in names:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            path.mkdir(parents=True)
    return change


def files(**content: str | bytes) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for name, data in content.items():
            path = folder / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for one in setups:
            one(folder)
    setup.needs_template = any(getattr(one, "needs_template", False) for one in setups)
    setup.template_users = [one for one in setups if getattr(one, "needs_template", False)]
    return setup


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: str  # a fragment of the error line
    setup: Callable[[Path], None] | None = None
    code: int = 2


def resume(id: str, setup, expect: str, *extra: str) -> Case:
    return Case(id, ("run", "--resume", "ck", *extra), expect, setup)


def report(id: str, edit: Callable[[Path], None], expect: str) -> Case:
    return Case(id, ("report", "sw"), expect, sweep_edit(edit))


CASES = [
    # ------------------------------------------------- damaged checkpoints (run --resume)
    resume("ck-garbage", raw_checkpoint(b"garbage" * 10), "ck/checkpoint.npz is damaged: byte 0: expected an .npz "
           "(zip) archive, got b'garb'"),
    resume("ck-zero-bytes", raw_checkpoint(b""), "ck/checkpoint.npz is damaged: byte 0: expected an .npz (zip) "
           "archive, got b''"),
    resume("ck-truncated", raw_checkpoint(lambda data: data[: len(data) // 2]), "ck/checkpoint.npz is damaged "
           "(truncated or garbled: "),
    resume("ck-last-byte-cut", raw_checkpoint(lambda data: data[:-1]), "(truncated or garbled: "),
    resume("ck-without-meta", edit_meta(lambda m: None, drop="meta"), "ck/checkpoint.npz is damaged: no 'meta' entry"),
    resume("ck-meta-not-json", edit_meta(lambda m: b"{not json"), "(truncated or garbled: "),
    resume("ck-meta-a-list", edit_meta(lambda m: [1, 2]), "its meta must be a JSON object, got list"),
    resume("ck-round-missing", edit_meta(lambda m: without(m, "round")), "meta field 'round' is missing"),
    resume("ck-round-text", edit_meta(lambda m: m.update(round="x")),
           "meta field 'round' must be an integer >= 1 (the finished rounds), got 'x'"),
    resume("ck-round-negative", edit_meta(lambda m: m.update(round=-1)),
           "meta field 'round' must be an integer >= 1 (the finished rounds), got -1"),
    resume("ck-round-zero", edit_meta(lambda m: m.update(round=0)), "meta field 'round' must be an integer >= 1"),
    resume("ck-round-fraction", edit_meta(lambda m: m.update(round=1.5)), "must be an integer >= 1 (the finished "
           "rounds), got 1.5"),
    resume("ck-round-bool", edit_meta(lambda m: m.update(round=True)), "must be an integer >= 1 (the finished rounds), "
           "got True"),
    resume("ck-config-a-list", edit_meta(lambda m: m.update(config=[1])),
           "meta field 'config' must be a JSON object of options, got list"),
    resume("ck-config-missing", edit_meta(lambda m: without(m, "config")), "meta field 'config' is missing"),
    resume("ck-config-wrong-type", edit_meta(lambda m: m["config"].update(lr="x")),
           "meta field 'config': lr must be a number, got 'x'"),
    resume("ck-config-unknown-option", edit_meta(lambda m: m["config"].update(colour="red")),
           "meta field 'config': unknown option 'colour'"),
    resume("ck-rows-a-number", edit_meta(lambda m: m.update(rows=5)),
           "meta field 'rows' must be a list of 1 metrics rows (one per finished round), got int"),
    resume("ck-rows-fewer-than-rounds", edit_meta(lambda m: m.update(round=2)),
           "meta field 'rows' must be a list of 2 metrics rows (one per finished round), got 1 entries"),
    resume("ck-sampler-a-number", edit_meta(lambda m: m.update(sampler_state=5)),
           "meta field 'sampler_state' must be a random.Random state"),
    resume("ck-sampler-too-short", edit_meta(lambda m: m.update(sampler_state=[3, [1, 2], None])),
           "meta field 'sampler_state' must be a random.Random state"),
    resume("ck-has-precond-missing", edit_meta(lambda m: without(m, "has_precond")),
           "meta field 'has_precond' is missing"),
    resume("ck-has-precond-text", edit_meta(lambda m: m.update(has_precond="yes")),
           "meta field 'has_precond' must be true or false, got 'yes'"),
    resume("ck-broadcast-version-negative", edit_meta(lambda m: m.update(broadcast_version=-3)),
           "meta field 'broadcast_version' must be null or an integer >= 0, got -3"),
    resume("ck-no-model", edit_meta(lambda m: None, drop="model/"), "ck/checkpoint.npz is damaged: it holds no model "
           "arrays"),
    resume("ck-a-folder", files(**{"ck/checkpoint.npz/x": "", "ck/keep": ""}),
           "ck/checkpoint.npz is a folder, where flwr-scaling writes a file"),
    resume("ck-folder-missing", None, "no checkpoint in ck: checkpoint.npz is missing"),
    resume("ck-other-option", lambda folder: write_checkpoint(folder / "ck"),
           "--lr 0.5 differs from the checkpoint's lr", "--lr", "0.5"),
    resume("ck-with-overwrite", lambda folder: write_checkpoint(folder / "ck"),
           "--overwrite and --resume exclude each other", "--overwrite"),
    Case("ck-metrics-csv-a-folder", ("run", "--resume", "ck"), "ck/metrics.csv is a folder, where flwr-scaling "
         "writes a file; remove or rename it", both(lambda folder: write_checkpoint(folder / "ck"),
                                                   replace_by_folder("ck/metrics.csv"))),
    # ---------------------------------------------------------- paths no file system accepts
    Case("run-out-too-long", ("run", "--out", LONG), "--out 'pppp"),
    Case("run-out-name-too-long", ("run", "--out", f"runs/{NAME}"), "has a name of 300 bytes ('nnnn"),
    Case("run-config-too-long", ("run", "--config", LONG), "is 5000 bytes long; a path may have at most 4095; choose a "
         "shorter path"),
    Case("run-config-name-too-long", ("run", "--config", NAME + ".toml"), "--config 'nnnn"),
    Case("run-dataset-too-long", ("run", "--dataset", f"csv:{LONG}"), "--dataset 'pppp"),
    Case("run-dataset-name-too-long", ("run", "--dataset", f"libsvm:data/{NAME}"), "--dataset 'data/nnnn"),
    Case("run-test-path-name-too-long", ("run", "--dataset", "csv:a.csv", "--test-path", NAME), "--test-path 'nnnn"),
    Case("run-resume-name-too-long", ("run", "--resume", NAME), "--resume 'nnnn"),
    Case("compare-out-name-too-long", ("compare", "--out", NAME), "--out 'nnnn"),
    Case("compare-config-too-long", ("compare", "--config", LONG), "--config 'pppp"),
    Case("sweep-file-too-long", ("sweep", LONG), "FILE 'pppp"),
    Case("sweep-file-name-too-long", ("sweep", NAME + ".toml", "--dry-run"), "FILE 'nnnn"),
    Case("sweep-out-name-too-long", ("sweep", "study.toml", "--out", NAME), "--out 'nnnn",
         files(**{"study.toml": SWEEP})),
    Case("report-dir-too-long", ("report", LONG), "DIR 'pppp"),
    Case("report-dir-name-too-long", ("report", NAME), "DIR 'nnnn"),
    Case("deploy-workdir-name-too-long", ("deploy-local", "--workdir", NAME), "--workdir 'nnnn"),
    Case("deploy-out-too-long", ("deploy-local", "--out", LONG), "--out 'pppp"),
    Case("certs-out-name-too-long", ("make-certs", "--host", "localhost", "--out", NAME), "--out 'nnnn"),
    Case("node-key-out-too-long", ("make-node-key", "--out", LONG), "--out 'pppp"),
    Case("node-key-name-too-long", ("make-node-key", "--name", NAME, "--out", "keys"), "--name 'nnnn"),
    # ------------------------------------------------- a folder where a file goes (run, compare, deploy)
    Case("run-metrics-csv-a-folder", ("run", "--out", "out"), "out/metrics.csv is a folder, where flwr-scaling "
         "writes a file", replace_by_folder("out/metrics.csv")),
    Case("run-config-json-a-folder", ("run", "--out", "out", "--overwrite"), "out/config.json is a folder",
         replace_by_folder("out/config.json")),
    Case("run-partitions-png-a-folder", ("run", "--out", "out"), "out/partitions.png is a folder",
         replace_by_folder("out/partitions.png")),
    Case("compare-summary-a-folder", ("compare", "--out", "cmp"), "cmp/summary.md is a folder",
         replace_by_folder("cmp/summary.md")),
    Case("compare-plot-a-folder", ("compare", "--out", "cmp"), "cmp/accuracy.png is a folder",
         replace_by_folder("cmp/accuracy.png")),
    Case("deploy-checkpoint-a-folder", ("deploy-local", "--out", "out"), "out/checkpoint.npz is a folder",
         replace_by_folder("out/checkpoint.npz")),
    # ------------------------------------------------------ sweep folders given to report
    Case("report-folder-missing", ("report", "nothing"), "nothing is not a folder"),
    Case("report-a-file", ("report", "afile"), "afile is not a folder", files(afile="x")),
    Case("report-not-a-sweep", ("report", "empty"), "empty is not a sweep folder: sweep.json is missing",
         files(empty__notes="x")),
    report("report-summary-a-folder", replace_by_folder("summary.md"), "sw/summary.md is a folder, where "
           "flwr-scaling writes a file; remove or rename it and run the command again"),
    report("report-results-a-folder", replace_by_folder("results.csv"), "sw/results.csv is a folder"),
    report("report-plot-a-folder", replace_by_folder("accuracy.png"), "sw/accuracy.png is a folder"),
    report("report-partitions-a-file", lambda sw: (sw / "partitions").write_text("x"),
           "sw/partitions is a file, where flwr-scaling writes a folder"),
    report("report-sweep-json-garbage", lambda sw: (sw / "sweep.json").write_text("{"),
           "sw/sweep.json is not a sweep description: Expecting property name"),
    report("report-sweep-json-a-list", lambda sw: (sw / "sweep.json").write_text("[]"),
           "sw/sweep.json is not a sweep description"),
    report("report-sweep-json-a-folder", replace_by_folder("sweep.json"), "sw is not a sweep folder: sweep.json is "
           "missing"),
    report("report-runs-not-a-list", plan_edit(lambda spec: spec.update(runs=5)), "sw/sweep.json is not a sweep "
           "description"),
    report("report-run-not-an-object", plan_edit(lambda spec: spec.update(runs=[1, 2])),
           "sw/sweep.json: runs[0] must be an object, got int; the file was edited or damaged"),
    report("report-run-without-name", plan_edit(lambda spec: [run.pop("name") for run in spec["runs"]] and None),
           "sw/sweep.json: runs[0] has no plain folder name (got None)"),
    report("report-run-name-outside", plan_edit(lambda spec: spec["runs"][1].update(name="../../x")),
           "sw/sweep.json: runs[1] has no plain folder name (got '../../x')"),
    report("report-run-without-values", plan_edit(lambda spec: spec["runs"][0].pop("values") and None),
           "sw/sweep.json: runs[0] has no 'values' for every grid key (method, seed)"),
    report("report-run-config-a-string", plan_edit(lambda spec: spec["runs"][0].update(config="x")),
           "sw/sweep.json: runs[0] has no 'config' object with its rounds"),
    report("report-runs-folder-missing", lambda sw: shutil.rmtree(sw / "runs"),
           "sw: no finished runs yet (0 of 4); nothing to report"),
    report("report-runs-folder-a-file", lambda sw: (shutil.rmtree(sw / "runs"), (sw / "runs").write_text("x")),
           "sw/runs is a file, where the sweep keeps its runs' folders"),
    report("report-metrics-garbage", each_run(lambda run: (run / "metrics.csv").write_bytes(b"garbage\x00\n1,2\n")),
           "no finished runs yet (0 of 4)"),
    report("report-metrics-empty", each_run(lambda run: (run / "metrics.csv").write_bytes(b"")),
           "no finished runs yet (0 of 4)"),
    report("report-metrics-not-utf8", each_run(lambda run: (run / "metrics.csv").write_bytes(b"\xff\xfe\x00x")),
           "no finished runs yet (0 of 4)"),
    report("report-metrics-missing-columns", each_run(lambda run: (run / "metrics.csv").write_text(
        "round\n1\n2\n3\n4\n")), "no finished runs yet (0 of 4)"),
    report("report-metrics-a-folder", each_run(replace_by_folder("metrics.csv")), "no finished runs yet (0 of 4)"),
    report("report-done-bad-json", each_run(lambda run: (run / "DONE").write_text("{bad")),
           "no finished runs yet (0 of 4); nothing to report (a run is finished when its folder has a DONE marker"),
    report("report-done-config-a-string", each_run(lambda run: (run / "DONE").write_text('{"config": "x"}')),
           "no finished runs yet (0 of 4)"),
    report("report-run-folders-files", each_run(lambda run: (shutil.rmtree(run), run.write_text("x"))),
           "no finished runs yet (0 of 4)"),
    # ----------------------------------------------------- TOML and sweep files, wrong types
    Case("compare-config-not-toml", ("compare", "--config", "o.toml"), "is not valid TOML", files(**{"o.toml": "= 1"})),
    Case("deploy-config-wrong-type", ("deploy-local", "--config", "o.toml"), "config file 'o.toml': rounds must be an integer, got 'x'",
         files(**{"o.toml": "rounds = 'x'\n"})),
    Case("run-config-binary", ("run", "--config", "o.toml"), "is not UTF-8 text", files(**{"o.toml": b"\x00\xff\xfe"})),
    Case("sweep-file-not-toml", ("sweep", "s.toml", "--dry-run"), "s.toml", files(**{"s.toml": "[grid\n"})),
    Case("sweep-file-missing", ("sweep", "s.toml", "--dry-run"), "s.toml"),
    Case("sweep-file-a-folder", ("sweep", "s.toml", "--dry-run"), "s.toml", files(**{"s.toml/x": ""})),
    Case("sweep-grid-not-a-list", ("sweep", "s.toml", "--dry-run"), "s.toml",
         files(**{"s.toml": "[grid]\nmethod = 'fedavg'\n"})),
    Case("sweep-base-wrong-type", ("sweep", "s.toml", "--dry-run"), "rounds must be an integer",
         files(**{"s.toml": "[base]\nrounds = 'many'\n[grid]\nseed = [0]\n"})),
    # ----------------------------------------------------------------- key tools, deploy
    Case("node-key-out-a-file", ("make-node-key", "--out", "afile"), "'afile' is not a folder", files(afile="x")),
    Case("certs-out-under-a-file", ("make-certs", "--host", "h", "--out", "afile/c"), "'afile' is not a folder",
         files(afile="x")),
    Case("node-key-name-with-separator", ("make-node-key", "--name", "../evil", "--out", "keys"), "../evil"),
    Case("deploy-nodes-zero", ("deploy-local", "--nodes", "0"), "--nodes must be >= 1, got 0"),
    Case("deploy-nodes-text", ("deploy-local", "--nodes", "two"), "--nodes must be an integer, got 'two'"),
]
# Run in a fresh interpreter as well: one per kind of error path.
FRESH = {"ck-truncated", "run-out-name-too-long", "report-runs-folder-a-file", "run-metrics-csv-a-folder"}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (``_files``) with its bytes (None for a folder)."""
    return {name: None if (folder / name).is_dir() else (folder / name).read_bytes() for name in _files(folder)}


def _prepare(case: Case, folder: Path, template: Path) -> None:
    for one in getattr(case.setup, "template_users", [case.setup]):
        if getattr(one, "needs_template", False):
            one.template = template
    if case.setup:
        case.setup(folder)


def _check(case: Case, code, stderr: str, stdout: str) -> None:
    lines = stderr.splitlines()
    assert code == case.code, f"exit status {code}; stderr:\n{stderr[-3000:]}"
    assert len(lines) == 1 and stderr.endswith("\n"), f"stderr is not one line:\n{stderr[-3000:]}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert case.expect in lines[0], f"{case.expect!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr and stdout == "", stdout


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_path(case: Case, tmp_path, monkeypatch, capsys, sweep_template) -> None:
    monkeypatch.chdir(tmp_path)
    _prepare(case, tmp_path, sweep_template)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(case.argv))
    captured = capsys.readouterr()
    _check(case, exit_info.value.code, captured.err, captured.out)
    after = _snapshot(tmp_path)
    assert after.keys() == before.keys(), (f"created: {sorted(after.keys() - before.keys())}, "
                                           f"deleted: {sorted(before.keys() - after.keys())}")
    assert [name for name in after if after[name] != before[name]] == [], "files changed"


@pytest.mark.parametrize("case", [c for c in CASES if c.id in FRESH], ids=sorted(FRESH, key=[c.id for c in CASES].index))
def test_every_path_in_a_fresh_interpreter(case: Case, tmp_path, sweep_template) -> None:
    _prepare(case, tmp_path, sweep_template)
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flwr_scaling", *case.argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    _check(case, proc.returncode, proc.stderr, proc.stdout)
    assert _snapshot(tmp_path) == before


def test_verbose_shows_the_traceback_before_the_line(tmp_path, monkeypatch, capsys) -> None:
    """``--verbose``, before or after the command's name, prints the traceback and then the same one line."""
    monkeypatch.chdir(tmp_path)
    raw_checkpoint(b"")(tmp_path)
    for argv in (["--verbose", "run", "--resume", "ck"], ["run", "--resume", "ck", "--verbose"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith("Traceback (most recent call last):"), err
        assert err.splitlines()[-1] == (f"{PREFIX}checkpoint ck/{CHECKPOINT} is damaged: byte 0: expected an .npz "
                                        f"(zip) archive, got b''; {REDO}")


def test_every_command_takes_verbose_and_a_runtime_failure_exits_1(tmp_path, monkeypatch, capsys) -> None:
    """Every subcommand accepts --verbose; an unexpected failure inside a command is one line with exit 1."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(cli.COMMANDS)
    for name, command in commands.items():
        assert "--verbose" in command.format_usage(), name

    def broken(args):
        raise OSError(28, "No space left on device", "out/metrics.csv")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"{PREFIX}'out/metrics.csv': No space left on device; check the folder's "
                                       f"permissions and free space, then run the command again\n")

    def bug(args):
        raise KeyError("x")

    monkeypatch.setitem(cli.COMMANDS, "report", bug)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"{PREFIX}unexpected KeyError: 'x'; run the command again with --verbose for "
                                       f"the traceback, and report it\n")


def test_cases_are_many_and_distinct() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 60
    assert {case.argv[0] for case in CASES} >= {"run", "compare", "sweep", "report", "deploy-local", "make-certs",
                                                "make-node-key"}


def test_a_checkpoint_of_another_model_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # A checkpoint whose meta is sound but whose arrays belong to another model (here a stand-in
    # {"w": [0, 0]} where the run's cnn goes): refused in one line naming the file, nothing written.
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ck"
    write_checkpoint(folder)
    before = sorted(path.name for path in folder.iterdir())
    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--resume", str(folder)])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"flwr-scaling: error: checkpoint {folder / CHECKPOINT} holds another model than this run's cnn "
        "(first difference: classifier.bias); resume it with the configuration it was written with, or start a new "
        "run in another folder"
    ]
    assert sorted(path.name for path in folder.iterdir()) == before
