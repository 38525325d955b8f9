"""The optimality gap f(x) - f* of the convex logreg problem, against a hand-computed minimum."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.inprocess import run_inprocess
from flwr_scaling.run.objective import optimal_objective, optimality_gap

# One binary feature; at x = 0 three of four rows are class 0, at x = 1 three of four are class 1.
# Logistic regression can match both conditional frequencies exactly, so
# f* = -(3/4 ln 3/4 + 1/4 ln 1/4) (the entropy of 1/4), and the zero model (p = 1/2) has f = ln 2.
ROWS = [(0, 0)] * 3 + [(0, 1)] + [(1, 1)] * 3 + [(1, 0)]
F_STAR = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))


@pytest.fixture
def overlapping_csv(tmp_path):
    path = tmp_path / "overlap.csv"
    path.write_text("x,label\n" + "".join(f"{x},{y}\n" for x, y in ROWS * 5))  # 40 rows
    return str(path)


def _config(path: str, **options) -> RunConfig:
    return RunConfig(dataset=f"csv:{path}", test_path=path, model="logreg", partitioner="iid", num_clients=2,
                     **options).resolved()


def test_minimum_is_the_entropy_of_the_class_frequencies(overlapping_csv):
    spec = _config(overlapping_csv).data_spec()
    assert optimal_objective(spec) == pytest.approx(F_STAR, abs=1e-9)
    zero = {"1.weight": np.zeros((2, 1), np.float32), "1.bias": np.zeros(2, np.float32)}
    assert optimality_gap(zero, spec) == pytest.approx(math.log(2) - F_STAR, abs=1e-9)
    # The minimiser itself: tabular features are standardised (x = 0, 1 become -1, +1), and the logit
    # difference must be -ln 3 at x = -1 and +ln 3 at x = +1.
    best = {"1.weight": np.array([[-math.log(3)], [math.log(3)]], np.float32) / 2,
            "1.bias": np.zeros(2, np.float32)}
    assert optimality_gap(best, spec) == pytest.approx(0.0, abs=1e-7)


def test_logreg_runs_record_a_shrinking_gap_and_other_models_none(overlapping_csv, tmp_path):
    rows = run_inprocess(_config(overlapping_csv, rounds=4, lr=0.5, strategy="fedavg", out=str(tmp_path / "a")))
    gaps = [row["f_gap"] for row in rows]
    assert all(gap >= -1e-9 for gap in gaps)
    assert gaps[-1] < gaps[0] / 2, gaps
    mlp = run_inprocess(replace(_config(overlapping_csv, rounds=1, out=str(tmp_path / "b")), model="mlp"))
    assert math.isnan(mlp[0]["f_gap"])
    assert torch.get_default_dtype() == torch.float32  # the solver's float64 stays local
