"""Baselines on the server: Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad).

The strategy is SAVIC with the identity rule (FedAvg: the same sampling,
screening of replies, byte accounting and history), followed by one step of a
server optimizer on the averaged model change (Reddi et al. 2020,
arXiv:2003.00295). That step is not re-implemented here: it runs Flower's own
``FedAdam`` / ``FedYogi`` / ``FedAdagrad.aggregate_train`` code, fed with our
screened FedAvg average (see ``FlowerServerStep``).

FedProx and Local Adam need no server of their own: their server is FedAvg
(``Savic`` with rule ``identity``); what differs happens on the clients
(``flwr_scaling.core.local_sgd``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore import log

from flwr_scaling.protocol.records import numpy_to_record, record_views
from flwr_scaling.strategies.savic import Savic

NumpyArrays = dict[str, np.ndarray]


class _GivenAverage(FedOpt):
    """Takes the place of FedAvg's averaging below a Flower FedOpt strategy.

    In ``class _Step(FedAdam, _GivenAverage)`` the method resolution order is
    ``FedAdam -> _GivenAverage -> FedOpt -> FedAvg``, so the ``super().aggregate_train``
    inside Flower's ``FedAdam.aggregate_train`` returns ``average`` (already
    screened and averaged by ``Savic``) and Flower's code does the rest.
    """

    average: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.average, None


class _FedAdamStep(FedAdam, _GivenAverage):
    pass


class _FedYogiStep(FedYogi, _GivenAverage):
    pass


class _FedAdagradStep(FedAdagrad, _GivenAverage):
    pass


FLOWER_STRATEGIES = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
_STEPS = {"fedadam": _FedAdamStep, "fedyogi": _FedYogiStep, "fedadagrad": _FedAdagradStep}
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
        if name not in _STEPS:
            raise ValueError(f"unknown server optimizer {name!r}; choose one of {', '.join(_STEPS)}")
        if not eta > 0:
            raise ValueError(f"eta (server-lr) must be > 0, got {eta}")
        if not tau > 0:
            raise ValueError(f"tau (server-tau) must be > 0, got {tau}")
        options = {"eta": eta, "eta_l": eta_l, "tau": tau}
        if name != "fedadagrad":
            options.update(beta_1=beta_1, beta_2=beta_2)
        self.name = name
        self.flower: FedOpt = _STEPS[name](**options)

    def step(self, server_round: int, current: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]) -> NumpyArrays:
        """The next global model; ``server_round`` counts from 1 (FedAdam's bias correction uses it).

        The result has the dtypes of ``current`` (FedAdam's bias-corrected step is
        a float64 scalar, which would otherwise turn float32 models into float64).
        """
        opt = self.flower
        opt.current_arrays = {k: np.asarray(v) for k, v in current.items()}
        opt.average = numpy_to_record(average)
        try:
            arrays, _ = opt.aggregate_train(server_round, [])
        finally:
            opt.average = None
            opt.current_arrays = None
        assert arrays is not None
        return {k: np.asarray(a.numpy()).astype(current[k].dtype, copy=False) for k, a in arrays.items()}

    @property
    def state(self) -> NumpyArrays | None:
        """Flower's moments as ``{"m/<key>": m_t, "v/<key>": v_t}`` (``None`` before the first step)."""
        opt = self.flower
        if not opt.m_t and not opt.v_t:
            return None
        out = {f"m/{k}": np.asarray(v) for k, v in (opt.m_t or {}).items()}
        out.update({f"v/{k}": np.asarray(v) for k, v in (opt.v_t or {}).items()})
        return out

    @state.setter
    def state(self, state: Mapping[str, np.ndarray] | None) -> None:
        opt = self.flower
        if not state:
            opt.m_t, opt.v_t = None, None
            return
        bad = sorted(k for k in state if not k.startswith(("m/", "v/")))
        if bad:
            raise ValueError(f"server-optimizer state keys must start with 'm/' or 'v/', got {bad}")
        opt.m_t = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m/")} or None
        opt.v_t = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v/")} or None


class ServerOptimizer(Savic):
    """FedAvg (SAVIC with rule identity) plus a Flower FedOpt server step.

    Replies are screened and averaged exactly as by ``Savic``; the average then
    goes through Flower's FedAdam / FedYogi / FedAdagrad update from the model
    sent this round. The moments are the ``precond_state`` (keys ``m/<key>``
    and ``v/<key>``) so that checkpoints save and restore them; they are never
    sent to the clients.

    Parameters
    ----------
    optimizer : str
        "fedadam", "fedyogi" or "fedadagrad".
    eta, tau, eta_l, beta_1, beta_2 : float
        As in Flower's strategies (see ``FlowerServerStep``).
    **kwargs
        ``Savic``'s sampling and screening options (``precond`` must be identity).
    """

    def __init__(self, *, optimizer: str, eta: float = 0.1, tau: float = 1e-3, eta_l: float = 0.1,
                 beta_1: float = BETA_1, beta_2: float = BETA_2, **kwargs) -> None:
        if kwargs.setdefault("precond", "identity") != "identity":
            raise ValueError(f"{optimizer} takes no preconditioner; got precond={kwargs['precond']!r}")
        if kwargs.pop("server_lr", 1.0) != 1.0:
            raise ValueError("the server step size of a FedOpt strategy is eta, not server_lr")
        self.server_step = FlowerServerStep(optimizer, eta=eta, tau=tau, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2)
        self._hide_state = False
        super().__init__(server_lr=1.0, **kwargs)  # FedAvg's plain mean; eta acts in the Flower step

    # Savic's own code reads ``precond_state`` to send it and to check reply
    # statistics; for this strategy there is no preconditioner, so it sees None.
    @property
    def precond_state(self) -> NumpyArrays | None:
        return None if self._hide_state else self.server_step.state

    @precond_state.setter
    def precond_state(self, state: Mapping[str, np.ndarray] | None) -> None:
        if self._hide_state:  # Savic never writes a state for rule identity
            return
        self.server_step.state = state

    def summary(self) -> None:
        opt = self.server_step.flower
        log(INFO, "\t├──> Server optimizer: Flower %s", type(opt).__mro__[1].__name__)
        log(INFO, "\t│\t├── eta %g | eta_l %g | tau %g", opt.eta, opt.eta_l, opt.tau)
        log(INFO, "\t│\t└── beta_1 %g | beta_2 %g", opt.beta_1, opt.beta_2)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._hide_state = True
        try:
            return super().configure_train(server_round, arrays, config, grid)
        finally:
            self._hide_state = False

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Savic's screened FedAvg average, then Flower's server step from the model sent this round."""
        self._hide_state = True
        try:
            average, metrics = super().aggregate_train(server_round, replies)
        finally:
            self._hide_state = False
        if average is None or self._sent_arrays is None:
            return average, metrics
        current = record_views(self._sent_arrays)
        updated = self.server_step.step(server_round + self.round_offset, current, record_views(average))
        return numpy_to_record(updated), metrics
