"""The simulation's event-driven message extractor (``simulation._extractor``), in-process, no Ray."""

from __future__ import annotations

import importlib
import queue
import threading
import time
from types import SimpleNamespace

from flwr_scaling.run import simulation


class FakeState:
    """Just ``get_message_ins`` of Flower's LinkState: undelivered messages per node, and who was asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, list] = {}
        self.asked: list[int] = []

    def store(self, node_id: int, message) -> None:
        with self.lock:
            self.pending.setdefault(node_id, []).append(message)

    def get_message_ins(self, node_id: int, limit: int | None):
        with self.lock:
            self.asked.append(node_id)
            found = self.pending.get(node_id, [])
            taken, self.pending[node_id] = found[:limit], found[limit:]
            return taken


def message(node_id: int):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node_id))


def start(deliveries, state, nodes):
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=simulation._extractor(deliveries), args=(state, out, nodes, stop), daemon=True)
    thread.start()
    return out, stop, thread


def test_a_push_is_handed_on_at_once_and_only_its_nodes_are_asked(monkeypatch):
    monkeypatch.setattr(simulation, "FULL_SWEEP_S", 3600.0)
    monkeypatch.setattr(simulation, "DELIVERY_POLL_S", 10.0)  # only a push can wake it in this test
    deliveries, state = simulation._Deliveries(), FakeState()
    nodes = {node: None for node in range(1000)}
    out, stop, thread = start(deliveries, state, nodes)
    try:
        time.sleep(0.05)
        state.asked.clear()
        sent = [message(7), message(123)]
        for m in sent:
            state.store(m.metadata.dst_node_id, m)
        began = time.perf_counter()
        deliveries.pushed(m.metadata.dst_node_id for m in sent)
        got = [out.get(timeout=2.0), out.get(timeout=2.0)]
        assert time.perf_counter() - began < 1.0  # not the 10 s fallback
        assert {m.metadata.dst_node_id for m in got} == {7, 123}
        assert sorted(set(state.asked)) == [7, 123]  # not the other 998 nodes
        assert deliveries.waiting() == []
    finally:
        stop.set()
        deliveries.pushed([])  # wake it so that it sees the stop
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_message_the_grid_did_not_announce_is_found_by_the_full_sweep(monkeypatch):
    monkeypatch.setattr(simulation, "FULL_SWEEP_S", 0.2)
    monkeypatch.setattr(simulation, "DELIVERY_POLL_S", 0.05)
    deliveries, state = simulation._Deliveries(), FakeState()
    state.store(3, message(3))
    out, stop, thread = start(deliveries, state, {node: None for node in range(5)})
    try:
        assert out.get(timeout=3.0).metadata.dst_node_id == 3
    finally:
        stop.set()
        thread.join(timeout=5)


def test_a_node_with_two_messages_gets_both_and_a_vanished_message_is_forgotten(monkeypatch):
    monkeypatch.setattr(simulation, "FULL_SWEEP_S", 3600.0)
    monkeypatch.setattr(simulation, "DELIVERY_POLL_S", 0.02)
    deliveries, state = simulation._Deliveries(), FakeState()
    state.store(1, message(1))
    state.store(1, message(1))
    deliveries.pushed([1, 1, 2])  # node 2's message never reached the state (e.g. it expired)
    out, stop, thread = start(deliveries, state, {1: None, 2: None})
    try:
        assert [out.get(timeout=2.0).metadata.dst_node_id for _ in range(2)] == [1, 1]
        deadline = time.monotonic() + 2.0
        while deliveries.waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert deliveries.waiting() == []
    finally:
        stop.set()
        thread.join(timeout=5)


def test_prompt_delivery_replaces_flowers_globals_for_one_run_only():
    vce_api = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")
    runtime = importlib.import_module("flwr.simulation.run_simulation")
    extractor, grid_class = vce_api.add_messages_to_queue, runtime.InMemoryGrid
    with simulation._prompt_delivery() as installed:
        assert installed
        assert vce_api.add_messages_to_queue is not extractor
        assert issubclass(runtime.InMemoryGrid, grid_class) and runtime.InMemoryGrid is not grid_class
    assert vce_api.add_messages_to_queue is extractor and runtime.InMemoryGrid is grid_class
