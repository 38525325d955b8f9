"""Devices and Ray resources: ``--device``, ``--client-gpus``, ``--client-cpus``, and the ResNet chosen for
3x32x32 images from an ``hf:`` dataset (a generated local parquet, offline).

These tests run on the CPU: no GPU is lent to the machine they were written on.
What they can check there is the spelling of device names, the one-line
refusals of a device or GPU share this machine lacks (before any data is
loaded), Ray's backend settings as built, and that ``auto`` means the CPU.
``benchmarks/device_check.py`` compares CPU and GPU where there is one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flwr_scaling.cli import main
from flwr_scaling.core.devices import (
    DEVICE_CHOICES, device_problem, resolve_device, run_threads, torch_threads, unavailable,
)
from flwr_scaling.data import federated as data_module
from flwr_scaling.data import hub
from flwr_scaling.errors import ConfigError
from flwr_scaling.run import simulation
from flwr_scaling.run.config import RunConfig
from flwr_scaling.run.simulation import backend_config, check_ray_resources

NO_CUDA = not torch.cuda.is_available()
NO_MPS = not torch.backends.mps.is_available()


def test_device_names_are_checked_by_spelling_only():
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert device_problem(name) is None
    for name in ("gpu", "cuda:", "cuda:x", "CPU", "cuda:-1", "mps:0", ""):
        assert device_problem(name) == (f"device: unknown value {name!r}; one of {', '.join(DEVICE_CHOICES)} "
                                        f"(N a GPU index, e.g. cuda:0)")
    with pytest.raises(ConfigError, match=r"^device: unknown value 'gpu'; one of auto, cpu, cuda, cuda:N, mps "):
        RunConfig(device="gpu").validate()
    RunConfig(device="cuda:3").validate()  # a name this machine may lack is still a valid option (clients decide)


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert unavailable("auto") is None and unavailable("cpu") is None


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line():
    expected = f"device cuda: this machine has no CUDA GPU (torch {torch.__version__} sees none); use --device cpu or auto"
    assert unavailable("cuda") == expected
    with pytest.raises(ConfigError) as error:
        resolve_device("cuda")
    assert str(error.value) == expected


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_mps_without_mps_is_one_line():
    assert unavailable("mps") == ("device mps: Apple's Metal (MPS) backend is not available on this machine; "
                                  "use --device cpu or auto")


@pytest.mark.parametrize(
    "device, line",
    [
        pytest.param("cuda", "device cuda: this machine has no CUDA GPU", marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
        pytest.param("cuda:1", "device cuda:1: this machine has no CUDA GPU", marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
        pytest.param("mps", "device mps: Apple's Metal (MPS) backend is not available", marks=pytest.mark.skipif(not NO_MPS, reason="has MPS")),
    ],
)
@pytest.mark.parametrize("backend", ["inprocess", "simulation"])
def test_cli_refuses_a_missing_device_before_any_work(device, line, backend, tmp_path, monkeypatch, capsys):
    def no_data(*_args, **_kwargs):
        raise AssertionError("data was loaded before the device was checked")

    monkeypatch.setattr(simulation, "load_federated_data", no_data)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["run", "--backend", backend, "--rounds", "1", "--device", device, "--out", str(out)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"flwr-scaling: error: {line}") and error.count("\n") == 1
    assert not (out / "metrics.csv").exists() and not (out / "config.json").exists()


def test_client_resource_options_are_checked():
    with pytest.raises(ConfigError, match=r"^client-cpus must be a finite number > 0, got 0.0$"):
        RunConfig.from_mapping({"client-cpus": "0"}).validate()
    with pytest.raises(ConfigError, match=r"^client-gpus must be in \[0.0, inf\), got -0.5$"):
        RunConfig.from_mapping({"client-gpus": "-0.5"}).validate()
    with pytest.raises(ConfigError, match=r"^client-gpus must be a number, got 'half'$"):
        RunConfig.from_mapping({"client-gpus": "half"})


@pytest.mark.parametrize("cpus, gpus", [(1.0, 0.0), (2.0, 0.25), (0.5, 1.0)])
def test_backend_config_carries_the_client_resources(cpus, gpus):
    config = backend_config(RunConfig(client_cpus=cpus, client_gpus=gpus))
    assert config["client_resources"] == {"num_cpus": cpus, "num_gpus": gpus}
    quiet = backend_config(RunConfig())
    assert quiet["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}  # the defaults: one core per actor, no GPU
    assert quiet["init_args"]["log_to_driver"] is False


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_client_gpus_need_cuda_here_but_not_on_a_cluster():
    with pytest.raises(ConfigError) as error:
        check_ray_resources(RunConfig(client_gpus=0.5), cluster=False)
    assert str(error.value) == ("client-gpus 0.5: this machine has no CUDA GPU for Ray to share among the clients; "
                                "leave client-gpus at 0 (or attach to a GPU cluster with --ray-address)")
    check_ray_resources(RunConfig(client_gpus=0.5), cluster=True)  # the cluster's GPUs are not this machine's to see
    check_ray_resources(RunConfig(), cluster=False)


def test_cuda_clients_in_ray_need_a_gpu_share():
    # Ray hides every GPU from an actor that asks for none: the clients could not use CUDA.
    with pytest.raises(ConfigError) as error:
        check_ray_resources(RunConfig(device="cuda:0"), cluster=True)
    assert str(error.value) == ("device cuda:0 with the simulation backend needs --client-gpus > 0 (e.g. 0.25: four "
                                "clients share a GPU): Ray lets a client actor that asks for no GPU see none; "
                                "or use --backend inprocess")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cli_refuses_client_gpus_without_cuda_before_ray_starts(tmp_path, capsys, monkeypatch):
    import flwr.simulation

    def no_simulation(*_args, **_kwargs):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", no_simulation)
    with pytest.raises(SystemExit) as stop:
        main(["run", "--rounds", "1", "--client-gpus", "0.5", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("flwr-scaling: error: client-gpus 0.5: this machine has no CUDA GPU for Ray to "
                                       "share among the clients; leave client-gpus at 0 (or attach to a GPU cluster "
                                       "with --ray-address)\n")


# ---------------------------------------------------------------- the ResNet on 3x32x32 images from hf:

@pytest.fixture
def cifar_like(hub_offline, monkeypatch, tmp_path):
    """``hf:ANYTHING`` loads 200 random 32x32 RGB images of 4 classes from a local parquet file, offline."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB") for _ in range(200)]
    features = Features({"img": Image(), "label": ClassLabel(names=["cat", "dog", "frog", "ship"])})
    path = str(tmp_path / "train.parquet")
    Dataset.from_dict({"img": images, "label": [i % 4 for i in range(200)]}, features=features).to_parquet(path)
    real = hub.load_hub

    def local(name, label_column="label", **kwargs):
        return real("parquet", label_column, data_files={"train": path}, cache_dir=str(tmp_path / "hf-cache"), **kwargs)

    monkeypatch.setattr(hub, "load_hub", local)
    yield
    data_module.load_federated_data.cache_clear()  # hf:local/cifar-mini means these files only
    data_module.partitioner_for.cache_clear()


def test_resnet_is_the_default_for_3x32x32_hub_images_and_trains(cifar_like, tmp_path):
    from flwr_scaling.run.inprocess import run_inprocess

    config = RunConfig(dataset="hf:local/cifar-mini", num_clients=2, rounds=2, partitioner="iid",
                       warmup_batches=1, out=str(tmp_path / "run"))
    data = data_module.load_federated_data(config.data_spec())
    assert tuple(data.input_shape) == (3, 32, 32) and data.num_classes == 4
    assert config.resolved().model == "resnet"
    rows = run_inprocess(config)
    assert [row["round"] for row in rows] == [1, 2]
    assert all(np.isfinite(row["test_loss"]) and 0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert saved["model"] == "resnet" and saved["device"] == "auto"


def test_torch_threads_sets_the_count_for_the_block_and_restores_it(monkeypatch):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="^inside$"), torch_threads(other):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored on an error too


def test_a_runs_torch_threads_come_from_omp_num_threads_else_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert run_threads() == 3

