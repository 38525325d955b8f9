"""flwr-scaling data: files fetched from a (local, file://) source, checked against the committed SHA256."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from flwr_scaling.data import download as downloads
from flwr_scaling.data.download import DataFile, download, sha256_of
from flwr_scaling.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch):
    """A one-file dataset 'tiny' whose public source is a local file:// URL."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "tiny.txt").write_bytes(b"+1 1:0.5\n-1 2:1\n")
    digest = hashlib.sha256(b"+1 1:0.5\n-1 2:1\n").hexdigest()
    monkeypatch.setitem(downloads.DATASETS, "tiny",
                        (DataFile("tiny/tiny.txt", digest, (f"file://{source}/tiny.txt",)),))
    return source, digest


def test_download_checks_the_sha256_and_keeps_a_correct_file(tmp_path, tiny_dataset):
    said = []
    files = download("tiny", tmp_path / "data", say=said.append)
    assert files == [tmp_path / "data" / "tiny" / "tiny.txt"]
    assert files[0].read_bytes() == b"+1 1:0.5\n-1 2:1\n"
    assert said == [f"{files[0]}: downloaded from file://{tiny_dataset[0]}/tiny.txt, sha256 ok"]
    download("tiny", tmp_path / "data", say=said.append)  # present and correct: not fetched again
    assert said[-1] == f"{files[0]}: present, sha256 ok"


def test_a_wrong_checksum_deletes_the_partial_file_and_fails_with_one_line(tmp_path, tiny_dataset):
    source, digest = tiny_dataset
    (source / "tiny.txt").write_bytes(b"+1 1:0.5\n")  # truncated at the source
    found = hashlib.sha256(b"+1 1:0.5\n").hexdigest()
    with pytest.raises(DataError) as error:
        download("tiny", tmp_path / "data")
    assert str(error.value) == (f"tiny/tiny.txt from file://{source}/tiny.txt has sha256 {found}, expected {digest}; "
                                f"the partial file was deleted (a changed or corrupt source: try another --mirror)")
    assert list((tmp_path / "data" / "tiny").iterdir()) == []


def test_an_unreadable_source_and_an_unknown_name_are_one_line(tmp_path, tiny_dataset):
    with pytest.raises(DataError, match=r"^cannot download tiny/tiny.txt: file://.*/nowhere/tiny/tiny.txt: "):
        download("tiny", tmp_path / "data", mirror=f"file://{tmp_path}/nowhere")
    with pytest.raises(DataError, match=r"^unknown dataset 'mnist' for download; known: a9a, mushrooms, mnist-t10k, "):
        download("mnist", tmp_path / "data")


def test_committed_checksums_are_those_of_the_shared_data_folder():
    sums = (SHARED / "SHA256SUMS").read_text().split("\n") if (SHARED / "SHA256SUMS").is_file() else []
    if not sums:
        pytest.skip("no ../shared/data here")
    expected = {line.split()[1]: line.split()[0] for line in sums if line.strip()}
    ours = {item.path: item.sha256 for items in downloads.DATASETS.values() for item in items}
    assert ours == expected


def test_cli_downloads_every_dataset_from_a_mirror(tmp_path):
    if not (SHARED / "SHA256SUMS").is_file():
        pytest.skip("no ../shared/data here")
    proc = subprocess.run([sys.executable, "-m", "flwr_scaling", "data", "all", "--out", str(tmp_path / "d"),
                           "--mirror", f"file://{SHARED}"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"5 file(s) in {tmp_path / 'd'}/, every sha256 checked"
    assert sha256_of(tmp_path / "d" / "a9a" / "a9a.t") == sha256_of(SHARED / "a9a" / "a9a.t")
    bad = subprocess.run([sys.executable, "-m", "flwr_scaling", "data", "a9a", "--out", str(tmp_path / "e"),
                          "--mirror", f"file://{tmp_path}/d/mnist-t10k"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("flwr-scaling: error: cannot download a9a/a9a: ")
