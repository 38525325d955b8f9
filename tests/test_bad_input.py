"""Bad input to ``flwr-scaling run`` and ``compare`` stops the command before anything runs.

Every case runs the real command line (``python -m flwr_scaling ARGS``) in its
own process, with ``--out DIR/out`` and ``cwd=DIR``, and must end with exit
status 2, exactly one line on stderr that starts with ``flwr-scaling: error: ``
and says what is wrong, nothing on stdout, no ``DIR/out`` and no new file in
``DIR``.

A fresh Python that imports torch costs about 1.5 s of CPU, 80 cases about two
minutes on 2 cores. So on Linux the module fixture starts one helper process
(this file, run as a script) that imports ``flwr_scaling.cli`` once and then
forks one child per case, which runs ``flwr_scaling/__main__.py`` exactly as
``python -m flwr_scaling`` does; the cases in ``REAL`` still start a fresh
interpreter each, so that the whole path (start-up, import-time warnings on
stderr) stays covered. ``FLWR_SCALING_TEST_FORK=0`` runs every case in a fresh
interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

PREFIX = "flwr-scaling: error: "
TIMEOUT_S = 120  # a case that gets past validation starts Ray; stop it here
WORKERS = max(2, min(8, (os.cpu_count() or 2) + 1))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
USE_FORK = sys.platform.startswith("linux") and os.environ.get("FLWR_SCALING_TEST_FORK", "1") != "0"
# Run in a fresh interpreter even with the fork helper: one per kind of error path.
REAL = {"strategy-unknown", "option-without-value", "toml-key-typo", "compare-target-text", "dirichlet-impossible"}


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{d}" is replaced by the case's folder
    expect: str  # a fragment of the error line
    absent: str | None = None  # a fragment the error line must not have
    files: dict[str, str | bytes] = field(default_factory=dict)  # created in the folder before the run
    setup: Callable[[Path], None] | None = None

    def argv(self, folder: Path) -> list[str]:
        command, *rest = self.args
        # --out comes first, so that a case may give its own --out (argparse keeps the last one)
        return [command, "--out", str(folder / "out"), *(arg.replace("{d}", str(folder)) for arg in rest)]


def run(id: str, *args: str, expect: str, **kwargs) -> Case:
    return Case(id, ("run", *args), expect, **kwargs)


def compare(id: str, *args: str, expect: str, **kwargs) -> Case:
    return Case(id, ("compare", *args), expect, **kwargs)


def toml(id: str, text: str | bytes, expect: str, command: str = "run", **kwargs) -> Case:
    return Case(id, (command, "--config", "{d}/options.toml"), expect, files={"options.toml": text}, **kwargs)


def _unreadable(folder: Path) -> None:
    (folder / "options.toml").chmod(0)


CASES = [
    # ---------------------------------------------------------------- choices
    run("strategy-unknown", "--strategy", "fedavgg", expect="strategy: unknown value 'fedavgg'; did you mean 'fedavg'?"),
    run("strategy-empty", "--strategy", "", expect="strategy: unknown value ''; known: fedavg, savic"),
    run("precond-unknown", "--precond", "adamm", expect="precond: unknown value 'adamm'; did you mean 'adam'?"),
    run("precond-mode-unknown", "--precond-mode", "glob", expect="did you mean 'global'?"),
    run("precond-init-unknown", "--precond-init", "warm", expect="did you mean 'warmup'?"),
    run("precond-dtype-unknown", "--precond-dtype", "half", expect="precond-dtype: unknown value 'half'; known: float32, bfloat16, float16"),
    run("precond-dtype-typo", "--precond-dtype", "bfloat", expect="did you mean 'bfloat16'?"),
    run("dataset-unknown", "--dataset", "digit", expect="dataset: unknown value 'digit'; did you mean 'digits'?"),
    run("dataset-unknown-far", "--dataset", "mnist", expect="known: digits, breast_cancer, wine"),
    run("dataset-file-kind-unknown", "--dataset", "lbsvm:{d}/a9a", expect="unknown file kind 'lbsvm'; did you mean 'libsvm'?"),
    run("eval-split-unknown", "--eval-split", "valid", expect="did you mean 'validation'?"),
    run("model-unknown", "--model", "mpl", expect="model: unknown value 'mpl'; did you mean 'mlp'?"),
    Case("command-unknown", ("runn",), "argument command: invalid choice: 'runn'"),
    # ------------------------------------------------- option names (command line)
    run("option-typo", "--precond-alpah", "0.1", expect="did you mean --precond-alpha?"),
    run("option-underscore", "--local_epochs", "2", expect="did you mean --local-epochs?"),
    run("option-prefix", "--precond-al", "0", expect="unrecognized arguments: --precond-al"),
    run("option-without-value", "--lr", expect="argument --lr: expected one argument"),
    # ------------------------------------------------------------- numbers
    run("lr-zero", "--lr", "0", expect="lr must be a finite number > 0, got 0.0"),
    run("lr-negative", "--lr", "-1", expect="lr must be a finite number > 0, got -1.0"),
    run("lr-nan", "--lr", "nan", expect="lr must be a finite number > 0, got nan"),
    run("lr-inf", "--lr", "inf", expect="lr must be a finite number > 0, got inf"),
    run("lr-overflow", "--lr", "1e400", expect="lr must be a finite number > 0, got inf"),
    run("lr-text", "--lr", "abc", expect="lr must be a number, got 'abc'"),
    run("lr-bool", "--lr", "true", expect="lr must be a number, got 'true'"),
    run("server-lr-zero", "--server-lr", "0", expect="server-lr must be a finite number > 0"),
    run("precond-beta-one", "--precond-beta", "1", expect="precond-beta must be in [0.0, 1.0), got 1.0"),
    run("precond-beta-negative", "--precond-beta", "-0.1", expect="precond-beta must be in [0.0, 1.0), got -0.1"),
    run("precond-alpha-zero", "--precond-alpha", "0", expect="precond-alpha must be a finite number > 0, got 0.0"),
    run("adam-beta1-one", "--adam-beta1", "1.0", expect="adam-beta1 must be in [0.0, 1.0)"),
    run("momentum-negative", "--momentum", "-0.5", expect="momentum must be in [0.0, 1.0)"),
    run("dirichlet-alpha-zero", "--dirichlet-alpha", "0", expect="dirichlet-alpha must be a finite number > 0"),
    run("wait-for-nodes-zero", "--wait-for-nodes-s", "0", expect="wait-for-nodes-s must be a finite number > 0"),
    run("local-epochs-zero", "--local-epochs", "0", expect="local-epochs must be an integer >= 1, got 0"),
    run("batch-size-zero", "--batch-size", "0", expect="batch-size must be an integer >= 1, got 0"),
    run("precond-probes-zero", "--precond-probes", "0", expect="precond-probes must be an integer >= 1"),
    run("warmup-batches-text", "--warmup-batches", "four", expect="warmup-batches must be an integer, got 'four'"),
    run("checkpoint-every-negative", "--checkpoint-every", "-1", expect="checkpoint-every must be an integer >= 0"),
    run("precond-every-zero", "--precond-every", "0", expect="precond-every must be an integer >= 1, got 0"),
    run("precond-every-fraction", "--precond-every", "1.5", expect="precond-every must be an integer, got '1.5'"),
    run("rounds-zero", "--rounds", "0", expect="rounds must be an integer >= 1, got 0"),
    run("rounds-fraction", "--rounds", "2.5", expect="rounds must be an integer, got '2.5'"),
    run("rounds-bool", "--rounds", "true", expect="rounds must be an integer, got 'true'"),
    run("rounds-huge", "--rounds", "99999999999999999999", expect="rounds must be an integer <= 9223372036854775807"),
    run("num-clients-zero", "--num-clients", "0", expect="num-clients must be an integer >= 1, got 0"),
    run("num-clients-empty", "--num-clients", "", expect="num-clients must be an integer, got ''"),
    run("num-clients-huge", "--num-clients", "1000000000", expect="use at most 143 clients"),
    run("clients-per-round-zero", "--clients-per-round", "0", expect="clients-per-round must be an integer >= 1"),
    run("clients-per-round-above-num-clients", "--num-clients", "4", "--clients-per-round", "5",
        expect="clients-per-round (5) cannot exceed num-clients (4)"),
    run("min-successful-zero", "--min-successful-clients", "0", expect="min-successful-clients must be an integer >= 1"),
    run("min-successful-above-per-round", "--clients-per-round", "3", "--min-successful-clients", "4",
        expect="min-successful-clients (4) cannot exceed the clients per round (3)"),
    run("seed-negative", "--seed", "-1", expect="seed must be an integer >= 0, got -1"),
    run("seed-too-large", "--seed", "4294967296", expect="seed must be an integer in [0, 4294967295]"),
    run("seed-hex", "--seed", "0x10", expect="seed must be an integer, got '0x10'"),
    # ----------------------------------------------------------- combinations
    run("fedavg-with-adam", "--strategy", "fedavg", "--precond", "adam",
        expect="strategy 'fedavg' is a baseline and takes no preconditioner; use --strategy savic with --precond adam"),
    run("cnn-on-wine", "--model", "cnn", "--dataset", "wine", expect="model 'cnn' needs image data"),
    run("too-many-clients-for-split", "--num-clients", "200", "--dirichlet-alpha", "0.05",
        expect="cannot give every client 10 examples"),
    run("too-many-clients-for-validation-split", "--eval-split", "validation", "--num-clients", "120",
        expect="its 1149 training examples cannot give every client 10 examples; use at most 114"),
    run("dirichlet-impossible", "--num-clients", "100", "--dirichlet-alpha", "0.01",
        expect="a Dirichlet split of 1437 examples into 100 clients with dirichlet-alpha 0.01 cannot give every client"),
    # -------------------------------------------------------- data files
    run("data-file-missing", "--dataset", "csv:{d}/missing.csv", expect="missing.csv does not exist or is not a file"),
    run("test-path-for-bundled-data", "--test-path", "{d}/test.csv", expect="test-path is only for file datasets",
        files={"test.csv": "a,label\n1,0\n"}),
    run("data-file-without-label-column", "--dataset", "csv:{d}/data.csv", "--num-clients", "2",
        expect="no label column 'label'", files={"data.csv": "a,b\n" + "1,0\n" * 40}),
    run("libsvm-garbled", "--dataset", "libsvm:{d}/bad.libsvm", "--num-clients", "2",
        expect="bad.libsvm:2: expected index:value, got 'x'", files={"bad.libsvm": "+1 1:1\n-1 2:1 x\n"}),
    run("idx-wrong-magic", "--dataset", "idx:{d}/mnist", "--num-clients", "2",
        expect="x-images-idx3-ubyte: offset 0: expected IDX magic 0x00000803 (images)",
        files={"mnist/x-images-idx3-ubyte": "not an idx file", "mnist/x-labels-idx1-ubyte": "nor this"}),
    run("label-column-empty", "--label-column", "", expect="label-column must name a column"),
    # ------------------------------------------------------------- TOML files
    run("toml-missing", "--config", "{d}/missing.toml", expect="missing.toml' does not exist or is not a file"),
    run("toml-is-a-folder", "--config", "{d}", expect="does not exist or is not a file"),
    pytest.param(
        # were it readable, it would fail on lr = 0 at once rather than start a run
        toml("toml-unreadable", "lr = 0\n", expect="cannot be read: Permission denied", setup=_unreadable),
        id="toml-unreadable",
        marks=pytest.mark.skipif(IS_ROOT, reason="root reads files without read permission"),
    ),
    toml("toml-invalid", "lr = = 0.1\n", expect="is not valid TOML: "),
    toml("toml-not-utf8", b"lr = 0.1 # caf\xe9\n", expect="is not UTF-8 text"),
    toml("toml-nested-table", "[run]\nlr = 0.1\n", expect="options must be top-level keys, found table [run]"),
    toml("toml-key-typo", "precond-alpah = 0.1\n", expect="unknown option 'precond-alpah'; did you mean 'precond-alpha'?"),
    toml("toml-key-underscore", "local_epochs = 2\n", expect="unknown option 'local_epochs'; did you mean 'local-epochs'?"),
    toml("toml-unknown-key", "colour = 'red'\n", expect="unknown option 'colour'"),
    toml("toml-lr-text", "lr = 'fast'\n", expect="lr must be a number, got 'fast'"),
    toml("toml-lr-array", "lr = [0.1]\n", expect="lr must be a number, got [0.1]"),
    toml("toml-rounds-bool", "rounds = true\n", expect="rounds must be an integer, got True"),
    toml("toml-batch-size-fraction", "batch-size = 32.5\n", expect="batch-size must be an integer, got 32.5"),
    toml("toml-precond-not-a-string", "precond = 3\n", expect="precond must be a string, got 3"),
    toml("toml-bad-value-out-of-range", "precond-beta = 1.5\n", expect="precond-beta must be in [0.0, 1.0), got 1.5"),
    toml("toml-precond-every-text", "precond-every = 'often'\n", expect="precond-every must be an integer, got 'often'"),
    Case("toml-overridden-by-command-line", ("run", "--config", "{d}/options.toml", "--lr", "0"),
         "lr must be a finite number > 0, got 0.0", files={"options.toml": "lr = 0.1\n"}),
    toml("compare-toml-per-configuration-option", "lr = 0.1\n", command="compare",
         expect="option 'lr' in {d}/options.toml is set per configuration here"),
    # ---------------------------------------------------------------- compare
    compare("compare-unknown-config", "--configs", "fedavg,savic-adamm-global",
            expect="unknown configuration 'savic-adamm-global'"),
    compare("compare-duplicate-configs", "--configs", "fedavg,savic-adam-local,fedavg",
            expect="--configs needs distinct configuration names"),
    compare("compare-empty-configs", "--configs", ",", expect="--configs needs distinct configuration names"),
    compare("compare-target-zero", "--target-accuracy", "0", expect="target-accuracy must be in (0, 1], got 0.0"),
    compare("compare-target-two", "--target-accuracy", "2", expect="target-accuracy must be in (0, 1], got 2.0"),
    compare("compare-target-text", "--target-accuracy", "x", expect="target-accuracy must be a number, got 'x'"),
    compare("compare-common-option", "--precond-beta", "1", expect="precond-beta must be in [0.0, 1.0)"),
    compare("compare-lr", "--lr", "0.1", expect="--lr", absent="did you mean --help"),
    compare("compare-precond", "--precond", "adam", expect="--precond", absent="ambiguous option"),
    # ---------------------------------------------------------- output folder
    Case("out-is-a-file", ("run", "--num-clients", "2", "--out", "{d}/afile"), "output folder",
         files={"afile": ""}),
    Case("out-under-a-file", ("compare", "--configs", "fedavg", "--num-clients", "2", "--out", "{d}/afile/sub"),
         "output folder", files={"afile": ""}),
]


def _case(param) -> Case:
    return param.values[0] if hasattr(param, "values") else param


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def _execute(case: Case, folder: Path) -> dict:
    """Run one case in a fresh interpreter."""
    command = [sys.executable, "-m", "flwr_scaling", *case.argv(folder)]
    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # this case's own process group (Ray, if it got that far)
        stdout, stderr = proc.communicate()
        stderr += f"\n[killed after {TIMEOUT_S} s: the bad input was not caught]"
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "how": "fresh interpreter"}


def _execute_forked(cases: list[Case], folders: dict[str, Path], io_dir: Path) -> dict[str, dict]:
    """Run ``cases`` through the fork helper (``_serve`` below); return their results by id."""
    jobs = [
        {"id": case.id, "args": case.argv(folders[case.id]), "cwd": str(folders[case.id]),
         "stdout": str(io_dir / f"{case.id}.out"), "stderr": str(io_dir / f"{case.id}.err")}
        for case in cases
    ]
    proc = subprocess.run(
        [sys.executable, __file__, "--serve"], input=json.dumps({"jobs": jobs, "workers": WORKERS, "timeout": TIMEOUT_S}),
        capture_output=True, text=True, timeout=TIMEOUT_S * (2 + len(jobs) // WORKERS),
    )
    codes = {}
    for line in proc.stdout.splitlines():
        reply = json.loads(line)
        codes[reply["id"]] = reply
    results = {}
    for job in jobs:
        if job["id"] not in codes:
            raise RuntimeError(f"the fork helper gave no result for {job['id']}; its stderr:\n{proc.stderr[-3000:]}")
        results[job["id"]] = {
            "returncode": codes[job["id"]]["returncode"],
            "stdout": Path(job["stdout"]).read_text(errors="replace"),
            "stderr": Path(job["stderr"]).read_text(errors="replace")
            + (f"\n[killed after {TIMEOUT_S} s: the bad input was not caught]" if codes[job["id"]]["killed"] else ""),
            "how": "forked from the helper",
            "wall_s": codes[job["id"]]["wall_s"],
        }
    return results


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[str, dict]:
    """Run every selected case (concurrently) and return, per case id, what its process did."""
    wanted = {
        item.callspec.id for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input" and hasattr(item, "callspec")
        and not any(mark.name == "skip" or (mark.name == "skipif" and mark.args and mark.args[0])
                    for mark in item.iter_markers())
    }
    cases = [c for c in map(_case, CASES) if c.id in wanted]
    folders, before = {}, {}
    for case in cases:
        folder = tmp_path_factory.mktemp(case.id, numbered=True)
        for name, content in case.files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        if case.setup:
            case.setup(folder)
        folders[case.id], before[case.id] = folder, _files(folder)
    fresh = [c for c in cases if c.id in REAL or not USE_FORK]
    forked = [c for c in cases if c not in fresh]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {case.id: pool.submit(_execute, case, folders[case.id]) for case in fresh}
        done = _execute_forked(forked, folders, tmp_path_factory.mktemp("bad-input-io")) if forked else {}
        done.update({key: future.result() for key, future in futures.items()})
    for key, result in done.items():
        result.update(folder=folders[key], before=before[key])
    slowest = sorted((key for key in done if "wall_s" in done[key]), key=lambda key: -done[key]["wall_s"])[:3]
    print(f"\n{len(cases)} bad-input cases in {time.perf_counter() - start:.1f} s "
          f"({len(fresh)} in a fresh interpreter, {len(forked)} forked; slowest forked: "
          + ", ".join(f"{key} {done[key]['wall_s']} s" for key in slowest) + ")")
    return done


@pytest.mark.parametrize("case", [c if hasattr(c, "values") else pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, results) -> None:
    result = results[case.id]
    folder: Path = result["folder"]
    stderr: str = result["stderr"]
    lines = stderr.splitlines()
    expect = case.expect.replace("{d}", str(folder))
    assert result["returncode"] == 2, f"exit status {result['returncode']} ({result['how']}); stderr:\n{stderr[-3000:]}"
    assert len(lines) == 1 and stderr.endswith("\n"), f"stderr is not one line:\n{stderr[-3000:]}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    if case.absent:
        assert case.absent not in lines[0], f"{case.absent!r} in {lines[0]!r}"
    assert result["stdout"] == "", f"stdout: {result['stdout'][-2000:]}"
    assert not (folder / "out").exists(), "the output folder was created"
    assert _files(folder) == result["before"], f"new files: {sorted(_files(folder) - result['before'])}"


def test_cases_are_distinct() -> None:
    cases = [_case(c) for c in CASES]
    assert len({c.id for c in cases}) == len(cases)
    assert len({c.args + tuple(sorted(c.files.items())) for c in cases}) == len(cases)
    assert len(cases) >= 35
    assert REAL <= {c.id for c in cases}


# ------------------------------------------------------------------ fork helper
def _child(job: dict) -> None:
    """In a forked child: run ``python -m flwr_scaling ARGS`` in the job's folder; never returns."""
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()  # its own process group, which the helper kills on timeout
        os.chdir(job["cwd"])
        sys.path[0] = os.getcwd()  # as `python -m` sets it
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.argv = ["-m", *job["args"]]
        try:
            runpy.run_module("flwr_scaling", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve() -> None:
    """Import the CLI once, then fork a child per job (``WORKERS`` at a time); one JSON line per finished job."""
    import flwr_scaling.cli  # noqa: F401  (what `python -m flwr_scaling` imports before it parses anything)

    request = json.load(sys.stdin)
    pending, running = list(request["jobs"]), {}
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < request["workers"]:
            job = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(job)
            running[pid] = [job, time.monotonic(), False]
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, entry in running.items():
                if not entry[2] and time.monotonic() - entry[1] > request["timeout"]:
                    entry[2] = True
                    try:
                        os.killpg(child, signal.SIGKILL)
                    except ProcessLookupError:
                        os.kill(child, signal.SIGKILL)
            time.sleep(0.005)
            continue
        job, started, killed = running.pop(pid)
        print(json.dumps({"id": job["id"], "returncode": os.waitstatus_to_exitcode(status), "killed": killed,
                          "wall_s": round(time.monotonic() - started, 2)}), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
