"""Run configurations on Flower's simulation engine (Ray), in this process."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr_scaling.core.devices import cuda_available, run_threads, torch_threads, unavailable
from flwr_scaling.errors import ConfigError
from flwr_scaling.protocol.flower_adapter import flower_ray_settings, simulation_delivery
from flwr_scaling.run.checkpoint import Checkpoint
from flwr_scaling.run.notices import without_known_notices
from flwr_scaling.run.config import RunConfig, check_data_fits
from flwr_scaling.data.federated import check_partition, load_federated_data
from flwr_scaling.data.partition_plot import plot_partitions
from flwr_scaling.run.outdir import check_run_folder
from flwr_scaling.run.ray_start import RayStart
from flwr_scaling.run.recorder import read_metrics

# Flower's simulation runtime moves messages by polling, 0.1 s on each side: a
# thread looks for new messages every 0.1 s, asking the LinkState once per node
# (O(nodes x pending messages) per sweep), and the ServerApp's grid looks for
# replies every 0.1 s. On a small problem that is most of a round (measured on
# digits: 0.21 s per round against 0.07 s of work). ``simulate`` wakes the
# extractor when the grid pushes and asks only the nodes that were sent
# something, and lets the grid look for replies every REPLY_POLL_S.
REPLY_POLL_S = 0.005
DELIVERY_POLL_S = 0.1  # the extractor's fallback wake-up, Flower's own interval
FULL_SWEEP_S = 5.0  # and every so often it asks every node, as Flower does every time


class _Deliveries:
    """Which nodes the grid has sent messages to that the runtime has not picked up yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: Counter[int] = Counter()
        self._pushed = threading.Event()
        self._partitions: dict[int, int] = {}
        self._mapped = threading.Event()

    def mapped(self, nodes_mapping) -> None:
        """The runtime's node id -> partition id map (every node's ``partition-id`` node config)."""
        self._partitions = dict(nodes_mapping)
        self._mapped.set()

    def partitions(self, timeout: float) -> dict[int, int] | None:
        """The node id -> partition id map once the runtime has started (``None`` after ``timeout`` s)."""
        return dict(self._partitions) if self._mapped.wait(timeout) else None

    def pushed(self, node_ids: Iterable[int]) -> None:
        with self._lock:
            self._waiting.update(node_ids)
        self._pushed.set()

    def waiting(self) -> list[int]:
        with self._lock:
            return list(self._waiting)

    def picked_up(self, node_id: int, found: int) -> None:
        """``found`` messages for ``node_id`` were handed on (0: none is there any more; forget it)."""
        with self._lock:
            left = self._waiting[node_id] - found if found else 0
            if left > 0:
                self._waiting[node_id] = left
            else:
                del self._waiting[node_id]

    def wait(self, timeout: float) -> None:
        self._pushed.wait(timeout)
        self._pushed.clear()  # before the sweep: a push after this wakes the next wait at once


def _extractor(deliveries: _Deliveries):
    """A replacement for ``vce_api.add_messages_to_queue`` (same signature and the same LinkState calls)."""

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop: threading.Event) -> None:
        deliveries.mapped(nodes_mapping)
        next_full = time.monotonic() + FULL_SWEEP_S
        while not f_stop.is_set():
            full = time.monotonic() >= next_full
            if full:
                next_full = time.monotonic() + FULL_SWEEP_S
            for node_id in list(nodes_mapping.keys()) if full else deliveries.waiting():
                messages = state.get_message_ins(node_id=node_id, limit=1)
                for message in messages:
                    queue.put(message)
                if not full or messages:
                    deliveries.picked_up(node_id, len(messages))
            deliveries.wait(DELIVERY_POLL_S)

    return add_messages_to_queue


