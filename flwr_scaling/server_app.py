"""The ServerApp: one run of a configuration, writing ``config.json`` and ``metrics.csv``.

``app`` reads its configuration from Flower's run config (``flwr run .`` with
``[tool.flwr.app.config]`` and ``-c`` overrides); ``make_server_app(config)``
binds a configuration directly (the ``flwr-scaling`` driver).
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .arrays import numpy_to_record, numpy_to_torch, record_to_numpy, torch_to_numpy
from .config import ConfigError, RunConfig
from .data import load_federated_data
from .recorder import RunRecorder
from .seeding import derived_seed, initial_model
from .strategies import Savic
from .training import evaluate


def make_strategy(cfg: RunConfig) -> Savic:
    """The strategy for a resolved configuration (``fedavg`` is SAVIC with identity scaling)."""
    return Savic(
        precond=cfg.precond,
        precond_mode=cfg.precond_mode,
        precond_beta=cfg.precond_beta,
        precond_alpha=cfg.precond_alpha,
        precond_init=cfg.precond_init,
        server_lr=cfg.server_lr,
        sampling_seed=derived_seed(cfg.seed, 0x5A),
        fraction_train=cfg.clients_per_round / cfg.num_clients,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.clients_per_round,
        min_available_nodes=cfg.num_clients,
    )


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float) -> None:
    """Wait until ``needed`` nodes are connected; fail with one actionable line after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {connected} nodes connected after {timeout_s:g} s but num-clients is {needed}: start more "
                f"SuperNodes, or with `flwr run` pass --federation-config \"num-supernodes={needed}\" "
                f"or -c \"num-clients={connected}\""
            )
        time.sleep(0.5)


def run_server(grid: Grid, config: RunConfig) -> Savic:
    """Run every round of ``config`` on ``grid``; return the strategy (its state and history)."""
    cfg = config.resolved()
    wait_for_nodes(grid, cfg.num_clients, cfg.wait_for_nodes_s)
    data = load_federated_data(cfg.dataset, cfg.seed, cfg.eval_split)
    model = initial_model(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    test_x, test_y = data.test.tensors()
    strategy = make_strategy(cfg)
    recorder = RunRecorder(cfg.out, cfg.to_flower(), cfg.label())

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        model.load_state_dict(numpy_to_torch(record_to_numpy(arrays)))
        test_loss, test_accuracy = evaluate(model, test_x, test_y)
        if server_round == 0:
            recorder.initial(test_loss, test_accuracy)
        else:
            history = strategy.history[server_round]
            recorder.add({"round": server_round, "test_loss": test_loss, "test_accuracy": test_accuracy,
                          "train_loss": history.get("train_loss", float("nan")), **history})
        return MetricRecord({"test_loss": test_loss, "test_accuracy": test_accuracy})

    strategy.start(
        grid=grid,
        initial_arrays=numpy_to_record(torch_to_numpy(model.state_dict())),
        num_rounds=cfg.rounds,
        train_config=ConfigRecord(cfg.to_flower()),
        evaluate_fn=evaluate_fn,
    )
    return strategy


def make_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to ``config``, or reading Flower's run config when ``None``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config if config is not None else RunConfig.from_mapping(dict(context.run_config)))

    return server_app


app = make_server_app()
