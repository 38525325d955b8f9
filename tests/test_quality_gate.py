"""Quality gate on the default problem (digits, CNN, 10 clients, Dirichlet 0.5, 30 rounds).

About 75 s on 2 cores (four simulations), so it is marked slow: `.ci/run`
runs it, the default `pytest` does not.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def final_accuracy(path: Path) -> float:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30
    return float(rows[-1]["test_accuracy"])


@pytest.mark.slow
def test_default_compare_meets_the_quality_gate(tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run(
        [str(BIN / "flwr-scaling"), "compare", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fedavg = final_accuracy(out / "fedavg" / "metrics.csv")
    assert fedavg >= 0.85
    for label in ("savic-adam-global", "savic-adam-local", "savic-oasis-global"):
        assert final_accuracy(out / label / "metrics.csv") >= fedavg - 0.05, label
    summary = (out / "summary.md").read_text()
    assert summary.count("| savic-") == 3 and "| fedavg |" in summary
    assert (out / "accuracy.png").stat().st_size > 10_000
