"""Every Flower internal that ``flwr_scaling.protocol.flower_adapter`` uses is still where it was read from.

When one of these tests fails, Flower moved the named symbol: read it again in
the installed Flower and update the adapter (nothing else in the package
touches Flower internals).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedYogi

from flwr_scaling.protocol import flower_adapter as adapter

VERSION = adapter.FLOWER_VERSION


def moved(symbol: str, what: str) -> str:
    return f"Flower moved {symbol} (read from Flower {VERSION}): {what}; update flwr_scaling/protocol/flower_adapter.py"


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture
def identity():
    with adapter.task_identity(task_id=1, run_id=7, node_id=adapter.SUPERLINK_NODE_ID):
        yield


def test_the_version_the_adapter_was_read_from_is_named():
    assert VERSION == "1.42.0"


# ------------------------------------------------------------------------ FedAvg
def test_fedavg_construct_messages():
    method = getattr(FedAvg, "_construct_messages", None)
    assert callable(method), moved("FedAvg._construct_messages", "no such method")
    assert parameters(method) == ["self", "record", "node_ids", "message_type"], moved(
        "FedAvg._construct_messages", f"parameters are now {parameters(method)}"
    )


def test_fedavg_check_and_log_replies():
    method = getattr(FedAvg, "_check_and_log_replies", None)
    assert callable(method), moved("FedAvg._check_and_log_replies", "no such method")
    assert parameters(method) == ["self", "replies", "is_train", "validate"], moved(
        "FedAvg._check_and_log_replies", f"parameters are now {parameters(method)}"
    )


def test_construct_messages_gives_one_message_per_node(identity):
    record = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    messages = adapter.construct_messages(FedAvg(), record, [3, 5], "train")
    assert [(m.metadata.dst_node_id, m.metadata.message_type) for m in messages] == [(3, "train"), (5, "train")], moved(
        "FedAvg._construct_messages", "it no longer makes one message per node"
    )


# ---------------------------------------------------------------- messages, serde
def test_make_message():
    assert parameters(adapter.make_message) == ["metadata", "content", "error"], moved(
        "flwr.app.message.message.make_message", f"parameters are now {parameters(adapter.make_message)}"
    )


def test_error_reply_keeps_the_metadata(identity):
    message = Message(RecordDict(), 3, "train")
    reply = adapter.error_reply(message.metadata, Error(code=4602, reason="bad"))
    assert reply.has_error() and reply.error.reason == "bad", moved("make_message", "error replies are not built")
    assert reply.metadata is message.metadata, moved("make_message", "the metadata given is not the one kept")


def test_serde_round_trip(identity):
    for name in ("message_to_proto", "message_from_proto"):
        function = getattr(importlib.import_module("flwr.common.serde"), name, None)
        assert callable(function), moved(f"flwr.common.serde.{name}", "no such function")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})})
    received = adapter.wire_copy(Message(content, 3, "train"))
    assert received.content["arrays"]["w"].numpy().tolist() == [0.0, 1.0, 2.0], moved(
        "flwr.common.serde.message_to_proto/message_from_proto", "a message does not survive the round trip"
    )


def test_constants():
    assert isinstance(adapter.SUPERLINK_NODE_ID, int), moved("flwr.common.constant.SUPERLINK_NODE_ID", "not an int")
    for code in ("UNKNOWN", "CLIENT_APP_RAISED_EXCEPTION"):
        assert isinstance(getattr(adapter.ErrorCode, code, None), int), moved(f"flwr.common.constant.ErrorCode.{code}", "missing")


def test_metadata_private_fields(identity):
    message = Message(RecordDict(), 3, "train")
    for field in (adapter._METADATA_MESSAGE_ID, adapter._METADATA_RUN_ID):  # noqa: SLF001
        assert field in message.metadata.__dict__, moved(f"Metadata.{field}", "no such instance field")
    adapter.stamp_message(message, message_id="abc", run_id=9)
    assert (message.metadata.message_id, message.metadata.run_id) == ("abc", 9), moved(
        "Metadata._message_id/_run_id", "the public properties do not read them"
    )


def test_task_identity_fields():
    task_identity = adapter.TaskIdentity
    for field in ("_task_id", "_run_id", "_node_id"):
        assert field in vars(task_identity), moved(f"flwr.supercore.task_identity.TaskIdentity.{field}", "no such field")
    before = (task_identity._task_id, task_identity._run_id, task_identity._node_id)  # noqa: SLF001
    with adapter.task_identity(task_id=2, run_id=3, node_id=4):
        assert (task_identity.task_id, task_identity.run_id, task_identity.node_id) == (2, 3, 4), moved(
            "TaskIdentity.task_id/run_id/node_id", "the properties do not read the fields set"
        )
        assert Message(RecordDict(), 5, "train").metadata.run_id == 3, moved("TaskIdentity", "messages ignore it")
    assert (task_identity._task_id, task_identity._run_id, task_identity._node_id) == before  # noqa: SLF001


def test_inconsistent_message_replies_is_an_exception():
    assert issubclass(adapter.InconsistentMessageReplies, Exception), moved(
        "flwr.serverapp.exception.InconsistentMessageReplies", "not an exception class"
    )


def test_log_is_flowers_logger():
    assert callable(adapter.log), moved("flwr.supercore.log", "not callable")


# ------------------------------------------------------------------------ FedOpt
@pytest.mark.parametrize("flower_class", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_family(flower_class):
    assert issubclass(flower_class, adapter.FedOpt), moved(
        "flwr.serverapp.strategy.fedopt.FedOpt", f"{flower_class.__name__} no longer derives from it"
    )
    stepper = adapter.fedopt_stepper(flower_class, eta=0.1, eta_l=0.1, tau=1e-3)
    for field in ("current_arrays", "m_t", "v_t"):
        assert hasattr(stepper, field), moved(f"{flower_class.__name__}.{field}", "no such attribute")


def test_fedopt_step_runs_flowers_update_on_the_given_average():
    """FedAdagrad round 1 by hand (beta_1 = 0): Δ = 2, m = Δ = 2, v = Δ² = 4, x + η·m/(√v + τ) = 1 + 0.1·2/2.001."""
    stepper = adapter.fedopt_stepper(FedAdagrad, eta=0.1, eta_l=0.1, tau=1e-3)
    current = {"w": np.ones(2, dtype=np.float32)}
    new = adapter.fedopt_step(stepper, 1, current, ArrayRecord({"w": Array(np.full(2, 3.0, dtype=np.float32))}))
    np.testing.assert_allclose(new["w"].numpy(), 1 + 0.1 * 2 / 2.001, rtol=1e-6, err_msg=moved(
        "FedAdagrad.aggregate_train", "it no longer steps from super().aggregate_train's average and current_arrays"
    ))
    m_t, v_t = adapter.fedopt_moments(stepper)
    np.testing.assert_allclose(v_t["w"], 4.0, err_msg=moved("FedOpt.v_t", "the second moment is kept elsewhere"))
    assert stepper.current_arrays is None  # reset after the step
    adapter.set_fedopt_moments(stepper, None, None)
    assert adapter.fedopt_moments(stepper) == (None, None)


# ------------------------------------------------------------- simulation runtime
def test_simulation_runtime_globals():
    vce_api = importlib.import_module(adapter.VCE_API_MODULE)
    extractor = getattr(vce_api, "add_messages_to_queue", None)
    assert callable(extractor), moved(f"{adapter.VCE_API_MODULE}.add_messages_to_queue", "no such global")
    assert parameters(extractor) == ["state", "queue", "nodes_mapping", "f_stop"], moved(
        f"{adapter.VCE_API_MODULE}.add_messages_to_queue", f"parameters are now {parameters(extractor)}"
    )
    runtime = importlib.import_module(adapter.SIMULATION_RUNTIME_MODULE)
    grid_class = getattr(runtime, "InMemoryGrid", None)
    assert isinstance(grid_class, type), moved(f"{adapter.SIMULATION_RUNTIME_MODULE}.InMemoryGrid", "no such global")
    assert callable(getattr(grid_class, "push_messages", None)), moved("InMemoryGrid.push_messages", "no such method")
    assert "pull_interval" in parameters(grid_class.__init__), moved("InMemoryGrid(pull_interval=...)", "no such parameter")


def test_simulation_delivery_swaps_and_restores_both_globals():
    vce_api = importlib.import_module(adapter.VCE_API_MODULE)
    runtime = importlib.import_module(adapter.SIMULATION_RUNTIME_MODULE)
    extractor, grid_class = vce_api.add_messages_to_queue, runtime.InMemoryGrid

    def replacement(state, queue, nodes_mapping, f_stop):
        return None

    with adapter.simulation_delivery(lambda: replacement, lambda base: type("Wrapped", (base,), {})) as installed:
        assert installed, moved("the simulation runtime globals", "the replacement was not installed")
        assert vce_api.add_messages_to_queue is replacement
        assert runtime.InMemoryGrid.__name__ == "Wrapped" and issubclass(runtime.InMemoryGrid, grid_class)
    assert (vce_api.add_messages_to_queue, runtime.InMemoryGrid) == (extractor, grid_class)


def test_flowers_ray_backend_starts_ray_only_when_it_is_not_running():
    # run.simulation starts Ray early with flower_ray_settings and relies on Flower then using it.
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    source = inspect.getsource(RayBackend.init_ray)
    for needed in ("if not ray.is_initialized()", 'setdefault("include_dashboard", False)', "PYTHONPATH",
                   'runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}'):
        assert needed in source, moved("RayBackend.init_ray", f"it no longer has {needed!r}")


def test_flower_ray_settings_are_flowers_init_arguments(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/from/env")
    settings = adapter.flower_ray_settings({"logging_level": 40, "log_to_driver": False})
    expected = os.pathsep.join(sys.path) + os.pathsep + "/from/env"
    assert settings == {"logging_level": 40, "log_to_driver": False, "include_dashboard": False,
                        "runtime_env": {"env_vars": {"PYTHONPATH": expected}}}
    assert os.environ["PYTHONPATH"] == expected  # exported, as Flower does, for processes started later
    assert adapter.flower_ray_settings({"include_dashboard": True})["include_dashboard"] is True
