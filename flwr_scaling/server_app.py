"""The ServerApp: one run of a configuration, writing ``config.json`` and ``metrics.csv``.

``app`` reads its configuration from Flower's run config (``flwr run .`` with
``[tool.flwr.app.config]`` and ``-c`` overrides); ``make_server_app(config)``
binds a configuration directly (the ``flwr-scaling`` driver).
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import INFO
from collections.abc import Iterator, Mapping

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from flwr_scaling.run.checkpoint import Checkpoint, save_checkpoint
from flwr_scaling.core.arrays import numpy_to_torch, torch_to_numpy
from flwr_scaling.protocol.records import numpy_to_record, record_to_numpy
from flwr_scaling.protocol.flower_adapter import log
from flwr_scaling.run.config import AUTO_CLIENTS, ConfigError, RunConfig
from flwr_scaling.methods import get_method
from flwr_scaling.data.federated import load_federated_data
from flwr_scaling.run.objective import optimality_gap
from flwr_scaling.run.notices import without_known_notices
from flwr_scaling.run.recorder import RunRecorder
from flwr_scaling.core.seeding import derived_seed, initial_model
from flwr_scaling.strategies import Savic
from flwr_scaling.strategies.fedopt import ServerOptimizer
from flwr_scaling.strategies.screening import ReplyScreen
from flwr_scaling.strategies.sampling import NodeSampler, assign_ranks
from flwr_scaling.clients.logic import model_keys
from flwr_scaling.core.rules import get_rule
from flwr_scaling.data.federated import partition_indices
from flwr_scaling.core.local_sgd import evaluate
from flwr_scaling.core.devices import resolve_device


NODE_INFO_MESSAGE_TYPE = f"{MessageType.QUERY}.node_info"


def make_strategy(cfg: RunConfig, example_bounds: Mapping[int, int] | None = None, **runtime) -> Savic | ServerOptimizer:
    """The strategy for a resolved configuration.

    ``savic`` and ``fedavg`` (SAVIC with identity scaling) as configured;
    ``fedprox`` and ``local-adam`` are FedAvg on the server (their difference
    is on the clients); ``fedadam``, ``fedyogi`` and ``fedadagrad`` are FedAvg
    followed by Flower's own server-optimizer step (eta = server-lr,
    tau = server-tau, Flower's beta_1 = 0.9 and beta_2 = 0.99). ``runtime``: the
    strategy's options known once the run has started (``node_order``, and
    ``precond_state``, ``sampler_state``, ``round_offset``, ``last_broadcast``
    when resuming). ``example_bounds``: the largest ``num-examples`` each node
    id may claim (``PartitionSizes``); the screen's other options are the
    configuration's (``screen-factor``, ``max-num-examples``, ``aggregation``,
    ``trim-fraction``).
    """
    # FedAvg's constructor warns that fraction_evaluate is 0: on purpose, the server evaluates centrally.
    with without_known_notices():
        return _build_strategy(cfg, example_bounds, **runtime)


def _build_strategy(cfg: RunConfig, example_bounds: Mapping[int, int] | None, **runtime) -> Savic | ServerOptimizer:
    # Samples among the connected nodes: a missing node costs one wait (wait-for-nodes-s), not one per round.
    sampler = NodeSampler(seed=derived_seed(cfg.seed, 0x5A), node_order=runtime.pop("node_order", None),
                          wait_s=cfg.wait_for_nodes_s, state=runtime.pop("sampler_state", None),
                          min_available=cfg.min_available_clients)
    common = dict(
        min_successful_clients=cfg.min_successful_clients,
        sampler=sampler,
        client_eval_every=cfg.client_eval_every,
        fraction_train=cfg.clients_per_round / cfg.num_clients,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.clients_per_round,
        min_available_nodes=cfg.num_clients,
        **runtime,
    )
    optimizer = get_method(cfg.strategy).server_optimizer
    common["screen"] = ReplyScreen(
        rule=get_rule(cfg.precond if optimizer is None else "identity"), screen_factor=cfg.screen_factor,
        max_num_examples=cfg.max_num_examples or None, example_bounds=example_bounds,
        aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction,
    )
    if optimizer is not None:
        return ServerOptimizer(optimizer=optimizer, eta=cfg.server_lr, tau=cfg.server_tau, eta_l=cfg.lr, **common)
    scaling = dict(
        precond=cfg.precond,
        precond_mode=cfg.precond_mode,
        precond_beta=cfg.precond_beta,
        precond_alpha=cfg.precond_alpha,
        precond_init=cfg.precond_init,
        precond_dtype=cfg.precond_dtype,
        precond_every=cfg.precond_every,
    )
    return Savic(server_lr=cfg.server_lr, server_momentum=cfg.server_momentum, **scaling, **common)


class PartitionSizes(Mapping[int, int]):
    """``{node id: size of its partition}`` for the nodes whose rank is a partition of this run.

    Each size is computed when it is first looked up: the screen asks only for
    the nodes that reply, and cutting all 1,000 partitions of a 1,000-node run
    up front took 1.2 s of its start-up (``benchmarks/scale.py``).
    """

    def __init__(self, cfg: RunConfig, node_order: Mapping[int, int]) -> None:
        self._spec = cfg.partition_spec()
        self._ranks = {node: rank for node, rank in node_order.items() if 0 <= rank < cfg.num_clients}
        self._sizes: dict[int, int] = {}

    def __getitem__(self, node: int) -> int:
        if node not in self._sizes:
            self._sizes[node] = len(partition_indices(self._spec, self._ranks[node]))  # KeyError: not a partition
        return self._sizes[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)


NODE_POLL_S = 0.05  # asking the grid for its node ids is cheap; a 0.5 s poll was 0.5 s of every simulation's start-up


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
        time.sleep(NODE_POLL_S)


NODE_SETTLE_S = 2.0  # with num-clients auto: the node count must hold this long before it is taken


def settled_node_count(grid: Grid, timeout_s: float, settle_s: float = NODE_SETTLE_S) -> int:
    """The number of connected nodes once it has stopped changing for ``settle_s`` (num-clients auto).

    Flower's simulation registers all its nodes at once, right after the
    ServerApp starts; real SuperNodes connect one by one. Fails with one line
    when no node connects within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    count, since = 0, time.monotonic()
    while True:
        now = time.monotonic()
        connected = len(list(grid.get_node_ids()))
        if connected != count:
            count, since = connected, now
        elif count and now - since >= settle_s:
            log(INFO, "num-clients auto: %d nodes connected; one partition each", count)
            return count
        if not count and now > deadline:
            raise ConfigError(f"no node connected after {timeout_s:g} s: start SuperNodes (num-clients is auto)")
        time.sleep(0.2)


