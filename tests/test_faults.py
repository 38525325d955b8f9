"""Faulty clients in a real simulation cannot poison the model or the preconditioner.

Nine of twelve clients each inject a different fault (flwr_scaling.testing);
the run must complete, reject exactly those replies every round, and end with
the same model as a run in which those nine clients simply raise, which in
turn matches the serial reference without their contribution.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.run.checkpoint import load_checkpoint
from flwr_scaling.data.federated import load_federated_data
from flwr_scaling.core.seeding import initial_model
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.serial import run_serial
from flwr_scaling.run.simulation import simulate
from flwr_scaling.testing import FAULTS, faulty_client_app

FAULTY = {partition: fault for partition, fault in enumerate(FAULTS, start=1)}  # partitions 1..9
BASE = RunConfig(num_clients=12, rounds=2, precond="adam", dirichlet_alpha=1.0)


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    faulty = replace(BASE, out=str(base / "faulty"))
    raising = replace(BASE, out=str(base / "raising"))
    simulate(faulty, client_app=faulty_client_app(FAULTY))
    simulate(raising, client_app=faulty_client_app({p: "raise" for p in FAULTY}))
    return base


@pytest.mark.slow
def test_every_fault_is_rejected_and_the_run_completes(runs):
    rows = metrics(runs / "faulty")
    assert [r["round"] for r in rows] == ["1", "2"]
    assert all(r["clients_ok"] == "3" and r["clients_failed"] == "9" for r in rows)
    checkpoint = load_checkpoint(runs / "faulty")
    assert all(np.isfinite(v).all() for v in checkpoint.model.values())
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in checkpoint.precond_state.values())


@pytest.mark.slow
def test_faulty_replies_leave_the_same_result_as_absent_ones(runs):
    faulty, raising = load_checkpoint(runs / "faulty"), load_checkpoint(runs / "raising")
    for key in raising.model:
        assert np.array_equal(faulty.model[key], raising.model[key]), key
    for key in raising.precond_state:
        assert np.array_equal(faulty.precond_state[key], raising.precond_state[key]), key
    assert [r["test_accuracy"] for r in metrics(runs / "faulty")] == [r["test_accuracy"] for r in metrics(runs / "raising")]


@pytest.mark.slow
def test_result_matches_the_serial_reference_without_the_faulty_clients(runs):
    _, model = run_serial(BASE, exclude=frozenset(FAULTY))
    simulated = load_checkpoint(runs / "raising").model
    for key, value in model.items():
        # Flower averages in float32, the reference in float64: equal to float32 rounding.
        np.testing.assert_allclose(simulated[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_too_few_good_replies_fail_the_round_and_change_nothing(tmp_path):
    cfg = replace(BASE, rounds=2, min_successful_clients=4, out=str(tmp_path / "strict"))
    simulate(cfg, client_app=faulty_client_app(FAULTY))
    rows = metrics(tmp_path / "strict")
    assert all(r["clients_ok"] == "3" and r["clients_failed"] == "9" for r in rows)
    initial_accuracy = rows[0]["test_accuracy"]
    assert all(r["test_accuracy"] == initial_accuracy for r in rows)  # the model never moved
    data = load_federated_data(cfg.data_spec())
    untouched = torch_to_numpy(initial_model("cnn", data.input_shape, data.num_classes, cfg.seed).state_dict())
    final = load_checkpoint(tmp_path / "strict").model
    for key, value in untouched.items():
        assert np.array_equal(final[key], value), key
