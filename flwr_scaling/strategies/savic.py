"""SAVIC: scaled Local SGD as a Flower Message-API strategy."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import NamedTuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from flwr_scaling.core.server_update import next_model, state_from_average, warmup_state
from flwr_scaling.core.arrays import checked_weighted_average
from flwr_scaling.protocol.records import content_bytes, numpy_to_record, record_views
from flwr_scaling.protocol.wire import (
    DTYPE_KEY,
    DTYPES,
    SCALE_SUFFIX,
    VERSION_KEY,
    check_dtype,
    decode,
    exponents_problem,
    put_encoded,
    wire_dtype,
    wire_view,
)
from flwr_scaling.core.rules import diagonal_bounds, get_rule
from flwr_scaling.core.local_sgd import MODES
from flwr_scaling.strategies.screening import describe, reply_problem, split_records

WARMUP_MESSAGE_TYPE = f"{MessageType.QUERY}.precond_stats"
INITS = ("warmup", "ones")
# Train-config key read when ``precond_every`` is not given (this project's run option).
EVERY_KEY = "precond-every"
# Error code given to a reply whose statistic is not encoded as the run's precond-dtype says.
WRONG_ENCODING_ERROR = 4602


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
    precond_dtype : str | None (default: None)
        Encoding of the state sent down and of the statistics (or states)
        sent up: "float32", "bfloat16" or "float16" (``flwr_scaling.protocol.wire``);
        the server keeps float32. It is written into the train config
        (``precond-dtype``) for the clients. ``None``: the train config's
        ``precond-dtype`` when it has one, else "float32".
    precond_every : int | None (default: None)
        Send the state only in rounds 1, 1 + K, 1 + 2K, ... (and in the first
        round this strategy runs, e.g. after a resume); in between, clients
        train with the state of the last such round, which they keep. A node
        that lacks that version (not sampled at the refresh, or its reply
        failed) gets it whenever it is sampled. ``None``: the train config's
        ``precond-every`` when it has one, else 1.
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
        precond_dtype: str | None = None,
        precond_every: int | None = None,
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
        _check_wire_options(precond_dtype, precond_every)
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
        self.precond_dtype = precond_dtype
        self.precond_every = precond_every
        # What clients train with between refreshes: the state of the last refresh
        # round, encoded once (None: v = 1, or no state), its version (the round it
        # was sent for) and its D̂ bounds.
        self._broadcast: RecordDict | None = None
        self._broadcast_version: int | None = None
        self._broadcast_bounds: tuple[float, float] = (1.0, 1.0)
        # node id -> version of the state it last acknowledged with a good reply:
        # all the strategy keeps per client.
        self._delivered: dict[int, int] = {}
        self._round_version: int | None = None
        self._refreshed = False  # the first round this strategy runs always sends the state
        # (version, decoded state) of the last refresh, from a checkpoint (see ``broadcast``).
        self._restored_broadcast: tuple[int, dict[str, np.ndarray]] | None = None

    # ----------------------------------------------------------------- Flower API
    def summary(self) -> None:
        """Log the scaling settings, then FedAvg's."""
        log(INFO, "\t├──> Scaling (SAVIC):")
        log(INFO, "\t│\t├──Rule: %s | mode: %s | init: %s", self.rule.name, self.precond_mode, self.precond_init)
        log(INFO, "\t│\t├──beta: %g | alpha (D̂ >= alpha): %g", self.precond_beta, self.precond_alpha)
        log(INFO, "\t│\t├──Server step size: %g", self.server_lr)
        log(
            INFO, "\t│\t├──State on the wire: %s, sent every %s round(s)",
            self.precond_dtype or "as the train config says", self.precond_every or "as the train config says",
        )
        log(INFO, "\t│\t└──Keys: precond '%s' | stats '%s'", self.precond_key, self.stats_key)
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, **kwargs):
        """As FedAvg.start; the timeout also bounds the warm-up query."""
        self._timeout = timeout
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients, warm the preconditioner up if needed, send the model, and the
        state to the sampled nodes that do not hold its current version."""
        self._round = {"bytes_down": 0, "bytes_up": 0}
        self._sent_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample_nodes(grid, self.fraction_train, self.min_train_nodes)
        true_round = server_round + self.round_offset
        config["server-round"] = true_round
        self._resolve_wire_options(config)
        if self.rule.has_state and self.precond_state is None and self.precond_init == "warmup":
            self._warm_up(node_ids, arrays, config, grid)
        if not self._refreshed and self._restored_broadcast is not None and (true_round - 1) % self.precond_every:
            self._restore_broadcast()  # a resumed run between refreshes: clients train with the old version
        if not self._refreshed or (true_round - 1) % self.precond_every == 0:
            self._refresh_broadcast(true_round)
        low, high = self._broadcast_bounds
        self._round.update(precond_min=low, precond_max=high)
        self._round_version = self._broadcast_version
        plain = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self._broadcast is None:
            config.pop(VERSION_KEY, None)
            messages = self._construct_messages(plain, node_ids, MessageType.TRAIN)
        else:
            config[VERSION_KEY] = self._broadcast_version
            with_state = RecordDict({**plain, **self._broadcast})
            messages = [
                message
                for node in node_ids
                for message in self._construct_messages(
                    plain if self._delivered.get(node) == self._round_version else with_state, [node], MessageType.TRAIN
                )
            ]
        self._round["bytes_down"] += sum(content_bytes(m.content) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, average models (FedAvg) and update the preconditioner."""
        server_round += self.round_offset
        replies = list(replies)
        self._round["bytes_up"] += sum(content_bytes(m.content) for m in replies if not m.has_error())
        replies = self._received_train_replies(replies)  # precond-every bookkeeping; precond-dtype decoding
        # Screen the layouts only, then check the values of all accepted replies
        # at once on their averages (no pass over each reply's data just for
        # the checks). Only when that finds a bad value, screen again reply by
        # reply with every check, which names the culprits and leaves them out.
        accepted, rejections = self._screen_replies(replies, self._stats_layout(), check_values=False)
        # A fixed order of summation makes the float averages identical from run to run.
        accepted.sort(key=self._reply_order)
        enough = len(accepted) >= max(1, self.min_successful_clients)
        averages = self._average_replies(accepted) if enough else None
        if averages is not None and averages.clean:
            self._log_rejections(rejections)
        else:  # a bad value somewhere, or too few replies to tell: as many as each full check leaves
            accepted = sorted(self._screen(replies, stats_layout=self._stats_layout()), key=self._reply_order)
            enough = len(accepted) >= max(1, self.min_successful_clients)
            averages = self._average_replies(accepted) if enough else None
        failed = len(replies) - len(accepted)
        arrays, metrics = None, None
        if averages is not None:
            if self.rule.has_state:  # FedAvg's checks and metric average expect one ArrayRecord
                for message in accepted:
                    message.content.pop(self.stats_key)
            # Only FedAvg's log line: the screening already ensured what its validation checks
            # (one model ArrayRecord with the same keys and one MetricRecord with the same names everywhere).
            self._check_and_log_replies(accepted, is_train=True, validate=False)
            average = averages.model
            if self.server_lr != 1.0 and self._sent_arrays is not None:
                average = next_model(record_views(self._sent_arrays), average, self.server_lr)
            arrays = numpy_to_record(average)
            metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
            if averages.stats is not None:
                self.precond_state = state_from_average(
                    self.rule, self.precond_mode, self.precond_state, averages.stats, self.precond_beta
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
        replies = self._decode_replies(replies)
        accepted = self._screen(replies, stats_layout=None, with_model=False)
        if not accepted:
            log(WARNING, "Warm-up: no usable statistic; starting from v = 1 (precond-init 'ones')")
            return
        accepted.sort(key=self._reply_order)
        stats = [record_views(m.content[self.stats_key]) for m in accepted]
        self.precond_state = warmup_state(stats, [self._weight(m) for m in accepted])
        log(INFO, "Warm-up: v⁰ from %d clients; D̂ in [%.3g, %.3g]", len(accepted), *self.precond_bounds())

    def _stats_layout(self, *, wire: bool = False):
        """``{key: (shape, dtype)}`` a reply's statistic (or state) must have; ``None`` while the
        server has no state. ``wire``: with the dtype it travels in (``precond_dtype``), not float32."""
        if self.precond_state is None:
            return None
        dtype = str(wire_dtype(self.precond_dtype or "float32")) if wire else None
        return {key: (tuple(value.shape), dtype or str(value.dtype)) for key, value in self.precond_state.items()}

    # ------------------------------------------------- precond-dtype / precond-every
    def _resolve_wire_options(self, config: ConfigRecord) -> None:
        """Take ``precond_dtype`` / ``precond_every`` from the train config where not given; tell the clients the dtype."""
        if self.precond_dtype is None:
            self.precond_dtype = str(config.get(DTYPE_KEY, "float32"))
        if self.precond_every is None:
            self.precond_every = config.get(EVERY_KEY, 1)
        _check_wire_options(self.precond_dtype, self.precond_every)
        if self.rule.has_state:
            config[DTYPE_KEY] = self.precond_dtype

    @property
    def broadcast(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(version, state as the clients decode it)`` of the last state sent, for checkpoints:
        with ``precond_every`` > 1 a run resumed between refreshes must send that version, not the
        current state, to end as an uninterrupted run does. ``None`` when no state was sent."""
        if self._broadcast is None or self._broadcast_version is None:
            return self._restored_broadcast
        return self._broadcast_version, self._decode_record(self._broadcast, self.precond_key)

    @broadcast.setter
    def broadcast(self, value: tuple[int, dict[str, np.ndarray]] | None) -> None:
        self._restored_broadcast = value

    def _restore_broadcast(self) -> None:
        """Encode the checkpoint's last-sent state again as its version (the codecs give back the
        same decoded values when re-encoding decoded values)."""
        version, state = self._restored_broadcast
        self._refreshed = True
        self._broadcast = RecordDict()
        put_encoded(self._broadcast, self.precond_key, state, dtype=self.precond_dtype)
        self._broadcast_version = version
        sent = self._decode_record(self._broadcast, self.precond_key)
        self._broadcast_bounds = diagonal_bounds(self.rule.diagonal(sent, self.precond_alpha))

    def _refresh_broadcast(self, true_round: int) -> None:
        """Encode the current state once, as the version of ``true_round``, for every node to receive."""
        self._refreshed = True
        state = self.precond_state if self.rule.has_state else None
        if state is None:  # nothing to send: v = 1 ("ones") or no preconditioner
            self._broadcast, self._broadcast_version = None, None
            self._broadcast_bounds = self.precond_bounds()
            return
        self._broadcast = RecordDict()
        put_encoded(self._broadcast, self.precond_key, state, dtype=self.precond_dtype)
        self._broadcast_version = true_round
        # The bounds of the D̂ the clients will use: of the decoded state, rounding included.
        sent = self._decode_record(self._broadcast, self.precond_key)
        self._broadcast_bounds = diagonal_bounds(self.rule.diagonal(sent, self.precond_alpha))

    def _received_train_replies(self, replies: list[Message]) -> list[Message]:
        """Note which nodes now hold this round's state version, then decode the payloads.

        A good reply proves the node held the version; after an error reply the
        node may have lost it (a fresh device, a failed process), so it gets the
        state again the next time it is sampled.
        """
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                self._delivered.pop(node, None)
            elif self._round_version is not None:
                self._delivered[node] = self._round_version
        return self._decode_replies(replies)

    def _decode_replies(self, replies: list[Message]) -> list[Message]:
        """The replies with their statistics (or states) decoded from ``precond_dtype`` to float32.

        A statistic not encoded as the run says (a float32 array in a bfloat16
        run, a float16 array without its exponent) turns its reply into an error
        reply, rejected and counted like any failed client. NaN and Inf survive
        decoding, so the screening that follows still rejects them.
        """
        if not self.rule.has_state or (self.precond_dtype or "float32") == "float32":
            return replies
        layout = self._stats_layout(wire=True)
        decoded = []
        for message in replies:
            if message.has_error() or self.stats_key not in message.content.array_records:
                decoded.append(message)  # the screening says what is wrong with it
                continue
            problem, arrays = self._decoded_payload(message.content, self.stats_key, layout)
            if problem is not None:
                error = Error(code=WRONG_ENCODING_ERROR, reason=f"precond-dtype {self.precond_dtype}: {problem}")
                decoded.append(make_message(metadata=message.metadata, error=error))
                continue
            message.content[self.stats_key] = numpy_to_record(arrays)
            message.content.pop(self.stats_key + SCALE_SUFFIX, None)
            decoded.append(message)
        return decoded

    def _decoded_payload(self, content: RecordDict, key: str, layout) -> tuple[str | None, dict[str, np.ndarray] | None]:
        """``(None, float32 arrays)`` from the encoded record ``content[key]``, or ``(problem, None)``.

        ``layout`` is the exact ``{key: (shape, wire dtype)}`` expected; ``None``
        before the server has a state: then any non-empty subset of the model's
        arrays, with their shapes.
        """
        record = content[key]
        dtype = self.precond_dtype or "float32"
        if layout is None:
            model = describe(self._sent_arrays) if self._sent_arrays is not None else {}
            unknown = sorted(set(record.keys()) - set(model))
            if unknown or not record.keys():
                return f"{key} keys {unknown or '[]'} are not arrays of the model", None
            layout = {name: (model[name][0], str(wire_dtype(dtype))) for name in record.keys()}
        if set(record.keys()) != set(layout):
            missing, extra = sorted(set(layout) - set(record.keys())), sorted(set(record.keys()) - set(layout))
            return f"{key} has wrong keys (missing {missing}, unexpected {extra})", None
        for name, array in record.items():
            shape, expected = layout[name]
            if tuple(array.shape) != shape or array.dtype != expected:
                return f"{key}[{name}] is {array.dtype}{list(array.shape)}, expected {expected}{list(shape)}", None
        if dtype == "float16":
            scale = content.get(key + SCALE_SUFFIX)
            problem = exponents_problem(dict(scale.items()) if isinstance(scale, ConfigRecord) else {}, list(record.keys()))
            if problem is not None:
                return problem, None
        try:
            return None, self._decode_record(content, key)
        except ValueError as error:
            return f"{key} cannot be decoded ({error})", None

    def _decode_record(self, content: RecordDict, key: str) -> dict[str, np.ndarray]:
        """Float32 arrays from ``content[key]`` encoded as ``precond_dtype`` (views where float32)."""
        scale = content.get(key + SCALE_SUFFIX)
        exponents = dict(scale.items()) if isinstance(scale, ConfigRecord) else None
        views = {name: wire_view(array) for name, array in content[key].items()}
        return decode(views, dtype=self.precond_dtype or "float32", exponents=exponents)

    def _reply_order(self, message: Message) -> tuple:
        """Node rank when known, else a digest of the reply's leading bytes: stable across runs."""
        node = message.metadata.src_node_id
        if node in self.node_order:
            return (0, self.node_order[node], b"")
        digest = hashlib.blake2b(digest_size=16)
        for record in split_records(message.content)[0].values():
            for array in record.values():
                digest.update(array.data[:4096])
        return (1, 0, digest.digest())

    def _weight(self, message: Message) -> float:
        metrics = split_records(message.content)[1][0]
        return float(metrics[self.weighted_by_key])

    def _screen(self, replies: list[Message], stats_layout, with_model: bool = True) -> list[Message]:
        """The replies that may be aggregated; every rejection is logged with its node and reason.

        Until the server holds a state, the first accepted statistic fixes the
        layout (and the first accepted reply the metric names) for the rest.
        """
        accepted, rejections = self._screen_replies(replies, stats_layout, with_model=with_model)
        self._log_rejections(rejections)
        return accepted

    def _screen_replies(
        self, replies: list[Message], stats_layout, with_model: bool = True, check_values: bool = True
    ) -> tuple[list[Message], list[tuple[Message, str]]]:
        """``(accepted, [(rejected reply, reason), ...])`` in reply order, nothing logged.

        ``check_values=False`` leaves out the checks of the values (NaN, Inf,
        sign), which the caller then makes on the averages; a reply rejected
        for its layout gets the reason the full check gives it.
        """
        parameter_layout = describe(self._sent_arrays) if self._sent_arrays is not None else {}
        model_layout = parameter_layout if with_model else None
        metric_keys = None
        accepted, rejections = [], []
        for message in replies:
            options = dict(
                arrayrecord_key=self.arrayrecord_key,
                stats_key=self.stats_key,
                weighted_by_key=self.weighted_by_key,
                model_layout=model_layout,
                rule=self.rule,
                stats_layout=stats_layout,
                parameter_layout=parameter_layout,
                metric_keys=metric_keys,
            )
            problem = reply_problem(message, check_values=check_values, **options)
            if problem is not None:
                if not check_values:  # the reason a full check gives (a bad value may come first)
                    problem = reply_problem(message, check_values=True, **options)
                rejections.append((message, problem))
                continue
            accepted.append(message)
            metric_keys = set(split_records(message.content)[1][0].keys())
            if stats_layout is None and self.rule.has_state:
                stats_layout = describe(message.content[self.stats_key])
        return accepted, rejections

    @staticmethod
    def _log_rejections(rejections: list[tuple[Message, str]]) -> None:
        for message, problem in rejections:
            log(WARNING, "Rejected reply from node %s: %s", message.metadata.src_node_id, problem)

    def _average_replies(self, accepted: list[Message]) -> _RoundAverages:
        """Weighted averages of the accepted replies' models and statistics, and whether all their values are good.

        Good: every average is finite (so every value was, see
        ``checked_weighted_average``) and, for a rule whose statistics cannot
        be negative, no reply's statistic has a negative entry.
        """
        weights = [self._weight(m) for m in accepted]
        # Views of the serialised bytes: nothing is copied but into the averages.
        models = checked_weighted_average([record_views(m.content[self.arrayrecord_key]) for m in accepted], weights)
        if not self.rule.has_state:
            return _RoundAverages(models.arrays, None, models.finite)
        stats = checked_weighted_average(
            [record_views(m.content[self.stats_key]) for m in accepted], weights, find_lowest=self.rule.nonnegative
        )
        return _RoundAverages(models.arrays, stats.arrays, models.finite and stats.finite and not stats.lowest < 0)


class _RoundAverages(NamedTuple):
    """A round's weighted averages (see ``Savic._average_replies``)."""

    model: dict[str, np.ndarray]
    stats: dict[str, np.ndarray] | None  # None: the rule has no state
    clean: bool  # no NaN, Inf or impossible negative value in any averaged reply


def _check_wire_options(precond_dtype: str | None, precond_every: int | None) -> None:
    """One-line ``ValueError`` for a bad ``precond_dtype`` or ``precond_every`` (``None``: not given yet)."""
    if precond_dtype is not None:
        try:
            check_dtype(precond_dtype)
        except ValueError:
            raise ValueError(f"precond_dtype must be one of {DTYPES}, got {precond_dtype!r}") from None
    if precond_every is not None and (
        not isinstance(precond_every, int) or isinstance(precond_every, bool) or precond_every < 1
    ):
        raise ValueError(f"precond_every must be an integer >= 1, got {precond_every!r}")
