"""experiments/make_report.py on a hand-made sweep: medians over all seeds, paired differences with their interval."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# seed -> accuracy per round; fedavg reaches 0.9 at rounds 2, 3 and never; savic is 0.1 ahead every round
FEDAVG = {0: [0.5, 0.9, 0.9], 1: [0.4, 0.8, 0.9], 2: [0.3, 0.6, 0.7]}
SAVIC = {seed: [round(a + 0.1, 10) for a in accs] for seed, accs in FEDAVG.items()}


@pytest.fixture
def report(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_report", ROOT / "experiments" / "make_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "results" / "digits-methods"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"grid": {"method": ["fedavg", "savic-adam-local"],
                                                            "seed": [0, 1, 2]}, "target-accuracy": 0.9}))
    columns = ["run", "method", "seed", "round", "test_accuracy", "bytes_down", "bytes_up", "client_acc_worst10",
               "f_gap"]
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for method, table, size in (("fedavg", FEDAVG, 1e6), ("savic-adam-local", SAVIC, 2e6)):
            for seed, accuracies in table.items():
                for number, accuracy in enumerate(accuracies, start=1):
                    writer.writerow([f"method={method},seed={seed}", method, seed, number, accuracy, size / 2,
                                     size / 2, "", ""])
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "TUNING", tmp_path / "tuning")
    return module


def test_the_methods_table_counts_never_and_pairs_the_seeds(report):
    out: list[str] = []
    report.section_methods("digits", out)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out if line.startswith("| fedavg") or
            line.startswith("| savic-adam-local |")}
    # fedavg: final 0.9 / 0.9 / 0.7 (0.833 ± 0.115); mean over rounds 0.767 / 0.700 / 0.533 (0.667 ± 0.120);
    # rounds to 0.9: 2, 3, never -> median 3, 2 of 3 reached; MB to 0.9 at 1 MB a round: 2, 3, inf -> 3.00
    assert rows["fedavg"] == "| fedavg | 3 | 0.833 ± 0.115 | 0.667 ± 0.120 | 3 (2/3) | 3.00 | 3.00 |"
    # savic (+0.1 every round): rounds to 0.9: 2, 2, never -> 2 (2/3); MB at 2 MB a round: 4, 4, inf -> 4.00
    assert rows["savic-adam-local"] == ("| savic-adam-local | 3 | 0.933 ± 0.115 | 0.767 ± 0.120 | 2 (2/3) | 4.00 "
                                        "| 6.00 |")
    paired = [line for line in out if line.startswith("| Dirichlet 0.5 | savic-adam-local − fedavg")]
    # every seed 0.1 better in both measures: the interval is that one value, and it excludes 0
    assert paired == ["| Dirichlet 0.5 | savic-adam-local − fedavg | 3 | +0.100 [+0.100, +0.100] better | "
                      "+0.100 [+0.100, +0.100] better |"]


def test_a_sweep_not_run_yet_says_so(report):
    out: list[str] = []
    report.section_epochs("digits", out)
    assert out == ["### digits + CNN, 10 clients", "", "*Not run yet.*", ""]
