"""Translate a run configuration into one client's training settings."""

from __future__ import annotations

from flwr_scaling.run.config import RunConfig
from flwr_scaling.core.local_sgd import TrainSettings
from flwr_scaling.methods import get_method


def train_settings(config: RunConfig) -> TrainSettings:
    cfg = config.resolved(check_files=False)  # settings only: a device need not hold the run's dataset
    return TrainSettings(
        rule=cfg.precond,
        mode=cfg.precond_mode,
        lr=cfg.lr,
        alpha=cfg.precond_alpha,
        beta=cfg.precond_beta,
        local_epochs=cfg.local_epochs,
        adam_beta1=cfg.adam_beta1,
        momentum=cfg.momentum,
        num_probes=cfg.precond_probes,
        proximal_mu=cfg.proximal_mu if get_method(cfg.strategy).proximal else 0.0,
    )
