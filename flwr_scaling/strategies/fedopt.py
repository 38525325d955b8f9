"""Baselines on the server: Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad).

``ServerOptimizer`` is FedAvg with the same collaborators as ``Savic`` (the
seeded ``NodeSampler``, the ``ReplyScreen`` of replies, ``RoundHistory`` for
bytes, history rows and client evaluation), followed by one step of a server
optimizer on the averaged model change (Reddi et al. 2020, arXiv:2003.00295).
That step is not re-implemented here: ``FlowerServerStep`` runs Flower's own
``FedAdam`` / ``FedYogi`` / ``FedAdagrad`` update on our screened average
(through ``flower_adapter.fedopt_step``).

FedProx and Local Adam need no server of their own: their server is FedAvg
(``Savic`` with rule ``identity``); what differs happens on the clients
(``flwr_scaling.core.local_sgd``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi

from flwr_scaling.core.rules import get_rule
from flwr_scaling.protocol.flower_adapter import (
    FedOpt,
    construct_messages,
    fedopt_moments,
    fedopt_step,
    fedopt_stepper,
    log,
    log_train_replies,
    set_fedopt_moments,
)
from flwr_scaling.protocol.records import numpy_to_record, record_views
from flwr_scaling.strategies.recording import RoundHistory, client_evaluation_messages, failed_round_warning
from flwr_scaling.strategies.sampling import NodeSampler
from flwr_scaling.strategies.screening import ReplyScreen, describe

NumpyArrays = dict[str, np.ndarray]
FLOWER_STRATEGIES = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
BETA_1, BETA_2 = 0.9, 0.99  # Flower's defaults (FedAdagrad has neither: beta_1 = beta_2 = 0)


class FlowerServerStep:
    """One Flower FedOpt server update, ``x ← step(x, mean(x_m))``, with its moments.

    Parameters
    ----------
    name : str
        "fedadam", "fedyogi" or "fedadagrad".
    eta : float
        Server step size (Flower's ``eta``; the ``server-lr`` option).
    tau : float
        Adaptivity constant (Flower's ``tau``; ``server-tau``).
    eta_l : float
        Client step size (Flower's ``eta_l``): only logged, it reaches the
        clients through the train config.
    beta_1, beta_2 : float
        Moment factors of FedAdam and FedYogi (ignored by FedAdagrad).
    """

    def __init__(self, name: str, *, eta: float, tau: float, eta_l: float = 0.1,
                 beta_1: float = BETA_1, beta_2: float = BETA_2) -> None:
        if name not in FLOWER_STRATEGIES:
            raise ValueError(f"unknown server optimizer {name!r}; choose one of {', '.join(FLOWER_STRATEGIES)}")
        if not eta > 0:
            raise ValueError(f"eta (server-lr) must be > 0, got {eta}")
        if not tau > 0:
            raise ValueError(f"tau (server-tau) must be > 0, got {tau}")
        options = {"eta": eta, "eta_l": eta_l, "tau": tau}
        if name != "fedadagrad":
            options.update(beta_1=beta_1, beta_2=beta_2)
        self.name = name
        self.flower: FedOpt = fedopt_stepper(FLOWER_STRATEGIES[name], **options)

    def step(self, server_round: int, current: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]) -> NumpyArrays:
        """The next global model; ``server_round`` counts from 1 (FedAdam's bias correction uses it).

        The result has the dtypes of ``current`` (FedAdam's bias-corrected step is
        a float64 scalar, which would otherwise turn float32 models into float64).
        """
        arrays = fedopt_step(self.flower, server_round, current, numpy_to_record(average))
        return {k: np.asarray(a.numpy()).astype(current[k].dtype, copy=False) for k, a in arrays.items()}

    @property
    def state(self) -> NumpyArrays | None:
        """Flower's moments as ``{"m/<key>": m_t, "v/<key>": v_t}`` (``None`` before the first step)."""
        m_t, v_t = fedopt_moments(self.flower)
        if not m_t and not v_t:
            return None
        out = {f"m/{k}": np.asarray(v) for k, v in (m_t or {}).items()}
        out.update({f"v/{k}": np.asarray(v) for k, v in (v_t or {}).items()})
        return out

    @state.setter
    def state(self, state: Mapping[str, np.ndarray] | None) -> None:
        if not state:
            set_fedopt_moments(self.flower, None, None)
            return
        bad = sorted(k for k in state if not k.startswith(("m/", "v/")))
        if bad:
            raise ValueError(f"server-optimizer state keys must start with 'm/' or 'v/', got {bad}")
        set_fedopt_moments(
            self.flower,
            {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m/")} or None,
            {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")} or None,
        )


class ServerOptimizer(FedAvg):
    """FedAvg plus a Flower FedOpt server step, screening and recording as ``Savic`` does.

    Replies are sampled, screened, averaged and recorded by the same
    collaborators as ``Savic``'s with the identity rule; the average then
    goes through Flower's FedAdam / FedYogi / FedAdagrad update from the model
    sent this round. The moments are ``precond_state`` (keys ``m/<key>`` and
    ``v/<key>``) so that checkpoints save and restore them; they are never
    sent to the clients.

    Parameters
    ----------
    optimizer : str
        "fedadam", "fedyogi" or "fedadagrad".
    eta : float (default: 0.1)
        Server step size (Flower's ``eta``; the ``server-lr`` option).
    tau : float (default: 1e-3)
        Adaptivity constant (Flower's ``tau``; ``server-tau``).
    eta_l : float (default: 0.1)
        Client step size (Flower's ``eta_l``): only logged.
    beta_1 : float (default: 0.9)
        First-moment factor of FedAdam and FedYogi (ignored by FedAdagrad).
    beta_2 : float (default: 0.99)
        Second-moment factor of FedAdam and FedYogi (ignored by FedAdagrad).
    precond : str (default: "identity")
        Must be "identity": a FedOpt strategy takes no preconditioner (kept so
        that a wrong call fails with a clear message).
    server_lr : float (default: 1.0)
        Must be 1.0: the server step size of a FedOpt strategy is ``eta``.
    min_successful_clients : int (default: 1)
        A round with fewer accepted replies leaves the model and the moments
        unchanged and is recorded as failed.
    sampling_seed : int | None (default: None)
        Seed of the client sampler.
    node_order : Mapping[int, int] | None (default: None)
        Stable rank of each node (see ``NodeSampler``).
    node_wait_s : float | None (default: None)
        Seconds a round waits for missing nodes (see ``NodeSampler``).
    sampler_state : object | None (default: None)
        The sampler's random state from a checkpoint.
    round_offset : int (default: 0)
        Rounds already done before this start() (a resumed run).
    precond_state : dict[str, np.ndarray] | None (default: None)
        The moments to start from (a resumed run, see ``precond_state``).
    client_eval_every : int (default: 0)
        Every that many rounds, every node evaluates the global model (see ``Savic``).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        Flower's FedAvg keywords, with the defaults and meanings ``Savic`` documents.
    sampler : NodeSampler | None (default: None)
        ``None``: built from ``sampling_seed``, ``node_order``, ``node_wait_s``, ``sampler_state``.
    screen : ReplyScreen | None (default: None)
        ``None``: a ``ReplyScreen`` with the identity rule and this strategy's keys.
    """

    def __init__(  # pylint: disable=too-many-arguments,too-many-locals
        self,
        *,
        optimizer: str,
        eta: float = 0.1,
        tau: float = 1e-3,
        eta_l: float = 0.1,
        beta_1: float = BETA_1,
        beta_2: float = BETA_2,
        precond: str = "identity",
        server_lr: float = 1.0,
        min_successful_clients: int = 1,
        sampling_seed: int | None = None,
        node_order: Mapping[int, int] | None = None,
        node_wait_s: float | None = None,
        sampler_state: object | None = None,
        round_offset: int = 0,
        precond_state: NumpyArrays | None = None,
        client_eval_every: int = 0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        sampler: NodeSampler | None = None,
        screen: ReplyScreen | None = None,
    ) -> None:
        if precond != "identity":
            raise ValueError(f"{optimizer} takes no preconditioner; got precond={precond!r}")
        if server_lr != 1.0:
            raise ValueError("the server step size of a FedOpt strategy is eta, not server_lr")
        self.server_step = FlowerServerStep(optimizer, eta=eta, tau=tau, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2)
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
        self.server_lr = 1.0  # FedAvg's plain mean; eta acts in the Flower step
        self.min_successful_clients = min_successful_clients
        self.client_eval_every = client_eval_every
        self.round_offset = round_offset
        self.precond_state = precond_state
        if sampler is not None and (sampling_seed, node_order, node_wait_s, sampler_state) != (None,) * 4:
            raise ValueError("give either sampler or sampling_seed/node_order/node_wait_s/sampler_state, not both")
        self.sampler = sampler or NodeSampler(seed=sampling_seed, node_order=node_order, wait_s=node_wait_s,
                                              state=sampler_state)
        self.screen = screen or ReplyScreen(
            rule=get_rule("identity"), arrayrecord_key=arrayrecord_key, weighted_by_key=weighted_by_key
        )
        self.recorder = RoundHistory()
        self._sent_arrays: ArrayRecord | None = None

    @property
    def precond_state(self) -> NumpyArrays | None:
        """Flower's moments as ``{"m/<key>": m_t, "v/<key>": v_t}`` (``None`` before the first step)."""
        return self.server_step.state

    @precond_state.setter
    def precond_state(self, state: Mapping[str, np.ndarray] | None) -> None:
        self.server_step.state = state

    @property
    def history(self) -> dict[int, dict[str, float]]:
        """The history row of every round, by true round (see ``RoundHistory``)."""
        return self.recorder.rows

    @property
    def sampler_state(self):
        """The client sampler's random state (for checkpoints)."""
        return self.sampler.state

    @property
    def broadcast(self) -> None:
        """Nothing is ever broadcast but the model (``Savic.broadcast`` for checkpoints)."""
        return None

    def summary(self) -> None:
        """Log the server optimizer's settings, then FedAvg's."""
        opt = self.server_step.flower
        log(INFO, "\t├──> Server optimizer: Flower %s", type(opt).__mro__[1].__name__)
        log(INFO, "\t│\t├── eta %g | eta_l %g | tau %g", opt.eta, opt.eta_l, opt.tau)
        log(INFO, "\t│\t└── beta_1 %g | beta_2 %g", opt.beta_1, opt.beta_2)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample clients and send them the model (nothing else: the moments stay on the server)."""
        self.recorder.start_round()
        self._sent_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sampler.sample(grid, fraction=self.fraction_train, minimum=self.min_train_nodes,
                                       min_available=self.min_available_nodes, min_successful=self.min_successful_clients)
        config["server-round"] = server_round + self.round_offset
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = construct_messages(self, record, node_ids, MessageType.TRAIN)
        self.recorder.sent(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The screened FedAvg average, then Flower's server step from the model sent this round."""
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.received(replies)
        sent = self._sent_arrays
        accepted, averages = self.screen.accept_and_average(
            replies, stats_layout=None, parameter_layout=describe(sent) if sent is not None else {},
            min_successful=self.min_successful_clients, order=self.sampler.reply_order, reference=sent,
        )
        arrays, metrics = None, None
        if averages is not None:
            log_train_replies(self, accepted)
            average = averages.model
            if sent is not None:
                average = self.server_step.step(server_round, record_views(sent), average)
            arrays = numpy_to_record(average)
            metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        else:
            failed_round_warning(server_round, len(accepted), self.min_successful_clients)
        metrics = self.recorder.finish_round(
            server_round, metrics, accepted=len(accepted), failed=len(replies) - len(accepted), round_failed=arrays is None
        )
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Every ``client_eval_every`` rounds, all nodes evaluate the model on their held-out data."""
        return client_evaluation_messages(
            self, every=self.client_eval_every, true_round=server_round + self.round_offset,
            arrays=arrays, config=config, nodes=lambda: self.sampler.ordered(grid),
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, standard deviation and worst-10 % mean of the clients' accuracies."""
        return self.recorder.client_evaluation(server_round + self.round_offset, replies)
