"""SAVIC: scaled Local SGD as a Flower Message-API strategy."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..aggregation import next_model, next_state, warmup_state
from ..arrays import content_bytes, numpy_to_record, record_views, weighted_average
from ..rules import diagonal_bounds, get_rule
from ..training import MODES
from .screening import describe, reply_problem

WARMUP_MESSAGE_TYPE = f"{MessageType.QUERY}.precond_stats"
INITS = ("warmup", "ones")


class Savic(FedAvg):
    """Scaled Local SGD (SAVIC): FedAvg plus a global diagonal preconditioner.

    Every round the strategy sends the global model and the preconditioner
    state ``v`` to the sampled clients, averages the returned models weighted
    by ``num-examples`` (FedAvg) and updates ``v`` from what the clients
    return: in ``global`` mode the weighted mean statistic ``s̄`` through the
    rule (``v ← update(v, s̄)``), in ``local`` mode the weighted mean of the
    clients' own states. With ``precond_init="warmup"`` it first asks the
    sampled clients for the statistic at the initial model and sets
    ``v⁰ = s̄``. Replies that raised or carry wrong, non-finite or impossible
    arrays are rejected and logged; they take no part in either average.

    Implementation of S. Chezhegov et al., "Local Methods with Adaptivity via
    Scaling", arXiv:2406.00846.

    Parameters
    ----------
    precond : str (default: "adam")
        Scaling rule: "identity", "adagrad", "rmsprop", "adam" or "oasis".
    precond_mode : str (default: "global")
        "global" (D̂ fixed on clients for a round; they return a statistic) or
        "local" (clients adapt D̂ every step; they return their state).
    precond_beta : float (default: 0.99)
        Moving-average factor of the state (rmsprop, adam, oasis).
    precond_alpha : float (default: 1e-3)
        Lower clip of the diagonal: D̂ = max(precond_alpha, D(v)).
    precond_init : str (default: "warmup")
        "warmup" (v⁰ = mean statistic at x⁰, one extra query round) or
        "ones" (v⁰ = 1: the first round is plain Local SGD).
    server_lr : float (default: 1.0)
        Server step size η: x ← x + η (mean(x_m) − x). 1.0 is FedAvg.
    min_successful_clients : int (default: 1)
        A round with fewer accepted replies leaves the model and the
        preconditioner unchanged and is recorded as failed.
    sampling_seed : int | None (default: None)
        Seed of the client sampler (Flower's default sampler is unseeded).
    client_eval_every : int (default: 0)
        Every that many rounds, every connected node evaluates the global model
        on its own held-out data; the round's history gets the mean, standard
        deviation and worst-10 % mean of the clients' accuracies. 0: never.
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training.
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes sampled for federated evaluation (0 skips it).
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before sampling.
    weighted_by_key : str (default: "num-examples")
        Metric whose value weights the averages.
    arrayrecord_key : str (default: "arrays")
        Key of the model ArrayRecord in messages.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages.
    precond_key : str (default: "precond")
        Key of the preconditioner-state ArrayRecord sent to clients.
    stats_key : str (default: "stats")
        Key of the statistic (or state) ArrayRecord in client replies.
    train_metrics_aggr_fn : callable | None (default: None)
        As in FedAvg.
    evaluate_metrics_aggr_fn : callable | None (default: None)
        As in FedAvg.
    """

    def __init__(  # pylint: disable=too-many-arguments,too-many-locals
        self,
        *,
        precond: str = "adam",
        precond_mode: str = "global",
        precond_beta: float = 0.99,
        precond_alpha: float = 1e-3,
        precond_init: str = "warmup",
        server_lr: float = 1.0,
        min_successful_clients: int = 1,
        sampling_seed: int | None = None,
        client_eval_every: int = 0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        precond_key: str = "precond",
        stats_key: str = "stats",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.rule = get_rule(precond)
        if precond_mode not in MODES:
            raise ValueError(f"precond_mode must be one of {MODES}, got {precond_mode!r}")
        if precond_init not in INITS:
            raise ValueError(f"precond_init must be one of {INITS}, got {precond_init!r}")
        if not 0.0 <= precond_beta < 1.0:
            raise ValueError(f"precond_beta must be in [0, 1), got {precond_beta}")
        if not precond_alpha > 0:
            raise ValueError(f"precond_alpha must be > 0, got {precond_alpha}")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.precond_mode = precond_mode
        self.precond_beta = precond_beta
        self.precond_alpha = precond_alpha
        self.precond_init = precond_init
        self.server_lr = server_lr
        self.min_successful_clients = min_successful_clients
        self.client_eval_every = client_eval_every
        # Seconds a round waits for missing nodes before it goes on without
        # them; None waits forever, as Flower's own sampler does.
        self.node_wait_s: float | None = None
        self.precond_key = precond_key
        self.stats_key = stats_key
        self.precond_state: dict[str, np.ndarray] | None = None
        self.history: dict[int, dict[str, float]] = {}
        self._sampler = random.Random(sampling_seed)
        # Rounds already done before this start() (a resumed run): Flower's
        # start() always counts from 1, clients and history see the true round.
        self.round_offset = 0
        # Optional stable rank of each node (e.g. its partition id): sampling
        # and the order of summation then do not depend on random node ids.
        self.node_order: dict[int, int] = {}
        self._timeout = 3600.0
        self._round: dict[str, float] = {}
        self._sent_arrays: ArrayRecord | None = None

    # ----------------------------------------------------------------- Flower API
    def summary(self) -> None:
        """Log the scaling settings, then FedAvg's."""
        log(INFO, "\t├──> Scaling (SAVIC):")
        log(INFO, "\t│\t├──Rule: %s | mode: %s | init: %s", self.rule.name, self.precond_mode, self.precond_init)
        log(INFO, "\t│\t├──beta: %g | alpha (D̂ >= alpha): %g", self.precond_beta, self.precond_alpha)
        log(INFO, "\t│\t├──Server step size: %g", self.server_lr)
        log(INFO, "\t│\t└──Keys: precond '%s' | stats '%s'", self.precond_key, self.stats_key)
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, **kwargs):
        """As FedAvg.start; the timeout also bounds the warm-up query."""
        self._timeout = timeout
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients, warm the preconditioner up if needed, send model and state."""
        self._round = {"bytes_down": 0, "bytes_up": 0}
        self._sent_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample_nodes(grid, self.fraction_train, self.min_train_nodes)
        config["server-round"] = server_round + self.round_offset
        if self.rule.has_state and self.precond_state is None and self.precond_init == "warmup":
            self._warm_up(node_ids, arrays, config, grid)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self.precond_state is not None:
            record[self.precond_key] = numpy_to_record(self.precond_state)
        low, high = self.precond_bounds()
        self._round.update(precond_min=low, precond_max=high)
        messages = self._construct_messages(record, node_ids, MessageType.TRAIN)
        self._round["bytes_down"] += sum(content_bytes(m.content) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, average models (FedAvg) and update the preconditioner."""
        server_round += self.round_offset
        replies = list(replies)
        self._round["bytes_up"] += sum(content_bytes(m.content) for m in replies if not m.has_error())
        # A fixed order of summation makes the float averages identical from run to run.
        accepted = sorted(self._screen(replies, stats_layout=self._stats_layout()), key=self._reply_order)
        failed = len(replies) - len(accepted)
        arrays, metrics = None, None
        if len(accepted) >= max(1, self.min_successful_clients):
            weights = [self._weight(m) for m in accepted]
            # Views of the serialised bytes: nothing is copied until the averages.
            payloads = [record_views(m.content.pop(self.stats_key)) for m in accepted if self.rule.has_state]
            models = [record_views(m.content[self.arrayrecord_key]) for m in accepted]
            self._check_and_log_replies(accepted, is_train=True)
            average = weighted_average(models, weights)
            if self.server_lr != 1.0 and self._sent_arrays is not None:
                average = next_model(record_views(self._sent_arrays), average, self.server_lr)
            arrays = numpy_to_record(average)
            metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
            if payloads:
                self.precond_state = next_state(
                    self.rule, self.precond_mode, self.precond_state, payloads, weights, self.precond_beta
                )
        else:
            log(
                WARNING,
                "Round %s failed: %d accepted replies, %d needed; model and preconditioner unchanged",
                server_round, len(accepted), self.min_successful_clients,
            )
        row = {
            "train_loss": float(metrics["train_loss"]) if metrics is not None and "train_loss" in metrics else float("nan"),
            "bytes_down": self._round["bytes_down"],
            "bytes_up": self._round["bytes_up"],
            "precond_min": self._round.get("precond_min", 1.0),
            "precond_max": self._round.get("precond_max", 1.0),
            "clients_ok": len(accepted),
            "clients_failed": failed,
            "round_failed": int(arrays is None),
        }
        self.history[server_round] = row
        metrics = metrics if metrics is not None else MetricRecord()
        for key, value in row.items():
            if key != "train_loss":  # FedAvg's own average already holds it
                metrics[key.replace("_", "-")] = value
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every ``client_eval_every`` rounds, all nodes evaluate the model on their held-out data."""
        true_round = server_round + self.round_offset
        if not self.client_eval_every or true_round % self.client_eval_every:
            return []
        config["server-round"] = true_round
        nodes = sorted(grid.get_node_ids(), key=lambda node: (self.node_order.get(node, float("inf")), node))
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, standard deviation and worst-10 % mean of the clients' accuracies."""
        true_round = server_round + self.round_offset
        accuracies = []
        for message in replies:
            if message.has_error():
                log(WARNING, "Client evaluation failed on node %s: %s", message.metadata.src_node_id, message.error.reason)
                continue
            metrics = next(iter(message.content.metric_records.values()), {})
            value = metrics.get("eval_accuracy")
            if isinstance(value, int | float) and np.isfinite(value):
                accuracies.append(float(value))
        if not accuracies:
            return None
        ranked = np.sort(np.asarray(accuracies))
        worst = ranked[: max(1, int(np.ceil(0.1 * len(ranked))))]
        summary = {
            "client_acc_mean": float(ranked.mean()),
            "client_acc_std": float(ranked.std()),
            "client_acc_worst10": float(worst.mean()),
            "clients_evaluated": len(ranked),
        }
        self.history.setdefault(true_round, {}).update(summary)
        return MetricRecord({key.replace("_", "-"): value for key, value in summary.items()})

    # -------------------------------------------------------------- helpers
    @property
    def sampler_state(self):
        """The client sampler's random state (for checkpoints)."""
        return self._sampler.getstate()

    @sampler_state.setter
    def sampler_state(self, state) -> None:
        self._sampler.setstate(state)

    def precond_bounds(self) -> tuple[float, float]:
        """``(min D̂, max D̂)`` of the current state; its ratio is the paper's Γ/α multiplier."""
        if not self.rule.has_state:
            return 1.0, 1.0
        if self.precond_state is None:  # "ones": v = 1 on every parameter
            d = max(self.precond_alpha, 1.0)
            return d, d
        return diagonal_bounds(self.rule.diagonal(self.precond_state, self.precond_alpha))

    def _sample_nodes(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Like Flower's sampler, but seeded and independent of node-id order.

        With ``node_wait_s`` set, a round whose nodes are not all back after
        that long (a device dropped out) goes on with the connected ones, as
        long as ``min_successful_clients`` of them are there.
        """
        started = time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids(), key=lambda node: (self.node_order.get(node, float("inf")), node))
            sample_size = max(int(len(nodes) * fraction), minimum)
            needed = max(self.min_available_nodes, sample_size)
            if len(nodes) >= needed:
                break
            waited = time.monotonic() - started
            if self.node_wait_s is not None and waited >= self.node_wait_s and len(nodes) >= self.min_successful_clients:
                sample_size = len(nodes)
                log(WARNING, "Only %d of %d nodes connected after %.0f s; the round goes on with them.",
                    len(nodes), needed, waited)
                break
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), needed)
            time.sleep(1)
        chosen = self._sampler.sample(nodes, sample_size)
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(chosen), len(nodes))
        return chosen

    def _warm_up(self, node_ids: list[int], arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> None:
        """v⁰ = weighted mean of the sampled clients' statistics at x⁰ (no training)."""
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        queries = self._construct_messages(record, node_ids, WARMUP_MESSAGE_TYPE)
        self._round["bytes_down"] += sum(content_bytes(m.content) for m in queries)
        replies = list(grid.send_and_receive(messages=queries, timeout=self._timeout))
        self._round["bytes_up"] += sum(content_bytes(m.content) for m in replies if not m.has_error())
        accepted = self._screen(replies, stats_layout=None, with_model=False)
        if not accepted:
            log(WARNING, "Warm-up: no usable statistic; starting from v = 1 (precond-init 'ones')")
            return
        accepted.sort(key=self._reply_order)
        stats = [record_views(m.content[self.stats_key]) for m in accepted]
        self.precond_state = warmup_state(stats, [self._weight(m) for m in accepted])
        log(INFO, "Warm-up: v⁰ from %d clients; D̂ in [%.3g, %.3g]", len(accepted), *self.precond_bounds())

    def _stats_layout(self):
        if self.precond_state is None:
            return None
        return {key: (tuple(value.shape), str(value.dtype)) for key, value in self.precond_state.items()}

    def _reply_order(self, message: Message) -> tuple:
        """Node rank when known, else a digest of the reply's leading bytes: stable across runs."""
        node = message.metadata.src_node_id
        if node in self.node_order:
            return (0, self.node_order[node], b"")
        digest = hashlib.blake2b(digest_size=16)
        for record in message.content.array_records.values():
            for array in record.values():
                digest.update(array.data[:4096])
        return (1, 0, digest.digest())

    def _weight(self, message: Message) -> float:
        metrics = next(iter(message.content.metric_records.values()))
        return float(metrics[self.weighted_by_key])

    def _screen(self, replies: list[Message], stats_layout, with_model: bool = True) -> list[Message]:
        """The replies that may be aggregated; every rejection is logged with its node and reason.

        Until the server holds a state, the first accepted statistic fixes the
        layout (and the first accepted reply the metric names) for the rest.
        """
        parameter_layout = describe(self._sent_arrays) if self._sent_arrays is not None else {}
        model_layout = parameter_layout if with_model else None
        metric_keys = None
        accepted = []
        for message in replies:
            problem = reply_problem(
                message,
                arrayrecord_key=self.arrayrecord_key,
                stats_key=self.stats_key,
                weighted_by_key=self.weighted_by_key,
                model_layout=model_layout,
                rule=self.rule,
                stats_layout=stats_layout,
                parameter_layout=parameter_layout,
                metric_keys=metric_keys,
            )
            if problem is not None:
                log(WARNING, "Rejected reply from node %s: %s", message.metadata.src_node_id, problem)
                continue
            accepted.append(message)
            metric_keys = set(next(iter(message.content.metric_records.values())).keys())
            if stats_layout is None and self.rule.has_state:
                stats_layout = describe(message.content[self.stats_key])
        return accepted
