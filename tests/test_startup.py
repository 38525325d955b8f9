"""A simulation's start-up: Ray starts on a thread while the data is read, the heatmap is drawn while the
actors start, and node partition sizes are cut only when asked for (``benchmarks/scale.py`` times it)."""

from __future__ import annotations

import logging
import threading

import pytest

from flwr_scaling import server_app
from flwr_scaling.data.federated import partition_indices
from flwr_scaling.errors import DataError
from flwr_scaling.run import simulation
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.ray_start import RayStart

QUIET = {"num_cpus": 1, "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}


def start_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name == "flwr-scaling-ray-start"]


def test_ray_started_on_a_thread_serves_tasks_after_init_returned_and_stops_with_its_thread():
    import ray

    assert not ray.is_initialized()
    start = RayStart(QUIET)
    assert start.wait() > 0 and ray.is_initialized()
    # Ray's GCS and raylet die with the thread that started them (PR_SET_PDEATHSIG): had the thread
    # returned after ray.init, this task would never run.
    assert ray.get(ray.remote(lambda: 6 * 7).options(num_cpus=1).remote()) == 42
    assert start_threads() == ["flwr-scaling-ray-start"]
    start.stop()
    assert not ray.is_initialized() and start_threads() == []


def test_ray_init_error_is_raised_by_wait_on_the_callers_thread():
    import ray

    start = RayStart({"no_such_argument": 1})
    with pytest.raises(RuntimeError, match="Unknown keyword argument.s.: no_such_argument"):
        start.wait()
    start.stop()  # safe after a failed start
    assert not ray.is_initialized() and start_threads() == []


def test_a_corrupt_data_file_found_after_ray_started_stops_ray_before_the_one_line_error(tmp_path, monkeypatch):
    import ray

    started: list[RayStart] = []

    class Recorded(RayStart):
        def __init__(self, settings):
            super().__init__(settings)
            started.append(self)

    monkeypatch.setattr(simulation, "RayStart", Recorded)
    data = tmp_path / "bad.libsvm"
    data.write_text("+1 1:1\n-1 2:x\n" + "+1 1:1\n" * 40)  # the file exists (checked before Ray), line 2 is not
    out = tmp_path / "run"
    config = RunConfig(dataset=f"libsvm:{data}", model="logreg", num_clients=2, partitioner="iid", rounds=1,
                       out=str(out))
    with pytest.raises(DataError) as error:
        simulation.simulate(config)
    assert str(error.value) == f"{data}:2: expected a number after 2:, got 'x'"
    assert len(started) == 1  # Ray was starting while the file was read ...
    assert not ray.is_initialized() and start_threads() == []  # ... and is stopped before the error
    assert not (out / simulation.HEATMAP).exists()


def test_partition_sizes_are_cut_only_for_the_nodes_asked_for(monkeypatch):
    cfg = RunConfig(num_clients=10).resolved()
    cuts: list[int] = []

    def counted(spec, rank):
        cuts.append(rank)
        return partition_indices(spec, rank)

    monkeypatch.setattr(server_app, "partition_indices", counted)
    sizes = server_app.PartitionSizes(cfg, {100: 0, 101: 7, 102: 10, 103: -1})  # ranks 10 and -1: no partition
    assert cuts == [] and len(sizes) == 2 and list(sizes) == [100, 101]
    assert 102 not in sizes and 103 not in sizes
    assert sizes[101] == len(partition_indices(cfg.partition_spec(), 7)) and sizes[101] == sizes.get(101)
    assert cuts == [7]  # once, then kept
    with pytest.raises(KeyError):
        sizes[102]