@contextmanager
def _prompt_delivery() -> Iterator[bool]:
    """For one ``run_simulation`` call: the event-driven extractor and a grid that announces its pushes.

    Both replace module globals of Flower's simulation runtime (the same
    signatures, the same LinkState calls; ``flower_adapter.simulation_delivery``)
    and are put back afterwards; if Flower moved them, nothing is replaced and
    the run polls as before (yields whether the replacement is in place).
    """
    deliveries = _Deliveries()

    def prompt(grid_class: type) -> type:
        class PromptGrid(grid_class):
            def __init__(self, *args, **kwargs) -> None:
                kwargs.setdefault("pull_interval", REPLY_POLL_S)
                super().__init__(*args, **kwargs)

            def push_messages(self, messages):
                messages = list(messages)
                ids = list(super().push_messages(messages))
                deliveries.pushed(m.metadata.dst_node_id for m in messages)
                return ids

            def node_partitions(self, timeout: float) -> dict[int, int] | None:
                """Node id -> partition id as the runtime gave the nodes (``server_app.describe_nodes``
                then needs no query per node); ``None`` if the runtime has not started after ``timeout`` s."""
                return deliveries.partitions(timeout)

        return PromptGrid

    with simulation_delivery(lambda: _extractor(deliveries), prompt) as installed:
        yield installed


def check_device(cfg: RunConfig) -> None:
    """ConfigError (one line) when this machine lacks the device ``cfg`` names (``auto`` never fails)."""
    problem = unavailable(cfg.device)
    if problem:
        raise ConfigError(problem)


def check_ray_resources(cfg: RunConfig, *, cluster: bool) -> None:
    """ConfigError (one line) when the client actors cannot get what ``cfg`` asks of Ray: ``client-gpus > 0``
    on a machine without CUDA, or ``device cuda`` for clients that Ray gives no GPU. ``cluster``: the
    actors run on a Ray cluster this process is attached to, whose GPUs this machine cannot see."""
    if cfg.client_gpus > 0 and not cluster and not cuda_available():
        raise ConfigError(f"client-gpus {cfg.client_gpus:g}: this machine has no CUDA GPU for Ray to share among "
                          f"the clients; leave client-gpus at 0 (or attach to a GPU cluster with --ray-address)")
    if cfg.device.startswith("cuda") and cfg.client_gpus == 0:
        raise ConfigError(f"device {cfg.device} with the simulation backend needs --client-gpus > 0 (e.g. 0.25: four "
                          f"clients share a GPU): Ray lets a client actor that asks for no GPU see none; "
                          f"or use --backend inprocess")


def preflight(cfg: RunConfig) -> None:
    """Everything that can fail before the first round: options, device, data, partitions (``simulate``
    starts Ray meanwhile, after the options and the files' existence passed, and stops it if this fails)."""
    cfg.validate()
    check_device(cfg)
    check_data_fits(cfg, load_federated_data(cfg.data_spec()))  # e.g. images too small for the model
    # Every client's share in one check: the iid and shard splits on the labels alone, the Dirichlet
    # split by cutting partition 0 (its partitioner assigns all rows at the first request). Cutting every
    # partition here cost seconds for 1,000 clients, and is repeated for every run of a sweep.
    check_partition(cfg.partition_spec())


HEATMAP = "partitions.png"  # who holds which labels


def prepare_output(cfg: RunConfig, resume: Checkpoint | None, *, heatmap: bool = True) -> None:
    """Preflight ``cfg``, then make ``cfg.out`` ready: another run's results refused
    unless the caller claimed the folder (``run.outdir``), the partition heatmap written
    (unless ``heatmap`` is False: the caller draws it, see ``HeatmapThread``)."""
    preflight(cfg)
    out = Path(cfg.out)
    check_run_folder(out, resume=resume is not None)  # nothing of another run is deleted or overwritten
    out.mkdir(parents=True, exist_ok=True)
    if heatmap:
        plot_partitions(cfg.partition_spec(), out / HEATMAP)


