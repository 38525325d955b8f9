"""Download the study's data files from their public sources and check each one's SHA256.

``flwr-scaling data NAME --out DIR`` (``download``) writes the files the
study reads (``experiments/run_study.sh``) in the layout it expects::

    DIR/a9a/a9a, DIR/a9a/a9a.t                     LIBSVM a9a (UCI Adult, binarised)
    DIR/mushrooms/mushrooms                        LIBSVM mushrooms (UCI)
    DIR/mnist-t10k/t10k-{images-idx3,labels-idx1}-ubyte.gz   the MNIST test set (IDX)

The checksums below are part of the repository: a file whose SHA256 differs
(a changed mirror, a truncated transfer) is deleted and the command stops with
one line; a file already present with the right checksum is not fetched
again. Each file is written aside (``.part``) and renamed once its checksum
matches, so an interrupted download never leaves a file that looks complete.
``mirror`` replaces every source by ``MIRROR/<name>/<file>`` (a local copy:
``file:///path/to/data``; the tests use that, this machine has no internet).
Licences: UCI Adult and Mushroom are CC BY 4.0, MNIST is CC BY-SA 3.0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr_scaling.errors import DataError

LIBSVM = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary"
# yann.lecun.com often refuses downloads; torchvision's mirror serves the same bytes (same checksums).
MNIST = ("https://ossci-datasets.s3.amazonaws.com/mnist", "http://yann.lecun.com/exdb/mnist")
CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: where it goes under ``--out``, its SHA256 and its public sources, in order."""

    path: str  # relative to --out, e.g. "a9a/a9a.t"
    sha256: str
    urls: tuple[str, ...]


DATASETS: dict[str, tuple[DataFile, ...]] = {
    "a9a": (
        DataFile("a9a/a9a", "f5d5ffd8d865ff41328e7ee043e4b020816914ff6843ff15b98905ddbedce906", (f"{LIBSVM}/a9a",)),
        DataFile("a9a/a9a.t", "1f448a153f0320399a7e40836eb207655b0bde0f21fc941cc472193daa9f5de9",
                 (f"{LIBSVM}/a9a.t",)),
    ),
    "mushrooms": (
        DataFile("mushrooms/mushrooms", "f39a4eb628dc61a7d43760815b061c9e497aa728ce1ad8bde57a09ef6043b538",
                 (f"{LIBSVM}/mushrooms",)),
    ),
    "mnist-t10k": tuple(
        DataFile(f"mnist-t10k/{name}", digest, tuple(f"{base}/{name}" for base in MNIST))
        for name, digest in (
            ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        )
    ),
}
ALL = "all"


def dataset_names() -> list[str]:
    """The names ``flwr-scaling data`` takes: each dataset, and ``all``."""
    return [*DATASETS, ALL]


def sha256_of(path: str | Path) -> str:
    """The SHA256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, out: str | Path, *, mirror: str | None = None,
             say: Callable[[str], None] = print) -> list[Path]:
    """Fetch dataset ``name`` (or ``all``) into ``out`` and verify every file; return the files' paths.

    Raises DataError (one line) for an unknown name, a source that cannot be
    read (after trying each of the file's sources) or a checksum mismatch; the
    partial file is deleted then. Files already present with the right
    checksum are kept as they are.
    """
    if name not in dataset_names():
        raise DataError(f"unknown dataset {name!r} for download; known: {', '.join(dataset_names())}")
    names = list(DATASETS) if name == ALL else [name]
    written = []
    for dataset in names:
        for item in DATASETS[dataset]:
            written.append(_fetch(item, Path(out), mirror, say))
    return written


def _fetch(item: DataFile, out: Path, mirror: str | None, say: Callable[[str], None]) -> Path:
    """One file: kept if present and correct, else downloaded to ``.part``, checked, renamed."""
    final = out / item.path
    if final.is_file() and sha256_of(final) == item.sha256:
        say(f"{final}: present, sha256 ok")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".part")
    urls = (f"{mirror.rstrip('/')}/{item.path}",) if mirror else item.urls
    problems = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(partial, "wb") as handle:
                shutil.copyfileobj(response, handle, CHUNK)
            break
        except (urllib.error.URLError, OSError, ValueError) as problem:  # ValueError: a malformed URL
            partial.unlink(missing_ok=True)
            problems.append(f"{url}: {getattr(problem, 'reason', None) or problem}")
    else:
        raise DataError(f"cannot download {item.path}: " + "; ".join(problems))
    found = sha256_of(partial)
    if found != item.sha256:
        partial.unlink()
        raise DataError(f"{item.path} from {url} has sha256 {found}, expected {item.sha256}; the partial file "
                        f"was deleted (a changed or corrupt source: try another --mirror)")
    os.replace(partial, final)
    say(f"{final}: downloaded from {url}, sha256 ok")
    return final


__all__ = ["DATASETS", "DataFile", "dataset_names", "download", "sha256_of"]
