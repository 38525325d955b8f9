"""End to end on Flower's simulation engine (Ray): the CLI and `flwr run .`.

Each test starts Ray (about 10 s), so there are few of them; the logic is
tested in-process elsewhere.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:
    from .processes import kill_marked
except ImportError:  # tests run as top-level modules
    from processes import kill_marked

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REQUIRED_COLUMNS = [
    "round", "test_loss", "test_accuracy", "train_loss", "bytes_down", "bytes_up",
    "wall_s", "precond_min", "precond_max",
]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_three_clients_two_rounds(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "flwr-scaling"), "run", "--num-clients", "3", "--rounds", "2", "--precond", "adam",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out / "metrics.csv")
    assert [r["round"] for r in rows] == ["1", "2"]
    assert list(rows[0])[: len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    for row in rows:
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["precond_min"]) >= 1e-3  # D̂ >= alpha
        assert float(row["precond_max"]) >= float(row["precond_min"])
        assert row["clients_ok"] == "3" and row["clients_failed"] == "0"
    # Round 1 carries the warm-up (model down, statistic up) and then sends only the state, since the
    # clients keep x⁰ from the warm-up: the same bytes down as round 2, which sends model + state down
    # and gets model + statistic up from 3 clients (4 equal payloads each).
    assert int(rows[0]["bytes_down"]) == int(rows[1]["bytes_down"]) == int(rows[1]["bytes_up"])
    assert float(rows[1]["test_accuracy"]) > 0.3  # two rounds on digits already learn something
    assert (out / "partitions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the label heatmap
    config = json.loads((out / "config.json").read_text())
    assert config["precond"] == "adam" and config["lr"] == 0.003 and config["num-clients"] == 3
    assert config["precond-alpha"] == 1e-3 and config["model"] == "cnn"
    # one progress line per round (and one for the initial model)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[savic-adam-global] round")]
    assert len(progress) == 3 and "round 2/2" in progress[-1]


def _has_rows(path: Path, count: int) -> bool:
    return path.exists() and len(read_rows(path)) >= count


def readme_flwr_run_block() -> str:
    """The README's `flwr run .` commands, as a user copies them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("As a Flower App, the repository also runs with `flwr run`:")
    block = text[text.index("```bash\n", start) + len("```bash\n"):]
    return block[: block.index("```")]


@pytest.mark.slow
def test_the_readme_flwr_run_command_works_as_copied(tmp_path):
    """The README's commands with a bare PATH (no venv on it), only FLWR_HOME, RAY_TMPDIR and the
    output folder moved into the test's folders; Flower's default federation (2 SuperNodes) and
    num-clients = "auto"; the documented stop leaves nothing running."""
    home = tmp_path / "flwr-home"
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    out = tmp_path / "flwr-out"
    block = readme_flwr_run_block()
    assert block.count("$PWD/.flwr") == 1 and block.count("RAY_TMPDIR=/tmp/ray ") == 1
    assert block.count('-c "precond=\'rmsprop\' rounds=10"') == 1
    script = (block.replace("$PWD/.flwr", str(home)).replace("RAY_TMPDIR=/tmp/ray ", f"RAY_TMPDIR={ray_tmp} ")
              .replace('-c "precond=\'rmsprop\' rounds=10"', f'-c "precond=\'rmsprop\' rounds=10 out=\'{out}\'"'))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLWR_", "RAY_", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/bin:/bin"  # a fresh shell: the venv is not on PATH
    try:
        proc = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=600,
                              cwd=ROOT, env=env)
        deadline = time.monotonic() + 30  # the SuperLink shuts down gracefully on SIGTERM
        while (left := subprocess.run(["pgrep", "-f", f"{home}/local-superlink/"], capture_output=True,
                                      text=True).stdout) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        kill_marked(f"FLWR_HOME={home}", signal.SIGTERM)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    assert left == "", f"still running after the README's stop: {left}"
    rows = read_rows(out / "metrics.csv")
    assert [r["round"] for r in rows] == [str(r) for r in range(1, 11)], log
    config = json.loads((out / "config.json").read_text())
    assert config["precond"] == "rmsprop" and config["num-clients"] == 2  # auto: Flower's two SuperNodes
    assert rows[-1]["clients_ok"] == "2"
    # No warning of ours reaches the user: the notices we cannot act on are silenced where they arise.
    # Flower 1.42's own notices, logged outside any app code: one on every run before the app is loaded,
    # and, on some runs, one per client actor that its runtime stops at shutdown.
    flower_notices = ("Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
                      "Manually terminating ClientAppActor")
    warned = [line for line in (proc.stdout + proc.stderr).splitlines()
              if ("WARNING" in line or "Warning" in line) and not any(n in line for n in flower_notices)]
    assert warned == []


def test_client_evaluation_every_second_round(tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [str(BIN / "flwr-scaling"), "run", "--num-clients", "3", "--rounds", "2", "--client-eval-every", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out / "metrics.csv")
    assert rows[0]["client_acc_mean"] == ""  # round 1: no client evaluation
    mean, std, worst = (float(rows[1][k]) for k in ("client_acc_mean", "client_acc_std", "client_acc_worst10"))
    assert 0.0 <= worst <= mean <= 1.0 and std >= 0.0
    assert rows[1]["clients_ok"] == "3"


def test_make_certs_and_node_key_commands(tmp_path):
    from cryptography import x509

    for args in (["make-certs", "--host", "server.example.org", "--host", "10.0.0.7", "--out", str(tmp_path / "c")],
                 ["make-node-key", "--name", "n1", "--out", str(tmp_path / "k")]):
        proc = subprocess.run([str(BIN / "flwr-scaling"), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.example.org" in names.get_values_for_type(x509.DNSName)
    assert (tmp_path / "k" / "n1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
