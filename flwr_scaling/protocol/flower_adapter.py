"""Every use of a Flower internal, in one place (read from Flower 1.42.0).

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr.serverapp.strategy``, ``flwr.simulation.run_simulation``) is imported
where it is used. What is not public (private methods of ``FedAvg``, private
module paths, module globals, private fields of ``TaskIdentity`` and of message
metadata, the attributes Flower's FedOpt strategies keep their moments in) is
reached only through this module, each use with the Flower version it was
read from. ``tests/test_flower_adapter.py`` checks every one of them against
the installed Flower and names the one that moved; when it fails, re-read that
symbol in the new Flower and update it here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

# Flower 1.42.0: ``flwr.supercore.log`` (lazily bound to ``flwr.supercore.logger.log``) is the
# logger Flower's own strategies write to; ``flwr.common.logger.log`` is the same function.
from flwr.supercore import log  # noqa: F401  (re-exported)

# Flower 1.42.0: ``flwr.common.constant`` (not re-exported by flwr.app): the server's node id
# as the source of the messages a ServerApp makes, and the error codes of failed replies.
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # noqa: F401  (re-exported)

# Flower 1.42.0: ``flwr.common.serde.message_to_proto`` / ``message_from_proto``: how a message
# is serialised between SuperLink and SuperNode.
from flwr.common.serde import message_from_proto, message_to_proto

# Flower 1.42.0: ``flwr.app.message.message.make_message``: the only way to build a Message
# with given metadata (``Message(...)`` makes fresh metadata); used for error replies.
from flwr.app.message.message import make_message

# Flower 1.42.0: ``flwr.supercore.task_identity.TaskIdentity`` with class attributes
# ``_task_id``, ``_run_id``, ``_node_id`` behind metaclass properties; a Message can only be
# built while they are set (inside a ServerApp or ClientApp process).
from flwr.supercore.task_identity import TaskIdentity

# Flower 1.42.0: ``flwr.serverapp.strategy.fedopt.FedOpt`` (private module path; the class is
# not exported by ``flwr.serverapp.strategy``): the base of FedAdam, FedYogi and FedAdagrad.
from flwr.serverapp.strategy.fedopt import FedOpt

# Flower 1.42.0: ``flwr.serverapp.exception.InconsistentMessageReplies``: what FedAvg's reply
# validation raises (the tests check that the strategy never gets there).
from flwr.serverapp.exception import InconsistentMessageReplies  # noqa: F401  (re-exported)

FLOWER_VERSION = "1.42.0"  # the version every use below was read from

# Flower 1.42.0: the simulation runtime's message extractor, a module global of this module
# (``add_messages_to_queue(state, queue, nodes_mapping, f_stop)``), looked up at call time.
VCE_API_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
# Flower 1.42.0: the module behind ``flwr.simulation.run_simulation`` (the package exports a
# function of the same name); its global ``InMemoryGrid`` is the grid class the ServerApp gets.
SIMULATION_RUNTIME_MODULE = "flwr.simulation.run_simulation"

# Flower 1.42.0: the private fields of ``Metadata`` that a SuperLink fills in (read-only properties).
_METADATA_MESSAGE_ID = "_message_id"
_METADATA_RUN_ID = "_run_id"


# --------------------------------------------------------------------------- messages
def construct_messages(strategy: FedAvg, record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
    """One message per node, all carrying ``record``: Flower 1.42.0's private ``FedAvg._construct_messages``."""
    return list(strategy._construct_messages(record, node_ids, message_type))  # noqa: SLF001


def log_train_replies(strategy: FedAvg, replies: list[Message]) -> None:
    """FedAvg's log line about a round's training replies, without its validation.

    Flower 1.42.0's private ``FedAvg._check_and_log_replies(replies, is_train, validate)``.
    """
    strategy._check_and_log_replies(replies, is_train=True, validate=False)  # noqa: SLF001


def error_reply(metadata: Metadata, error: Error) -> Message:
    """A reply with ``metadata`` that carries ``error`` instead of content (Flower 1.42.0's ``make_message``)."""
    return make_message(metadata=metadata, error=error)


def wire_copy(message: Message) -> Message:
    """The message as the other side receives it: serialised to protobuf bytes and parsed again."""
    proto = message_to_proto(message)
    return message_from_proto(type(proto).FromString(proto.SerializeToString()))


def stamp_message(message: Message, *, message_id: str, run_id: int | None = None) -> None:
    """Give a message the id (and run id) a SuperLink would (Flower 1.42.0: private ``Metadata`` fields)."""
    message.metadata.__dict__[_METADATA_MESSAGE_ID] = message_id
    if run_id is not None:
        message.metadata.__dict__[_METADATA_RUN_ID] = run_id


