"""Local data files: real public files from ../shared/data, and corrupt ones made here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from flwr_scaling.data.sources import DataError, check_spec, load_source, read_idx, read_libsvm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "a9a" / "a9a").exists(), reason="../shared/data is not here")


@needs_shared
def test_a9a_with_its_own_test_file():
    source = load_source(f"libsvm:{SHARED / 'a9a' / 'a9a'}", test_path=str(SHARED / "a9a" / "a9a.t"))
    assert source.features.shape == (32561, 123) and source.test[0].shape == (16281, 123)
    # -1 -> 0, +1 -> 1; counts from the data README
    assert np.bincount(source.labels).tolist() == [24720, 7841]
    assert np.bincount(source.test[1]).tolist() == [12435, 3846]
    assert set(np.unique(source.features)) <= {0.0, 1.0}
    assert source.input_shape == (123,) and source.default_model == "logreg" and not source.standardize


@needs_shared
def test_mushrooms_labels_1_2_become_0_1():
    source = load_source(f"libsvm:{SHARED / 'mushrooms' / 'mushrooms'}")
    assert source.features.shape == (8124, 112)
    assert np.bincount(source.labels).tolist() == [3916, 4208]


@needs_shared
def test_mnist_test_set_as_idx_directory():
    source = load_source(f"idx:{SHARED / 'mnist-t10k'}")
    assert source.features.shape == (10000, 1, 28, 28) and source.features.max() == 1.0
    assert source.labels.shape == (10000,) and set(np.unique(source.labels)) == set(range(10))
    assert source.default_model == "cnn" and source.test is None


def _idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes, gz: bool = False) -> Path:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in shape) + payload
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_idx_roundtrip_and_train_t10k_pairs(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", 0x803, (2, 3, 3), images.tobytes(), gz=True)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, (2,), bytes([0, 1]), gz=True)
    _idx(tmp_path / "t10k-images-idx3-ubyte", 0x803, (1, 3, 3), images[:1].tobytes())
    _idx(tmp_path / "t10k-labels-idx1-ubyte", 0x801, (1,), bytes([1]))
    source = load_source(f"idx:{tmp_path}")
    np.testing.assert_array_equal(source.features[:, 0], (images / 255.0).astype(np.float32))
    assert source.labels.tolist() == [0, 1] and source.test[1].tolist() == [1]


@pytest.mark.parametrize(
    "magic, shape, payload, message",
    [
        (0x801, (1, 2, 2), bytes(4), "offset 0: expected IDX magic 0x00000803 (images), found 0x00000801"),
        (0x803, (2, 2, 2), bytes(7), "offset 23: expected 24 bytes for shape [2, 2, 2], found 23"),
        (0x803, (1, 2, 2), bytes(9), "offset 20: expected 20 bytes for shape [1, 2, 2], found 25"),
    ],
    ids=["wrong-magic", "truncated", "too-long"],
)
def test_corrupt_idx_names_file_offset_and_expectation(tmp_path, magic, shape, payload, message):
    path = _idx(tmp_path / "x-images-idx3-ubyte", magic, shape, payload)
    with pytest.raises(DataError) as error:
        read_idx(path, 0x803, "images")
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text


def test_idx_header_cut_short(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I", 0x803) + b"\x00\x00")
    with pytest.raises(DataError, match=r"offset 4: expected 3 dimension sizes, the file ends at byte 6"):
        read_idx(path, 0x803, "images")


@pytest.mark.parametrize(
    "text, message",
    [
        ("+1 1:1 3:1\nabc 2:1\n", ":2: expected a numeric label first, got 'abc'"),
        ("+1 1:1 3:1\n-1 2:x\n", ":2: expected a number after 2:, got 'x'"),
        ("+1 1:1 3\n", ":1: expected index:value, got '3'"),
        ("+1 3:1 2:1\n", ":1: indices must be 1-based and increasing, got 2 after 3"),
        ("+1 0:1\n", ":1: indices must be 1-based and increasing, got 0 after 0"),
        ("+1 1:1 2:1\n-1 1:1 2:nan\n", ":2: value 'nan' at index 2 is not finite"),
        ("\n\n", ": no examples"),
        ("+1 :1\n", ":1: expected index:value, got ':1'"),
        ("+1 1:\n", ":1: expected index:value, got '1:'"),
        ("+1 1:2:3\n", ":1: expected a number after 1:, got '2:3'"),
        ("+1 \u0661:1\n", ":1: expected index:value, got '\u0661:1'"),
        ("+1 -1:1\n", ":1: expected index:value, got '-1:1'"),
    ],
    ids=["label", "value", "token", "order", "zero-index", "nan", "empty", "no-index", "no-value", "two-colons",
         "arabic-digit", "negative-index"],
)
def test_garbled_libsvm_names_file_line_and_expectation(tmp_path, text, message):
    path = tmp_path / "data.libsvm"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        read_libsvm(path)
    assert str(error.value) == f"{path}{message}" or str(error.value).startswith(f"{path}{message}")


def test_libsvm_parses_sparse_rows(tmp_path):
    path = tmp_path / "d"
    path.write_text("+1 1:0.5 3:2 # comment\n-1 2:1\n")
    labels, rows, width = read_libsvm(path)
    assert labels.tolist() == [1.0, -1.0] and rows == [{0: 0.5, 2: 2.0}, {1: 1.0}] and width == 3


def test_csv_and_parquet_with_label_column(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,target\n1,2,0\n3,4,1\n5,6,1\n")
    source = load_source(f"csv:{tmp_path / 'd.csv'}", label_column="target")
    assert source.features.tolist() == [[1, 2], [3, 4], [5, 6]] and source.labels.tolist() == [0, 1, 1]
    assert source.standardize
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [0.5, 1.5, 2.5], "label": [2, 7, 2]}), tmp_path / "d.parquet")
    parquet = load_source(f"parquet:{tmp_path / 'd.parquet'}")
    assert parquet.features.tolist() == [[0.5], [1.5], [2.5]] and parquet.labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,b\n1,2\n", ":1: no label column 'label' in the header (columns: a, b)"),
        ("", ":1: expected a header row with a 'label' column, the file is empty"),
        ("a,label\n1,0\n2\n", ":3: expected 2 fields, got 1"),
        ("a,label\n1,0\nx,1\n", ":3: expected numbers, got 'x'"),
        ("a,label\n", ": no data rows after the header"),
    ],
    ids=["no-label", "empty", "ragged", "text", "no-rows"],
)
def test_bad_csv(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_source(f"csv:{path}")
    assert str(error.value) == f"{path}{message}"


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable parquet file: "):
        load_source(f"parquet:{path}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist", "dataset 'mnist' is neither a bundled dataset"),
        ("libsvm:", "dataset 'libsvm:' is neither"),
        ("svm:x", "dataset 'svm:x' is neither"),
        ("libsvm:/no/such/file", "data file /no/such/file does not exist or is not a file"),
        ("idx:/no/such/dir", "idx dataset: /no/such/dir is not a directory"),
    ],
)
def test_bad_dataset_names(spec, message):
    with pytest.raises(DataError, match=message):
        check_spec(spec)


def test_idx_directory_without_pairs(tmp_path):
    with pytest.raises(DataError, match="expected a pair of"):
        check_spec(f"idx:{tmp_path}")
