"""A Flower quickstart-pytorch client turned into a SAVIC client, run against ``Savic``.

``Net``, ``train`` and the ClientApp below are written the way Flower's
quickstart-pytorch example writes them (a small CNN for 32x32x3 images, a
DataLoader of ``{"img", "label"}`` batches, ``loss.backward();
optimizer.step()``), with the README's few changed lines: the torch
optimizer (``torch.optim.Adam`` in the example) becomes ``ScaledSGD`` built
from the message, and the reply carries ``optimizer.statistic()``. Two rounds of it
must give the model that ``train_scaled`` gives on the same data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader

from flwr_scaling import ScaledSGD
from flwr_scaling.clients import TrainSettings, train_scaled
from flwr_scaling.clients.preconditioner_message import preconditioner_from_message, put_statistic
from flwr_scaling.core.arrays import numpy_to_torch, torch_to_numpy
from flwr_scaling.protocol.records import record_to_numpy
from flwr_scaling.protocol.wire import put_encoded, take_encoded
from flwr_scaling.run.inprocess import InProcessGrid, server_identity
from flwr_scaling.strategies import Savic

NUM_NODES, IMAGES_PER_NODE, BATCH = 3, 12, 4


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz'), as in quickstart-pytorch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_data(partition_id: int) -> DataLoader:
    """This node's images as quickstart-pytorch's loader gives them: batches of ``{"img", "label"}``."""
    gen = torch.Generator().manual_seed(100 + partition_id)
    images = torch.rand(IMAGES_PER_NODE, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (IMAGES_PER_NODE,), generator=gen)
    return DataLoader([{"img": x, "label": y} for x, y in zip(images, labels)], batch_size=BATCH, shuffle=False)


def train(net, trainloader, epochs, lr, device, msg, context):
    """Train the model on the training set (quickstart-pytorch's ``train``; the optimizer line changed)."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = ScaledSGD(net.named_parameters(), lr=lr, precond=preconditioner_from_message(msg, context))
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / len(trainloader), optimizer


quickstart_app = ClientApp()


@quickstart_app.train()
def quickstart_train(msg: Message, context: Context):
    """Train the model on local data (quickstart-pytorch's ClientApp, plus the statistic in the reply)."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader = load_data(context.node_config["partition-id"])
    train_loss, optimizer = train(model, trainloader, 1, msg.content["config"]["lr"], "cpu", msg, context)
    metrics = {"train_loss": train_loss, "num-examples": len(trainloader.dataset)}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    put_statistic(content, optimizer, msg)
    return Message(content=content, reply_to=msg)


reference_app = ClientApp()


@reference_app.train()
def reference_train(msg: Message, context: Context):
    """The same node through ``train_scaled`` (the package's ClientApp's trainer) on the same batches."""
    config = msg.content["config"]
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    batches = [(batch["img"], batch["label"]) for batch in load_data(context.node_config["partition-id"])]
    settings = TrainSettings(rule=config["precond"], mode=config["precond-mode"], lr=config["lr"],
                             alpha=config["precond-alpha"], beta=config["precond-beta"],
                             adam_beta1=config["adam-beta1"], num_probes=config["precond-probes"])
    state = take_encoded(msg.content, "precond", dtype=config["precond-dtype"]) if "precond" in msg.content else None
    result = train_scaled(model, batches, settings, numpy_to_torch(state) if state is not None else None)
    payload = result.statistic if result.statistic is not None else result.state
    metrics = {"train_loss": result.train_loss, "num-examples": result.num_examples}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    put_encoded(content, "stats", torch_to_numpy(payload), dtype=config["precond-dtype"])
    return Message(content=content, reply_to=msg)


def two_rounds(app: ClientApp, rule: str, mode: str):
    torch.manual_seed(0)
    initial = ArrayRecord(Net().state_dict())
    strategy = Savic(precond=rule, precond_mode=mode, precond_init="ones", lr=0.01, fraction_train=1.0,
                     min_train_nodes=NUM_NODES, min_available_nodes=NUM_NODES, sampling_seed=0)
    with server_identity():
        result = strategy.start(grid=InProcessGrid(client_app=app, num_nodes=NUM_NODES), initial_arrays=initial,
                                num_rounds=2, train_config=ConfigRecord({}))
    return record_to_numpy(result.arrays), strategy


@pytest.mark.parametrize("rule, mode", [("adam", "global"), ("adam", "local"), ("rmsprop", "local")])
def test_quickstart_client_matches_train_scaled(rule, mode):
    ours, strategy = two_rounds(quickstart_app, rule, mode)
    reference, reference_strategy = two_rounds(reference_app, rule, mode)
    assert [strategy.history[r]["clients_ok"] for r in (1, 2)] == [NUM_NODES, NUM_NODES]
    torch.manual_seed(0)
    untrained = Net().state_dict()
    assert not torch.equal(torch.from_numpy(ours["fc3.weight"]), untrained["fc3.weight"])  # it did train
    assert list(ours) == list(reference)
    for key, value in reference.items():
        torch.testing.assert_close(torch.from_numpy(ours[key]), torch.from_numpy(value), rtol=1e-5, atol=1e-7,
                                   msg=key)
    for key, value in reference_strategy.precond_state.items():  # the server's state v after round 2
        torch.testing.assert_close(torch.from_numpy(strategy.precond_state[key]), torch.from_numpy(value),
                                   rtol=1e-5, atol=1e-9, msg=key)
