"""A device needs only its own data: the server sends the model's input shape and classes,
so a node whose copy of the run's dataset does not exist still trains, warms up and evaluates.
Two devices with the same local path and no ``partition-id`` still draw different batches."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from sklearn.datasets import load_digits

from flwr_scaling.clients import client_app, node_data
from flwr_scaling.clients.logic import model_keys, model_shape
from flwr_scaling.core.arrays import torch_to_numpy
from flwr_scaling.core.seeding import initial_model
from flwr_scaling.errors import ConfigError, DataError
from flwr_scaling.protocol.records import numpy_to_record
from flwr_scaling.run.config import RunConfig

MISSING_RUN_DATA = "csv:/nonexistent/the-servers-copy/digits.csv"
ROWS = 40


@pytest.fixture
def own_file(tmp_path):
    """The device's own file: 40 digits (64 pixel columns and a label), in the run's feature space."""
    digits = load_digits()
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"x{i}" for i in range(64)] + ["label"])
        for row, label in zip(digits.data[:ROWS] / 16.0, digits.target[:ROWS]):
            writer.writerow([f"{v:.4g}" for v in row] + [int(label)])
    return path


def server_config() -> dict:
    """What the server sends: its resolved run config (a dataset path only it has) and the model's shape."""
    config = RunConfig(dataset="digits", model="cnn", precond="adam", rounds=2).to_flower()
    # A CSV run for the CNN names its input shape (flat pixels as 1x8x8 images).
    return {**config, "dataset": MISSING_RUN_DATA, "input-shape": "1x8x8", **model_keys((1, 8, 8), 10),
            "server-round": 1}


def message(kind: str, config: dict) -> Message:
    arrays = torch_to_numpy(initial_model("cnn", (1, 8, 8), 10, 0).state_dict())
    content = RecordDict({"arrays": numpy_to_record(arrays), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=7, message_type=kind)


def device(own_file, node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"data-path": f"csv:{own_file}"}, state=RecordDict(),
                   run_config={})


@pytest.mark.usefixtures("task_identity")
def test_a_device_without_the_runs_dataset_trains_warms_up_and_evaluates_on_its_own_file(own_file):
    config = server_config()
    reply = client_app.app(message(MessageType.TRAIN, config), device(own_file))
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] == ROWS
    assert np.isfinite(reply.content["metrics"]["train_loss"])
    assert tuple(reply.content["arrays"]["classifier.weight"].shape) == (10, 128)

    warm = client_app.app(message(f"{MessageType.QUERY}.precond_stats", config), device(own_file))
    assert not warm.has_error(), warm.error
    assert warm.content["metrics"]["num-examples"] == ROWS

    evaluation = client_app.app(message(MessageType.EVALUATE, config), device(own_file))
    assert not evaluation.has_error(), evaluation.error
    assert evaluation.content["metrics"]["num-examples"] == ROWS


@pytest.mark.usefixtures("task_identity")
def test_without_the_model_shape_a_device_needs_the_runs_dataset(own_file):
    # What every device needed before: the run's dataset, only to learn the model's shape.
    config = {k: v for k, v in server_config().items() if k not in ("model-input-shape", "num-classes")}
    with pytest.raises(DataError, match="/nonexistent/the-servers-copy/digits.csv does not exist"):
        client_app.app(message(MessageType.TRAIN, config), device(own_file))


def test_devices_with_the_same_path_and_no_partition_id_are_seeded_apart(own_file):
    cfg = RunConfig(dataset="digits").resolved()
    config = {"data-path": f"csv:{own_file}"}
    assert node_data.node_key(config, cfg, 7) == 7 and node_data.node_key(config, cfg, 8) == 8
    assert node_data.reported_rank(config) is None  # the server ranks it (assign_ranks)
    assert node_data.node_key({**config, "partition-id": 3}, cfg, 7) == 3
    assert node_data.reported_rank({**config, "partition-id": 3}) == 3
    with pytest.raises(ConfigError, match="add partition-id=I"):
        node_data.node_key(config, cfg)


def test_model_shape_reads_what_the_server_sends():
    shape = model_shape(model_keys((1, 8, 8), 10))
    assert (shape.input_shape, shape.num_classes) == ((1, 8, 8), 10)
    assert model_shape({}) is None
    with pytest.raises(ConfigError, match="num-classes=1"):
        model_shape({"model-input-shape": "64", "num-classes": 1})