def describe_nodes(grid: Grid, config: dict, timeout_s: float) -> dict[int, int]:
    """A distinct rank for every node, so that nodes are ranked the same in every run.

    A node's rank is the ``partition-id`` it was started with. In ``simulate``
    the grid knows them (``node_partitions``: the ``partition-id`` the runtime
    put in each node's config, which is what a node would answer); elsewhere
    every node is asked, all queries sent at once. A node that names none (a
    device with its own data and no ``partition-id``), does not answer, or
    names one another node holds gets the next free rank (``assign_ranks``,
    which logs every collision).
    """
    nodes = sorted(grid.get_node_ids())
    known = getattr(grid, "node_partitions", None)
    partitions = known(timeout_s) if callable(known) else None
    if partitions is not None and all(node in partitions for node in nodes):
        return assign_ranks({node: partitions[node] for node in nodes})
    content = RecordDict({"config": ConfigRecord(config)})
    queries = [Message(content=content, message_type=NODE_INFO_MESSAGE_TYPE, dst_node_id=node) for node in nodes]
    reported: dict[int, int | None] = dict.fromkeys(nodes)
    for reply in grid.send_and_receive(messages=queries, timeout=timeout_s):
        if not reply.has_error() and "metrics" in reply.content.metric_records:
            partition = reply.content["metrics"].get("partition-id")
            if isinstance(partition, int):
                reported[reply.metadata.src_node_id] = partition
    return assign_ranks(reported)