@contextlib.contextmanager
def task_identity(*, task_id: int, run_id: int, node_id: int) -> Iterator[None]:
    """Messages made inside the block name this run and node as their source, as in an app process.

    The previous identity (unset outside an app: ``None``) is put back afterwards.
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


# ------------------------------------------------------------------ FedOpt server step
class _GivenAverage(FedOpt):
    """Stands in for FedAvg's averaging below a Flower FedOpt strategy.

    Flower 1.42.0's ``FedAdam/FedYogi/FedAdagrad.aggregate_train`` first call
    ``super().aggregate_train(server_round, replies)`` for the FedAvg average,
    then step from ``self.current_arrays`` with the moments ``self.m_t`` /
    ``self.v_t``. In ``class Step(FedAdam, _GivenAverage)`` that ``super()``
    call lands here and returns ``average``: an average screened and computed
    by this project, so Flower's own code does the rest.
    """

    average: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.average, None


def fedopt_stepper(flower_class: type[FedOpt], **options) -> FedOpt:
    """A ``flower_class`` (FedAdam, FedYogi or FedAdagrad) whose ``aggregate_train`` steps from a given average."""
    step_class = type(f"{flower_class.__name__}Step", (flower_class, _GivenAverage), {})
    return step_class(**options)


def fedopt_step(stepper: FedOpt, server_round: int, current: Mapping[str, np.ndarray], average: ArrayRecord) -> ArrayRecord:
    """Flower's server update from ``current`` towards ``average``; the moments in ``stepper`` move on."""
    stepper.current_arrays = {k: np.asarray(v) for k, v in current.items()}
    stepper.average = average
    try:
        arrays, _ = stepper.aggregate_train(server_round, [])
    finally:
        stepper.average = None
        stepper.current_arrays = None
    assert arrays is not None  # an average was given
    return arrays


def fedopt_moments(stepper: FedOpt) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """``(m_t, v_t)``: where Flower 1.42.0's FedOpt keeps its moments (``None`` before the first step)."""
    return stepper.m_t, stepper.v_t


def set_fedopt_moments(stepper: FedOpt, m_t: dict[str, np.ndarray] | None, v_t: dict[str, np.ndarray] | None) -> None:
    """Put moments back (a resumed run), see ``fedopt_moments``."""
    stepper.m_t, stepper.v_t = m_t, v_t


# -------------------------------------------------------------------- simulation runtime
@contextlib.contextmanager
def simulation_delivery(
    make_extractor: Callable[[], Callable], wrap_grid: Callable[[type], type]
) -> Iterator[bool]:
    """For one ``run_simulation`` call: the runtime's message extractor and grid class replaced.

    ``make_extractor()`` gives a function with the signature of Flower
    1.42.0's ``vce_api.add_messages_to_queue(state, queue, nodes_mapping,
    f_stop)``; ``wrap_grid(InMemoryGrid)`` a subclass of the runtime's grid.
    Both module globals are put back afterwards. If this Flower lacks them,
    nothing is replaced and the run works as Flower's own (yields whether the
    replacement is in place); ``tests/test_flower_adapter.py`` fails then.
    """
    try:
        vce_api = importlib.import_module(VCE_API_MODULE)
        runtime = importlib.import_module(SIMULATION_RUNTIME_MODULE)
    except ImportError:
        yield False
        return
    extractor = getattr(vce_api, "add_messages_to_queue", None)
    grid_class = getattr(runtime, "InMemoryGrid", None)
    if extractor is None or grid_class is None or not hasattr(grid_class, "push_messages"):
        yield False
        return
    vce_api.add_messages_to_queue = make_extractor()
    runtime.InMemoryGrid = wrap_grid(grid_class)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = extractor
        runtime.InMemoryGrid = grid_class


# -------------------------------------------------------------------- Ray start-up
def flower_ray_settings(init_args: Mapping[str, object]) -> dict[str, object]:
    """The ``ray.init`` arguments Flower's Ray backend would use for the backend config's ``init_args``.

    Flower 1.42.0, ``RayBackend.init_ray`` (``flwr/server/superlink/fleet/vce/backend/raybackend.py``):
    unless Ray is initialised already, it exports this process's ``sys.path`` as ``PYTHONPATH`` (to
    the environment and to the workers' ``runtime_env``, so that the actors import the app), turns
    the dashboard off unless asked, and calls ``ray.init``. This does the same environment change and
    returns the arguments, so that a Ray started early (``run.ray_start``) is the one Flower would
    have started; Flower then finds it initialised and uses it.
    """
    settings = dict(init_args)
    settings.setdefault("include_dashboard", False)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    settings["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
    return settings
