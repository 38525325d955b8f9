"""Server momentum (--server-momentum): the heavy-ball step by hand, μ = 0 unchanged, resume bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_scaling.core.server_update import next_model, next_model_with_momentum
from flwr_scaling.run.config import ConfigError, RunConfig


def test_heavy_ball_step_by_hand():
    """x = 1, averages 3 then 4, η = 0.5, μ = 0.9:
    round 1: m = 0.9·0 + (3 − 1) = 2,         x = 1 + 0.5·2   = 2;
    round 2: m = 0.9·2 + (4 − 2) = 3.8,       x = 2 + 0.5·3.8 = 3.9."""
    x = {"w": np.array([1.0], dtype=np.float32)}
    x, m = next_model_with_momentum(x, {"w": np.array([3.0], dtype=np.float32)}, 0.5, 0.9, None)
    assert (m["w"][0], x["w"][0], x["w"].dtype) == (2.0, 2.0, np.float32)
    x, m = next_model_with_momentum(x, {"w": np.array([4.0], dtype=np.float32)}, 0.5, 0.9, m)
    assert m["w"][0] == pytest.approx(3.8) and x["w"][0] == pytest.approx(3.9)


def test_no_momentum_is_the_plain_server_step_bit_for_bit():
    rng = np.random.default_rng(0)
    current = {"w": rng.standard_normal(5).astype(np.float32)}
    average = {"w": rng.standard_normal(5).astype(np.float32)}
    for server_lr in (1.0, 0.3):
        model, velocity = next_model_with_momentum(current, average, server_lr, 0.0, None)
        assert velocity is None
        assert np.array_equal(model["w"], next_model(current, average, server_lr)["w"])


def test_server_momentum_is_checked():
    with pytest.raises(ConfigError, match=r"server-momentum must be in \[0.0, 1.0\), got 1.0"):
        RunConfig(server_momentum=1.0).resolved().validate()
    with pytest.raises(ConfigError, match="fedyogi has its own server optimizer"):
        RunConfig(strategy="fedyogi", server_momentum=0.5).resolved().validate()


def test_momentum_run_matches_the_serial_reference_and_resumes_bit_identically(tmp_path):
    """A Flower run with server momentum follows the serial loop; killed after round 2 and resumed from its
    checkpoint (which holds m), it ends exactly as the uninterrupted run."""
    from flwr_scaling.run.checkpoint import load_checkpoint
    from flwr_scaling.run.inprocess import run_inprocess
    from flwr_scaling.run.serial import run_serial
    from tests.test_precond_every import _StopAtRound

    common = dict(dataset="wine", model="logreg", rounds=4, num_clients=3, warmup_batches=1, precond="rmsprop",
                  server_lr=0.7, server_momentum=0.5, lr=0.01)
    whole = run_inprocess(RunConfig(out=str(tmp_path / "whole"), **common))
    serial, _ = run_serial(RunConfig(**common))
    assert [r["test_accuracy"] for r in whole] == pytest.approx([r.test_accuracy for r in serial])
    plain = run_inprocess(RunConfig(out=str(tmp_path / "plain"), **{**common, "server_momentum": 0.0}))
    assert load_checkpoint(tmp_path / "plain").server_velocity is None
    assert not np.array_equal(load_checkpoint(tmp_path / "plain").model["1.weight"],
                              load_checkpoint(tmp_path / "whole").model["1.weight"])
    assert len(plain) == 4

    cut = RunConfig(out=str(tmp_path / "cut"), **common)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(cut, client_app=_StopAtRound(3))
    checkpoint = load_checkpoint(tmp_path / "cut")
    assert checkpoint.round == 2 and checkpoint.server_velocity is not None
    resumed = run_inprocess(cut, resume=checkpoint)
    assert [r["test_accuracy"] for r in resumed] == [r["test_accuracy"] for r in whole]
    final, reference = load_checkpoint(tmp_path / "cut"), load_checkpoint(tmp_path / "whole")
    for key, value in reference.model.items():
        assert np.array_equal(final.model[key], value), key
    for key, value in reference.server_velocity.items():
        assert np.array_equal(final.server_velocity[key], value), key