class HeatmapThread:
    """The partition heatmap drawn on a thread while the simulation starts (the actors take seconds to
    import the client code; the heatmap was 0.6 s of a 1,000-node start-up, ``benchmarks/scale.py``).

    ``finish()`` waits for it and raises its error, if any. ``preflight`` checked the settings
    before, so an error here is a fault, not bad input.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self._problem: BaseException | None = None
        self._thread = threading.Thread(target=self._draw, args=(cfg,), name="flwr-scaling-heatmap", daemon=True)
        self._thread.start()

    def _draw(self, cfg: RunConfig) -> None:
        try:
            plot_partitions(cfg.partition_spec(), Path(cfg.out) / HEATMAP)
        except BaseException as problem:  # raised again by finish(), on the caller's thread
            self._problem = problem

    def finish(self) -> None:
        self._thread.join()
        if self._problem is not None:
            raise self._problem


def quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)


def backend_config(cfg: RunConfig, verbose: bool = False) -> dict:
    """Flower's Ray backend settings: ``client-cpus`` and ``client-gpus`` per client actor
    (so ``min(cores / client-cpus, GPUs / client-gpus)`` actors at once), quiet Ray."""
    # client-cpus defaults to 1, one thread per client actor: two actors on two cores beat
    # two actors fighting over four threads, and tiny models gain nothing from more.
    # Ray hides the GPUs from an actor that asks for none (CUDA_VISIBLE_DEVICES=""),
    # so a client trains on a GPU only with client-gpus > 0.
    return {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }


def simulate(
    config: RunConfig, *, verbose: bool = False, client_app=None, resume: Checkpoint | None = None
) -> list[dict[str, float]]:
    """Run one configuration end to end; return its ``metrics.csv`` rows.

    Writes ``OUT/config.json`` and ``OUT/metrics.csv`` (complete after every
    round). A previous run's files in ``OUT`` are replaced. ``client_app``
    replaces this project's ClientApp (tests wrap it to inject faults).
    With ``resume``, the run continues after the checkpoint's last round and
    keeps the folder's files.
    """
    import ray
    from flwr.simulation import run_simulation

    from flwr_scaling.clients import app as default_client_app

    client_app = client_app or default_client_app
    from flwr_scaling.server_app import make_server_app

    cfg = config.resolved()
    check_device(cfg)  # before the Ray check: "no CUDA here" is the first thing to fix
    attached = ray.is_initialized()  # attached to a cluster (--ray-address)
    check_ray_resources(cfg, cluster=attached)
    cfg.validate()  # the options and the data spec (files exist), cheaply, before Ray starts
    check_run_folder(Path(cfg.out), resume=resume is not None)
    out = Path(cfg.out)
    quiet_flower(verbose)
    # Ray's workers inherit this process's environment.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    backend = backend_config(cfg, verbose)
    with without_known_notices():
        # Ray comes up while the data is read, and the heatmap is drawn while the actors start (BENCHMARKS §4:
        # start-up at 1,000 nodes; drawn while Ray started, its imports slowed Ray on 2 cores); Flower's backend
        # finds Ray initialised and uses it. A failure below stops Ray before the error.
        early = None if attached else RayStart(flower_ray_settings(backend["init_args"]))
        heatmap = None
        try:
            prepare_output(cfg, resume, heatmap=False)
            if early is not None:
                early.wait()
            heatmap = HeatmapThread(cfg)
            # The server's own torch work (evaluation, aggregation, logreg's f* solve) on as many threads as a
            # client actor (see torch_threads; BENCHMARKS §4: round 1 at 1,000 a9a clients, 38.7 s before,
            # 11.2 s after).
            with _prompt_delivery(), torch_threads(run_threads()):
                run_simulation(
                    server_app=make_server_app(cfg, resume),
                    client_app=client_app,
                    num_supernodes=cfg.num_clients,
                    backend_config=backend,
                )
        finally:
            if early is not None:
                early.stop()  # Flower's backend shut Ray down at the end of a run; this ends the thread
            if heatmap is not None:
                heatmap.finish()
    metrics = out / "metrics.csv"
    rows = read_metrics(metrics) if metrics.exists() else []
    if len(rows) != cfg.rounds:
        raise RuntimeError(f"the simulation ended after {len(rows)} of {cfg.rounds} rounds; see the log above")
    return rows
