"""SAVIC: scaled Local SGD as a Flower Message-API strategy.

``Savic`` keeps the round logic (configure and aggregate) and its state (the
preconditioner state, the model sent); its collaborators do the rest:
``NodeSampler`` (which nodes, in which order), ``StateBroadcast`` (encoding
and versions of the state sent down), ``protocol.decoding`` (the statistics
sent up), ``ReplyScreen`` (rejecting and averaging replies) and
``RoundHistory`` (bytes, the history row, the clients' own evaluation);
``ClientSettings`` writes the clients' settings into every message.

The module is long because ``Savic``'s docstring documents each of its
constructor keywords (FedAvg's and the scaling ones, about 150 lines); the
code itself is well under 300 lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_scaling.core.local_sgd import MODES
from flwr_scaling.core.rules import diagonal_bounds, get_rule
from flwr_scaling.core.server_update import next_model_with_momentum, state_from_average, warmup_state
from flwr_scaling.protocol.decoding import decode_replies
from flwr_scaling.protocol.flower_adapter import construct_messages, log, log_train_replies
from flwr_scaling.protocol.records import numpy_to_record, record_views
from flwr_scaling.protocol.wire import MODEL_VERSION_KEY, wire_dtype
from flwr_scaling.strategies.broadcast import StateBroadcast
from flwr_scaling.strategies.client_settings import ClientSettings
from flwr_scaling.strategies.recording import RoundHistory, client_evaluation_messages, failed_round_warning
from flwr_scaling.strategies.sampling import NodeSampler
from flwr_scaling.strategies.screening import ReplyScreen, describe
from flwr_scaling.strategies.warmup import holds_model, without_model_for

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
    adam_beta1 : float | None (default: None)
        First-moment factor of adam on the clients; ``None``: the train
        config's ``adam-beta1`` when it has one, else 0.9.
    precond_probes : int | None (default: None)
        Hutchinson probes per client step (oasis); ``None``: the train
        config's ``precond-probes`` when it has one, else 1.
    lr : float | None (default: None)
        Client step size, unless the train config has an ``lr``; ``None``:
        the rule's default for the mode. The strategy writes these and the
        settings above into every train and warm-up message's config (see
        ``client_settings``): clients read them from there, and a train
        config that contradicts them is refused.
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
    server_momentum : float (default: 0.0)
        Server heavy ball μ on the averaged model change:
        m ← μ m + (mean(x_m) − x), x ← x + η m (``server_update.next_model_with_momentum``).
        0 is no momentum (the plain step above, bit for bit).
    server_velocity : dict[str, np.ndarray] | None (default: None)
        The server momentum m to start from (a resumed run, see ``server_velocity``); ``None``: zeros.
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
    min_train_nodes, min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for training, and for evaluation.
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
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : callable | None (default: None)
        As in FedAvg.
    node_order : Mapping[int, int] | None (default: None)
        Stable rank of each node (e.g. its partition id): sampling and the
        order of summation then do not depend on random node ids.
    node_wait_s : float | None (default: None)
        Seconds a round waits for missing nodes before it goes on without
        them; ``None`` waits forever, as Flower's own sampler does.
    sampler_state : object | None (default: None)
        The sampler's random state from a checkpoint (``sampler_state``).
    round_offset : int (default: 0)
        Rounds already done before this start() (a resumed run): Flower's
        start() always counts from 1, clients and history see the true round.
    precond_state : dict[str, np.ndarray] | None (default: None)
        The preconditioner state to start from (a resumed run); ``None``: as
        ``precond_init`` says.
    last_broadcast : tuple[int, dict[str, np.ndarray]] | None (default: None)
        ``(version, state)`` of the last state sent before a resume (see
        ``broadcast``).
    sampler : NodeSampler | None (default: None)
        Chooses the nodes of each round and the order replies are summed in;
        ``None``: ``NodeSampler(seed=sampling_seed, node_order=node_order,
        wait_s=node_wait_s, state=sampler_state)``. Give either this or those.
    state_broadcast : StateBroadcast | None (default: None)
        Encodes and versions the state sent down; ``None``:
        ``StateBroadcast(precond_key=precond_key, dtype=precond_dtype,
        every=precond_every, last_sent=last_broadcast)``. Give either this or those.
    screen : ReplyScreen | None (default: None)
        Screens and averages the replies; ``None``: ``ReplyScreen`` with this
        strategy's rule and keys.
    """

    def __init__(  # pylint: disable=too-many-arguments,too-many-locals
        self,
        *,
        precond: str = "adam",
        precond_mode: str = "global",
        precond_beta: float = 0.99,
        precond_alpha: float = 1e-3,
        precond_init: str = "warmup",
        adam_beta1: float | None = None,
        precond_probes: int | None = None,
        lr: float | None = None,
        precond_dtype: str | None = None,
        precond_every: int | None = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_velocity: dict[str, np.ndarray] | None = None,
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
        node_order: Mapping[int, int] | None = None,
        node_wait_s: float | None = None,
        sampler_state: object | None = None,
        round_offset: int = 0,
        precond_state: dict[str, np.ndarray] | None = None,
        last_broadcast: tuple[int, dict[str, np.ndarray]] | None = None,
        sampler: NodeSampler | None = None,
        state_broadcast: StateBroadcast | None = None,
        screen: ReplyScreen | None = None,
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
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.client_settings = ClientSettings(
            precond=self.rule.name, precond_mode=precond_mode, precond_alpha=precond_alpha,
            precond_beta=precond_beta, adam_beta1=adam_beta1, precond_probes=precond_probes, lr=lr,
        )
        self.precond_mode = precond_mode
        self.precond_beta = precond_beta
        self.precond_alpha = precond_alpha
        self.precond_init = precond_init
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.server_velocity = server_velocity  # m of the server heavy ball; None until the first step with μ > 0
        self.min_successful_clients = min_successful_clients
        self.client_eval_every = client_eval_every
        self.precond_key = precond_key
        self.stats_key = stats_key
        self.round_offset = round_offset
        self.precond_state = precond_state
        self.sampler = sampler or NodeSampler(seed=sampling_seed, node_order=node_order, wait_s=node_wait_s,
                                              state=sampler_state)
        if sampler is not None and (sampling_seed, node_order, node_wait_s, sampler_state) != (None,) * 4:
            raise ValueError("give either sampler or sampling_seed/node_order/node_wait_s/sampler_state, not both")
        self.state_broadcast = state_broadcast or StateBroadcast(
            precond_key=precond_key, dtype=precond_dtype, every=precond_every, last_sent=last_broadcast
        )
        if state_broadcast is not None and (precond_dtype, precond_every, last_broadcast) != (None,) * 3:
            raise ValueError("give either state_broadcast or precond_dtype/precond_every/last_broadcast, not both")
        self.screen = screen or ReplyScreen(
            rule=self.rule, arrayrecord_key=arrayrecord_key, stats_key=stats_key, weighted_by_key=weighted_by_key
        )
        self.recorder = RoundHistory()
        self._timeout = 3600.0
        self._sent_arrays: ArrayRecord | None = None

    @property
    def history(self) -> dict[int, dict[str, float]]:
        """The history row of every round, by true round (see ``RoundHistory``)."""
        return self.recorder.rows

    @property
    def precond_dtype(self) -> str | None:
        """Encoding of the state on the wire (``None`` until the first round reads the train config)."""
        return self.state_broadcast.dtype

    @property
    def precond_every(self) -> int | None:
        """Rounds between refreshes of the state (``None`` until the first round reads the train config)."""
        return self.state_broadcast.every

    @property
    def broadcast(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(version, state as the clients decode it)`` of the last state sent, for checkpoints
        (``StateBroadcast.last_sent``); ``None`` when no state was sent."""
        return self.state_broadcast.last_sent

    @property
    def sampler_state(self):
        """The client sampler's random state (for checkpoints)."""
        return self.sampler.state

    # ----------------------------------------------------------------- Flower API
    def summary(self) -> None:
        """Log the scaling settings, then FedAvg's."""
        log(INFO, "\t├──> Scaling (SAVIC):")
        log(INFO, "\t│\t├──Rule: %s | mode: %s | init: %s", self.rule.name, self.precond_mode, self.precond_init)
        log(INFO, "\t│\t├──beta: %g | alpha (D̂ >= alpha): %g", self.precond_beta, self.precond_alpha)
        log(INFO, "\t│\t├──Server step size: %g | server momentum: %g", self.server_lr, self.server_momentum)
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
        self.recorder.start_round()
        self._sent_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sampler.sample(grid, fraction=self.fraction_train, minimum=self.min_train_nodes,
                                       min_available=self.min_available_nodes, min_successful=self.min_successful_clients)
        true_round = server_round + self.round_offset
        config["server-round"] = true_round
        self.client_settings.write(config)  # the one source of the clients' settings
        config.pop(MODEL_VERSION_KEY, None)  # the train config is the same object every round
        self.state_broadcast.resolve(config, sends_state=self.rule.has_state)
        holding_model: set[int] = set()
        if self.rule.has_state and self.precond_state is None and self.precond_init == "warmup":
            config[MODEL_VERSION_KEY] = true_round
            holding_model = self._warm_up(node_ids, arrays, config, grid)
        state = self.precond_state if self.rule.has_state else None
        self.state_broadcast.prepare(true_round, state, self._diagonal_bounds)
        self.recorder.set_bounds(*self.state_broadcast.bounds)
        plain = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        # The nodes that kept x⁰ from the warm-up train from it: their round-1 message carries no model.
        construct = without_model_for(holding_model, self.arrayrecord_key,
                                      lambda record, nodes: construct_messages(self, record, nodes, MessageType.TRAIN))
        messages = self.state_broadcast.messages(plain, config, node_ids, construct)
        self.recorder.sent(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen replies, average models (FedAvg) and update the preconditioner."""
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.received(replies)
        self.state_broadcast.received(replies)
        replies = self._decode(replies)
        accepted, averages = self.screen.accept_and_average(
            replies, stats_layout=self.stats_layout(), parameter_layout=self.model_layout(),
            min_successful=self.min_successful_clients, order=self.sampler.reply_order, reference=self._sent_arrays,
        )
        arrays, metrics = None, None
        if averages is not None:
            if self.rule.has_state:  # FedAvg's checks and metric average expect one ArrayRecord
                for message in accepted:
                    message.content.pop(self.stats_key)
            # Only FedAvg's log line: the screening already ensured what its validation checks
            # (one model ArrayRecord with the same keys and one MetricRecord with the same names everywhere).
            log_train_replies(self, accepted)
            average = averages.model
            if (self.server_lr != 1.0 or self.server_momentum) and self._sent_arrays is not None:
                average, self.server_velocity = next_model_with_momentum(
                    record_views(self._sent_arrays), average, self.server_lr, self.server_momentum,
                    self.server_velocity,
                )
            arrays = numpy_to_record(average)
            metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
            if averages.stats is not None:
                self.precond_state = state_from_average(
                    self.rule, self.precond_mode, self.precond_state, averages.stats, self.precond_beta
                )
        else:
            failed_round_warning(server_round, len(accepted), self.min_successful_clients)
        metrics = self.recorder.finish_round(
            server_round, metrics, accepted=len(accepted), failed=len(replies) - len(accepted), round_failed=arrays is None
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every ``client_eval_every`` rounds, all nodes evaluate the model on their held-out data."""
        return client_evaluation_messages(
            self, every=self.client_eval_every, true_round=server_round + self.round_offset,
            arrays=arrays, config=config, nodes=lambda: self.sampler.ordered(grid),
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, standard deviation and worst-10 % mean of the clients' accuracies."""
        return self.recorder.client_evaluation(server_round + self.round_offset, replies)

    # -------------------------------------------------------------- helpers
    def precond_bounds(self) -> tuple[float, float]:
        """``(min D̂, max D̂)`` of the current state; its ratio is the paper's Γ/α multiplier."""
        return self._diagonal_bounds(self.precond_state)

    def _diagonal_bounds(self, state: dict[str, np.ndarray] | None) -> tuple[float, float]:
        """``(min D̂, max D̂)`` of ``state``; ``None``: v = 1 on every parameter ("ones")."""
        if not self.rule.has_state:
            return 1.0, 1.0
        if state is None:
            d = max(self.precond_alpha, 1.0)
            return d, d
        return diagonal_bounds(self.rule.diagonal(state, self.precond_alpha))

    def _warm_up(self, node_ids: list[int], arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> set[int]:
        """v⁰ = weighted mean of the sampled clients' statistics at x⁰ (no training).

        Returns the nodes whose good reply confirms that they kept x⁰ (the
        config's ``model-version``): round 1 need not send them the model again.
        """
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        queries = construct_messages(self, record, node_ids, WARMUP_MESSAGE_TYPE)
        self.recorder.sent(queries)
        replies = list(grid.send_and_receive(messages=queries, timeout=self._timeout))
        self.recorder.received(replies)
        holding_model = {reply.metadata.src_node_id for reply in replies if holds_model(reply, config[MODEL_VERSION_KEY])}
        replies = self._decode(replies)
        accepted = self.screen.screen(replies, stats_layout=None, parameter_layout=self.model_layout(), with_model=False)
        if not accepted:
            log(WARNING, "Warm-up: no usable statistic; starting from v = 1 (precond-init 'ones')")
            return holding_model
        accepted.sort(key=self.sampler.reply_order)
        stats = [record_views(m.content[self.stats_key]) for m in accepted]
        self.precond_state = warmup_state(stats, [self.screen.weight(m) for m in accepted])
        log(INFO, "Warm-up: v⁰ from %d clients; D̂ in [%.3g, %.3g]", len(accepted), *self.precond_bounds())
        return holding_model

    def model_layout(self):
        """``{key: (shape, dtype)}`` of the model sent this round (empty before the first)."""
        return describe(self._sent_arrays) if self._sent_arrays is not None else {}

    def stats_layout(self, *, wire: bool = False):
        """``{key: (shape, dtype)}`` a reply's statistic (or state) must have; ``None`` while the
        server has no state. ``wire``: with the dtype it travels in (``precond_dtype``), not float32."""
        if self.precond_state is None:
            return None
        dtype = str(wire_dtype(self.precond_dtype or "float32")) if wire else None
        return {key: (tuple(value.shape), dtype or str(value.dtype)) for key, value in self.precond_state.items()}

    def _decode(self, replies: list[Message]) -> list[Message]:
        """The replies with their statistics (or states) decoded from ``precond_dtype`` to float32."""
        if not self.rule.has_state:
            return replies
        return decode_replies(replies, key=self.stats_key, dtype=self.precond_dtype or "float32",
                              layout=self.stats_layout(wire=True), model_layout=self.model_layout())