def run_server(grid: Grid, config: RunConfig, resume: Checkpoint | None = None, *,
               known_partitions: bool = True) -> Savic | ServerOptimizer:
    """Run every round of ``config`` on ``grid`` (from ``resume`` on, if given).

    ``known_partitions``: the nodes train on this run's demo partitions (a
    simulation), so each node's ``num-examples`` is bounded by its
    partition's size; otherwise by ``max-num-examples`` or the round's median.

    Returns the strategy (its preconditioner state and per-round history).
    """
    if config.num_clients == AUTO_CLIENTS:  # `flwr run .`: one client per node the federation started
        config = replace(config, num_clients=settled_node_count(grid, config.wait_for_nodes_s))
    cfg = config.resolved()
    # The central evaluation runs on this process's device (checked before waiting for nodes);
    # the arrays it sends are moved to the CPU first.
    device = resolve_device(cfg.device)
    flower_config = cfg.to_flower()
    wait_for_nodes(grid, cfg.num_clients, cfg.wait_for_nodes_s)
    data = load_federated_data(cfg.data_spec())
    model = initial_model(cfg.model, data.input_shape, data.num_classes, cfg.seed).to(device)
    test_x, test_y = (tensor.to(device) for tensor in data.test.tensors())
    # The clients build the model from these, so a device needs only its own data, not the run's dataset.
    client_config = {**flower_config, **model_keys(tuple(data.input_shape), data.num_classes)}
    runtime = {"node_order": describe_nodes(grid, client_config, cfg.wait_for_nodes_s)}
    recorder = RunRecorder(cfg.out, flower_config, cfg.label())
    done = 0
    initial = torch_to_numpy(model.state_dict())
    if resume is not None:
        done = resume.round
        initial = resume.model
        runtime.update(precond_state=resume.precond_state, sampler_state=resume.sampler_state, round_offset=done)
        if resume.broadcast_version is not None:
            runtime["last_broadcast"] = (resume.broadcast_version, resume.broadcast_state)
        if resume.server_velocity is not None:  # only Savic takes it (server-momentum > 0)
            runtime["server_velocity"] = resume.server_velocity
        recorder.restore(resume.rows)
    bounds = PartitionSizes(cfg, runtime["node_order"]) if known_partitions else None
    strategy = make_strategy(cfg, example_bounds=bounds, **runtime)

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        current = record_to_numpy(arrays)
        model.load_state_dict(numpy_to_torch(current))
        test_loss, test_accuracy = evaluate(model, test_x, test_y)
        true_round = server_round + done
        if server_round == 0:
            recorder.initial(true_round, test_loss, test_accuracy)
        else:
            history = strategy.history[true_round]
            gap = {"f_gap": optimality_gap(current, cfg.data_spec())} if cfg.model == "logreg" else {}
            recorder.add({"round": true_round, "test_loss": test_loss, "test_accuracy": test_accuracy, **history, **gap})
            every = cfg.checkpoint_every
            if every and (true_round % every == 0 or true_round == cfg.rounds):
                # With precond-every > 1 the clients may be using an older state than the server's.
                sent = strategy.broadcast if cfg.precond_every > 1 else None
                save_checkpoint(
                    cfg.out,
                    Checkpoint(true_round, flower_config, current, strategy.precond_state,
                               strategy.sampler_state, recorder.rows,
                               broadcast_version=sent[0] if sent else None, broadcast_state=sent[1] if sent else None,
                               server_velocity=getattr(strategy, "server_velocity", None)),
                )
        return MetricRecord({"test_loss": test_loss, "test_accuracy": test_accuracy})

    if cfg.rounds > done:
        strategy.start(
            grid=grid,
            initial_arrays=numpy_to_record(initial),
            num_rounds=cfg.rounds - done,
            train_config=ConfigRecord(client_config),
            evaluate_config=ConfigRecord(client_config),
            evaluate_fn=evaluate_fn,
        )
    return strategy


def make_server_app(config: RunConfig | None = None, resume: Checkpoint | None = None) -> ServerApp:
    """A ServerApp bound to ``config`` (and a checkpoint to resume from), or reading
    Flower's run config when ``config`` is ``None``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else RunConfig.from_mapping(dict(context.run_config))
        # Bound to a configuration: the flwr-scaling driver's simulation, whose nodes hold its partitions.
        run_server(grid, cfg, resume, known_partitions=config is not None)

    return server_app


app = make_server_app()
