"""A user's own data as it comes: missing labels, BOM and CRLF, oversized fields and
indices, corrupt gzip streams, images too small for the model (issue 13 item 4),
text labels and ``--input-shape`` (issue 11 item 9). Every error is one exact line."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flwr_scaling.data.federated import load_federated_data
from flwr_scaling.data.sources import load_source
from flwr_scaling.data.specs import DataSpec
from flwr_scaling.errors import ConfigError, DataError
from flwr_scaling.run.config import RunConfig, check_data_fits


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def write_csv(path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


# ------------------------------------------------------------------ missing labels
@pytest.mark.parametrize("field, shown", [("", "an empty field"), ("NaN", "'NaN'"), ("null", "'null'")])
def test_csv_row_without_label_is_named(tmp_path, field, shown):
    path = write_csv(tmp_path / "d.csv", f"a,label\n1,0\n2,1\n3,{field}\n")
    with pytest.raises(DataError) as error:
        load_source(f"csv:{path}")
    assert one_line(error) == (f"{path}:4: label column 'label' holds no class ({shown}); "
                               "every row needs a label: fill it in or remove the row")


def test_parquet_null_and_nan_labels_are_named(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "label": [0.0, None, 1.0]}), path)
    with pytest.raises(DataError) as error:
        load_source(f"parquet:{path}")
    assert one_line(error) == (f"{path}: data row 2: label column 'label' holds no class ('nan'); "
                               "every row needs a label: fill it in or remove the row")
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "label": ["cat", None, "dog"]}), path)
    with pytest.raises(DataError) as error:
        load_source(f"parquet:{path}")
    assert one_line(error) == (f"{path}: data row 2: label column 'label' holds no class (null); "
                               "every row needs a label: fill it in or remove the row")


def test_libsvm_nan_label_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.svm", "1 1:0.5\nnan 1:0.2\n")
    with pytest.raises(DataError) as error:
        load_source(f"libsvm:{path}")
    assert one_line(error) == f"{path}:2: label 'nan' is not a class; every row needs a finite label"


# ------------------------------------------------------------------ BOM, CRLF, field limit
def test_bom_and_crlf_give_the_same_data(tmp_path):
    text = "a,b,label\n0.5,1,0\n1.5,2,1\n2.5,3,0\n3.5,4,1\n"
    plain = load_source(f"csv:{write_csv(tmp_path / 'plain.csv', text)}")
    bom_crlf = load_source(f"csv:{write_csv(tmp_path / 'bom.csv', text.replace(chr(10), chr(13) + chr(10)), 'utf-8-sig')}")
    label_first = "label,a\n0,1\n1,2\n"  # the BOM would glue itself to the first column's name
    first = load_source(f"csv:{write_csv(tmp_path / 'first.csv', label_first, 'utf-8-sig')}")
    np.testing.assert_array_equal(plain.features, bom_crlf.features)
    np.testing.assert_array_equal(plain.labels, bom_crlf.labels)
    np.testing.assert_array_equal(first.labels, [0, 1])
    np.testing.assert_array_equal(first.features, [[1.0], [2.0]])


def test_csv_field_beyond_the_limit_is_one_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", "a,label\n" + "1" * (csv.field_size_limit() + 1) + ",0\n")
    with pytest.raises(DataError) as error:
        load_source(f"csv:{path}")
    assert one_line(error) == (f"{path}:2: not a CSV table of numbers "
                               f"(field larger than field limit ({csv.field_size_limit()}))")


# ------------------------------------------------------------------ sizes before allocation
def test_libsvm_index_beyond_memory_is_refused_before_allocation(tmp_path, monkeypatch):
    from flwr_scaling.data import libsvm

    monkeypatch.setattr(libsvm, "memory_bytes", lambda: 16 * 2**30)  # a 16 GiB machine, whatever this one has
    path = write_csv(tmp_path / "d.svm", "1 1:0.5\n-1 2:0.1 1000000000000:1\n")
    with pytest.raises(DataError) as error:
        load_source(f"libsvm:{path}")
    # 2 rows x 10**12 float32 = 8e12 bytes = 7450.58 GiB.
    assert one_line(error) == (f"{path}:2: feature index 1000000000000 makes the dense data 2 x 1000000000000 "
                               "float32 (7.45e+03 GiB), more than half this machine's memory (16 GiB); "
                               "check the index, or reduce the features")


# ------------------------------------------------------------------ compressed inputs
@pytest.mark.parametrize("kind", ["csv", "libsvm"])
def test_corrupt_gzip_stream_names_the_file(tmp_path, kind):
    good = gzip.compress(b"a,label\n1,0\n2,1\n" * 200 if kind == "csv" else b"1 1:0.5\n-1 1:0.2\n" * 200)
    path = tmp_path / f"d.{kind}.gz"
    path.write_bytes(good[: len(good) // 2])  # truncated mid-stream
    with pytest.raises(DataError) as error:
        load_source(f"{kind}:{path}")
    assert one_line(error) == (f"{path}: not a readable gzip stream (Compressed file ended before the "
                               "end-of-stream marker was reached); decompress it to check it, or give the file uncompressed")


def test_gzip_csv_reads_like_the_plain_file(tmp_path):
    text = b"a,label\n1,0\n2,1\n"
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(text))
    source = load_source(f"csv:{tmp_path / 'd.csv.gz'}")
    np.testing.assert_array_equal(source.features, [[1.0], [2.0]])


def test_idx_bad_gzip_names_the_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    with pytest.raises(DataError) as error:
        load_source(f"idx:{tmp_path}")
    assert one_line(error).startswith(f"{tmp_path / 'train-images-idx3-ubyte.gz'}: not a readable gzip stream (")


# ------------------------------------------------------------------ images too small for the model
def test_images_too_small_for_the_cnn_fail_at_the_checks(tmp_path):
    from flwr_scaling.data import hub

    path = tmp_path / "tiny.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"image": [rng.integers(0, 255, (2, 2)).tolist() for _ in range(40)],
                             "label": [i % 2 for i in range(40)]}), path)
    spec = DataSpec(dataset="hf:local/tiny")
    original = hub.load_hub
    hub.load_hub = lambda name, label_column="label", **kw: original("parquet", label_column, data_files={"train": str(path)})
    try:
        data = load_federated_data(spec)
        cfg = RunConfig(dataset="hf:local/tiny", model="cnn", num_clients=2)
        with pytest.raises(ConfigError) as error:
            check_data_fits(cfg, data)
    finally:
        hub.load_hub = original
        load_federated_data.cache_clear()
    assert one_line(error) == ("dataset 'hf:local/tiny': model 'cnn' needs images of at least 4x4 (two 2x2 max-pools), "
                               "but the data's images are 2x2 (shape 1x2x2); use --model mlp or logreg")


# ------------------------------------------------------------------ text labels (issue 11 item 9)
def letters_csv(path, rows: int = 60, features: int = 64) -> str:
    """A CSV of ``features`` columns and text labels 'Z', 'A', 'cat' (in that order of appearance)."""
    rng = np.random.default_rng(0)
    names = ["Z", "A", "cat"]
    lines = [",".join([f"f{i}" for i in range(features)] + ["label"])]
    for row in range(rows):
        lines.append(",".join([f"{v:.3f}" for v in rng.random(features)] + [names[row % 3]]))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_text_labels_become_sorted_class_ids(tmp_path):
    source = load_source(f"csv:{letters_csv(tmp_path / 'd.csv', rows=6, features=2)}")
    assert source.label_names == ("A", "Z", "cat")  # sorted: uppercase before lowercase
    np.testing.assert_array_equal(source.labels, [1, 0, 2, 1, 0, 2])


def test_label_names_are_resolved_into_the_config_and_used_by_node_files(tmp_path):
    from flwr_scaling.data.node_files import load_node_file

    path = letters_csv(tmp_path / "d.csv")
    cfg = RunConfig(dataset=f"csv:{path}", num_clients=2).resolved()
    assert cfg.label_names == '["A", "Z", "cat"]' and cfg.to_flower()["label-names"] == '["A", "Z", "cat"]'
    assert RunConfig().resolved().label_names == "[]"  # numeric labels: nothing to map, nothing loaded
    node = tmp_path / "node.csv"
    node.write_text("a,b,label\n1,2,cat\n3,4,A\n")  # a node holding two of the classes keeps the run's ids
    split = load_node_file(f"csv:{node}", "label", (2,), 3, False, ("A", "Z", "cat"))
    np.testing.assert_array_equal(split.labels, [2, 0])
    node.write_text("a,b,label\n1,2,dog\n")
    load_node_file.cache_clear()
    with pytest.raises(DataError) as error:
        load_node_file(f"csv:{node}", "label", (2,), 3, False, ("A", "Z", "cat"))
    assert one_line(error) == (f"csv:{node}: label 'dog' is not one of the run's classes (A, Z, cat); "
                               "write the labels as the run's class names")


def test_label_names_must_be_a_list_of_names():
    with pytest.raises(ConfigError) as error:
        RunConfig(label_names="cat,dog").validate()
    assert one_line(error) == ("label-names must be a JSON list of distinct class names (e.g. [\"cat\", \"dog\"]), "
                               "got 'cat,dog'")


# ------------------------------------------------------------------ --input-shape
def test_input_shape_reshapes_flat_features_for_the_cnn(tmp_path):
    path = letters_csv(tmp_path / "d.csv")
    cfg = RunConfig(dataset=f"csv:{path}", input_shape="1x8x8", num_clients=2).resolved()
    assert cfg.model == "cnn"
    data = load_federated_data(cfg.data_spec())
    assert data.input_shape == (1, 8, 8) and data.train.features.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize("shape, message", [
    ("1x8", "input-shape 1x8 holds 8 values but dataset 'csv:{path}' has 64 features per example; "
            "give a shape whose product is 64"),
    ("8x8x1x1", "input-shape must be up to 3 positive integers joined by 'x' (e.g. 1x8x8), got '8x8x1x1'"),
    ("1x-8x8", "input-shape must be up to 3 positive integers joined by 'x' (e.g. 1x8x8), got '1x-8x8'"),
])
def test_bad_input_shape_is_one_line(tmp_path, shape, message):
    path = letters_csv(tmp_path / "d.csv")
    with pytest.raises((ConfigError, DataError)) as error:
        RunConfig(dataset=f"csv:{path}", input_shape=shape, num_clients=2).resolved()
    assert one_line(error) == message.format(path=path)


def test_input_shape_too_small_for_the_cnn_fails_at_validate(tmp_path):
    path = letters_csv(tmp_path / "d.csv")
    with pytest.raises(ConfigError) as error:
        RunConfig(dataset=f"csv:{path}", input_shape="16x2x2", model="cnn").validate()
    assert one_line(error) == ("input-shape 16x2x2: model 'cnn' needs images of at least 4x4 (two 2x2 max-pools), "
                               "but the data's images are 2x2 (shape 16x2x2); use --model mlp or logreg")


def test_cnn_trains_on_text_labelled_csv_with_an_input_shape(tmp_path):
    """An in-process run end to end: text labels and a reshaped CSV; config.json keeps the mapping."""
    import json

    from flwr_scaling.run.inprocess import run_inprocess

    path = letters_csv(tmp_path / "d.csv", rows=90)
    cfg = RunConfig(dataset=f"csv:{path}", input_shape="1x8x8", num_clients=2, rounds=2, partitioner="iid",
                    out=str(tmp_path / "run"))
    rows = run_inprocess(cfg)
    assert [row["round"] for row in rows] == [1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["label-names"] == '["A", "Z", "cat"]' and saved["model"] == "cnn"
