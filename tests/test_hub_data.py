"""``hf:NAME`` datasets: the hub code path run offline on small local parquet files.

``load_hub(name, ...)`` builds ``FederatedDataset(dataset=name, ...)``; here the
name is ``"parquet"`` with ``data_files=`` (everything else is the same code).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flwr_scaling.data import federated as data_module
from flwr_scaling.data import hub
from flwr_scaling.data.federated import DataSpec, PartitionSpec, load_federated_data, load_partition
from flwr_scaling.data.sources import DataError, check_spec, load_hub, load_source

HEIGHT, WIDTH = 6, 5


@pytest.fixture(autouse=True)
def offline(hub_offline):
    """No network and no cache outside tmp_path (conftest's ``hub_offline``), for every test here."""
    yield
    load_federated_data.cache_clear()  # the hf:local-* names below mean these files only
    data_module.partitioner_for.cache_clear()


def _images(rng, n):
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def image_files(tmp_path):
    """An MNIST-like dataset: an Image column and a ClassLabel column, train and test splits."""
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(4)])})
    files = {}
    for split, n in (("train", 200), ("test", 40)):
        table = Dataset.from_dict({"image": _images(rng, n), "label": [i % 4 for i in range(n)]}, features=features)
        files[split] = str(tmp_path / f"{split}.parquet")
        table.to_parquet(files[split])
    return files


def hub_as(monkeypatch, data_files, tmp_path):
    """Make ``hf:ANYTHING`` load ``data_files`` through the very same ``load_hub``."""
    real = hub.load_hub

    def local(name, label_column="label", **kwargs):
        return real("parquet", label_column, data_files=data_files, cache_dir=str(tmp_path / "hf-cache"), **kwargs)

    monkeypatch.setattr(hub, "load_hub", local)


def test_image_column_found_and_scaled(image_files, tmp_path):
    source = load_hub("parquet", data_files=image_files, cache_dir=str(tmp_path / "c"))
    assert source.features.shape == (200, 1, HEIGHT, WIDTH) and source.features.dtype == np.float32
    assert 0.0 <= source.features.min() and source.features.max() <= 1.0 and source.features.max() > 0.9
    assert source.input_shape == (1, HEIGHT, WIDTH) and source.default_model == "cnn" and not source.standardize
    assert source.labels.tolist()[:5] == [0, 1, 2, 3, 0]
    assert source.test[0].shape == (40, 1, HEIGHT, WIDTH) and len(source.test[1]) == 40
    # Pixels as stored: the first image of the file, / 255.
    from datasets import Dataset

    first = np.asarray(Dataset.from_parquet(image_files["train"])[0]["image"])
    np.testing.assert_allclose(source.features[0, 0], first / 255.0, rtol=1e-6)


def test_hf_dataset_end_to_end_uses_its_test_split(monkeypatch, image_files, tmp_path):
    hub_as(monkeypatch, image_files, tmp_path)
    spec = DataSpec(dataset="hf:local/mnist-mini", seed=3)
    data = load_federated_data(spec)
    assert len(data.train) == 200 and len(data.test) == 40  # the file's own test split, no holdout
    assert data.input_shape == (1, HEIGHT, WIDTH) and data.num_classes == 4 and data.default_model == "cnn"
    for partitioner in ("iid", "shard", "dirichlet"):
        pspec = PartitionSpec(spec, 5, 1.0, partitioner, 2)
        parts = [load_partition(pspec, i) for i in range(5)]
        assert sum(len(p) for p in parts) == 200
        if partitioner == "shard":
            assert all(len(np.unique(p.labels)) == 2 for p in parts)


def test_without_test_split_holds_out_20_percent(monkeypatch, image_files, tmp_path):
    hub_as(monkeypatch, {"train": image_files["train"]}, tmp_path)
    data = load_federated_data(DataSpec(dataset="hf:local/train-only"))
    assert len(data.train) == 160 and len(data.test) == 40


def test_numeric_columns_when_there_is_no_image(monkeypatch, tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(1)
    path = tmp_path / "tab.parquet"
    Dataset.from_dict({
        "a": rng.normal(size=50).tolist(), "b": rng.integers(0, 9, 50).tolist(),
        "name": ["x"] * 50, "species": ["setosa", "virginica"] * 25,
    }).to_parquet(str(path))
    source = load_hub("parquet", "species", data_files={"train": str(path)}, cache_dir=str(tmp_path / "c"))
    assert source.features.shape == (50, 2) and source.input_shape == (2,)  # a, b; the string column is not a feature
    assert source.default_model == "logreg" and source.standardize and source.labels.tolist()[:2] == [0, 1]
    hub_as(monkeypatch, {"train": str(path)}, tmp_path)
    data = load_federated_data(DataSpec(dataset="hf:local/tab", label_column="species"))
    assert len(data.train) == 40 and abs(float(data.train.features.mean())) < 1e-5  # standardised


def test_2d_array_column_is_an_image(tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(2)
    path = tmp_path / "arr.parquet"
    Dataset.from_dict({"pixels": rng.integers(0, 256, (30, 4, 4)).tolist(), "label": [i % 2 for i in range(30)]}).to_parquet(str(path))
    source = load_hub("parquet", data_files={"train": str(path)}, cache_dir=str(tmp_path / "c"))
    assert source.features.shape == (30, 1, 4, 4) and source.features.max() <= 1.0 and source.default_model == "cnn"


def one_line_error(call) -> str:
    with pytest.raises(DataError) as error:
        call()
    text = str(error.value)
    assert "\n" not in text
    return text


def test_missing_label_column(image_files, tmp_path):
    text = one_line_error(lambda: load_hub("parquet", "digit", data_files=image_files, cache_dir=str(tmp_path / "c")))
    assert text == "hf dataset 'parquet': no label column 'digit' (columns: image, label); set label-column"


def test_unknown_hub_dataset_offline():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = one_line_error(lambda: load_source("hf:nobody/no-such-dataset"))
    assert text.startswith("hf dataset 'nobody/no-such-dataset' cannot be loaded: ")
    assert "HF_DATASETS_OFFLINE is set" in text


def test_no_train_split(image_files, tmp_path):
    text = one_line_error(lambda: load_hub("parquet", data_files={"test": image_files["test"]}, cache_dir=str(tmp_path / "c")))
    assert text.startswith("hf dataset 'parquet' has no 'train' split")


def test_check_spec_is_cheap_and_rejects_test_path():
    check_spec("hf:ylecun/mnist")  # nothing is fetched
    with pytest.raises(DataError, match="test-path is not used with hf: datasets"):
        check_spec("hf:ylecun/mnist", "t.parquet")
    with pytest.raises(DataError):
        check_spec("hf:")


def test_hf_image_data_gets_the_cnn_by_default(monkeypatch, image_files, tmp_path):
    from flwr_scaling.run.config import RunConfig

    hub_as(monkeypatch, image_files, tmp_path)
    cfg = RunConfig(dataset="hf:local/mnist-mini", num_clients=3).resolved()
    assert cfg.model == "cnn"  # the loaded data are images (the entry cannot tell before loading)
    assert load_federated_data(cfg.data_spec()).default_model == "cnn"
    RunConfig(dataset="hf:local/mnist-mini", model="cnn").validate()  # hf: may hold images: cnn is accepted


def test_hf_table_data_gets_logreg_by_default(monkeypatch, tmp_path):
    from datasets import Dataset

    from flwr_scaling.run.config import RunConfig

    path = tmp_path / "tab.parquet"
    Dataset.from_dict({"a": [float(i) for i in range(40)], "label": [i % 2 for i in range(40)]}).to_parquet(str(path))
    hub_as(monkeypatch, {"train": str(path)}, tmp_path)
    assert RunConfig(dataset="hf:local/tab", num_clients=3).resolved().model == "logreg"
