"""Owning an output folder: one run at a time, no other run's results lost, every file written whole.

A run (or a compare, or a sweep) *claims* its folder before it writes anything:

- an advisory lock, ``fcntl.flock`` on ``OUT/.lock`` (non-blocking), held until
  the claim is released; a second claim on a busy folder fails at once with one
  line naming the holder's pid. The lock dies with its process, so a killed run
  never leaves a folder locked.
- a folder that holds another run's results (``config.json``, ``metrics.csv``,
  ``checkpoint.npz``) is refused, unless the claim resumes that run or was asked
  to overwrite it. Overwritten files are moved aside into ``OUT/.replaced`` and
  deleted only once the new run has results of its own; a new run that fails
  before its first round puts them back.
- on failure, only what this claim created is removed, and only when it is of no
  use: a failed run that finished a round keeps its checkpoint (``--resume``).
  A folder the claim created is removed again when it is left empty.

``write_atomic`` and ``atomic_file`` write every output through a temporary file
in the same folder and ``os.replace``, so a reader (or a run killed mid-write)
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from flwr_scaling.run.config import ConfigError

LOCK = ".lock"
REPLACED = ".replaced"  # an overwritten run's files, until the new run has results of its own
RUN_RESULTS = ("config.json", "metrics.csv", "checkpoint.npz")  # what makes a folder another run's
RUN_OUTPUTS = (*RUN_RESULTS, "partitions.png")  # everything a run writes into its folder
ROUND_RESULTS = ("metrics.csv", "checkpoint.npz")  # written only once a round has finished
TEMP_SUFFIX = ".tmp"

# Folders this process has claimed (resolved path -> claim): prepare_output asks
# whether a run's folder is covered, and a claim of the same folder is re-entrant.
_HELD: dict[Path, OutputFolder] = {}


class FolderInUse(ConfigError):
    """Another process holds the folder's lock."""


# ----------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_file(path: str | Path, *, fsync: bool = False) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` when the block ends without an error.

    The data goes to a temporary file beside ``path`` (same file system, so the
    rename is atomic); an error inside the block removes it and leaves ``path``
    as it was. ``fsync`` forces the data to disk before the rename (checkpoints).
    """
    target = Path(path)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are as readable as open() would make them
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` by ``data`` (text is UTF-8) at once: readers never see half a file."""
    with atomic_file(path, fsync=fsync) as stream:
        stream.write(data.encode("utf-8") if isinstance(data, str) else data)


# ----------------------------------------------------------------- claims
def _key(path: str | Path) -> Path:
    return Path(path).resolve()


def is_claimed(path: str | Path) -> bool:
    """This process holds a claim on ``path`` or on a folder above it (a sweep's runs)."""
    key = _key(path)
    return any(key == held or held in key.parents for held in _HELD)


def foreign_results(folder: str | Path, names: Iterable[str] = RUN_RESULTS) -> list[str]:
    """Which of ``names`` ``folder`` holds."""
    return [name for name in names if (Path(folder) / name).exists()]


def refusal(folder: str | Path, present: list[str], what: str = "run") -> ConfigError:
    """The one-line error for a folder that holds another run's ``present`` results."""
    resume = f", continue it with --resume {folder}" if "checkpoint.npz" in present else ""
    return ConfigError(
        f"output folder {folder} holds the results of another {what} ({', '.join(present)}); "
        f"choose another --out{resume}, or pass --overwrite to replace them"
    )


def check_run_folder(folder: str | Path, resume: bool) -> None:
    """Raise ConfigError if a run may not write into ``folder``: it holds another run's results
    and nothing allowed it (a claim of this process, which has checked, or ``resume``)."""
    if resume or is_claimed(folder):
        return
    present = foreign_results(folder)
    if present:
        raise refusal(folder, present)


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


class OutputFolder:
    """The claim of one output folder for the length of a run; use as a context manager.

    Parameters
    ----------
    path : str or Path
        The folder; created (with its missing parents) if needed.
    overwrite : bool
        Replace another run's results instead of refusing the folder.
    resume : bool
        The results in the folder are this run's own (``--resume``): keep them.
    results : tuple of str
        File names that make the folder another run's (refused unless ``overwrite``).
    outputs : tuple of str
        Every file name the run writes: moved aside with ``overwrite``, removed on
        a failure before the run had results.
    what : str
        What claims the folder, for messages ("run", "sweep", "compare").
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False,
                 results: tuple[str, ...] = RUN_RESULTS, outputs: tuple[str, ...] = RUN_OUTPUTS,
                 what: str = "run") -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        self.results = results
        self.outputs = outputs
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this claim made, deepest first
        self._before: set[str] = set()
        self._nested = False

    # -------------------------------------------------------------- claiming
    def acquire(self) -> OutputFolder:
        """Create the folder, take its lock, and check (or move aside) the results in it."""
        key = _key(self.path)
        if key in _HELD:  # the same process claims again (the cli, then the runner): nothing more to check
            self._nested = True
            return self
        self._make_folder()
        try:
            self._lock()
        except BaseException:
            self._remove_created_folders()
            raise
        try:
            self._recover_stale_backup()
            present = [] if self.resume else foreign_results(self.path, self.results)
            if present and not self.overwrite:
                raise refusal(self.path, present, self.what)
            if present:
                self._move_aside()
        except BaseException:
            self._unlock()
            self._remove_created_folders()
            raise
        self._before = set(os.listdir(self.path))
        _HELD[key] = self
        return self

    def _make_folder(self) -> None:
        missing, folder = [], self.path
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"output folder {self.path} cannot be created: {error.strerror}") from None
        if not self.path.is_dir():
            raise ConfigError(f"output folder {self.path} is an existing file; choose another --out")
        self._created = missing  # deepest first: the order to remove them in

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                raise ConfigError(f"output folder {self.path} cannot be locked ({lock}: {error.strerror}); "
                                  f"choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise FolderInUse(f"{self.path} is in use by another {self.what} (pid {holder}); wait for it to "
                                  f"finish or choose another --out") from None
            # The holder removes the lock file on release: if it did between our
            # open and our flock, we hold a lock on a deleted file; take the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _recover_stale_backup(self) -> None:
        """A run killed during ``--overwrite`` left ``.replaced``: put it back if that run had no results."""
        backup = self.path / REPLACED
        if not backup.is_dir():
            return
        if foreign_results(self.path, ROUND_RESULTS):
            shutil.rmtree(backup)  # the overwriting run had finished rounds: the replacement was done
            return
        for name in os.listdir(backup):
            os.replace(backup / name, self.path / name)
        backup.rmdir()

    def _move_aside(self) -> None:
        backup = self.path / REPLACED
        backup.mkdir()
        for name in foreign_results(self.path, self.outputs):
            os.replace(self.path / name, backup / name)

    # -------------------------------------------------------------- releasing
    def release(self, failed: bool) -> None:
        """Give the folder back; after a failure remove what this claim created and nothing else."""
        if self._nested:
            return
        _HELD.pop(_key(self.path), None)
        try:
            backup = self.path / REPLACED
            new_results = [n for n in foreign_results(self.path, ROUND_RESULTS) if n not in self._before]
            useful = not failed or self.resume or bool(new_results)
            if failed:
                self._remove_own_files(outputs=not useful)
            if backup.is_dir():
                if useful:
                    shutil.rmtree(backup)
                else:
                    for name in os.listdir(backup):
                        os.replace(backup / name, self.path / name)
                    backup.rmdir()
        finally:
            self._unlock()
            if failed:
                self._remove_created_folders()

    def _remove_own_files(self, outputs: bool) -> None:
        for name in os.listdir(self.path):
            if name in self._before:
                continue
            temporary = name.startswith(".") and name.endswith(TEMP_SUFFIX)
            if temporary or (outputs and name in self.outputs):
                (self.path / name).unlink(missing_ok=True)

    def _unlock(self) -> None:
        if self._fd is None:
            return
        # Removed while still held, so that no one locks a file about to vanish
        # (a waiter that opened it re-checks the inode after its flock).
        (self.path / LOCK).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _remove_created_folders(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty: never anything else's
            except OSError:
                break
        self._created = []

    def __enter__(self) -> OutputFolder:
        return self.acquire()

    def __exit__(self, kind, value, traceback) -> None:
        self.release(failed=kind is not None)


def claim_output(path: str | Path, *, overwrite: bool = False, resume: bool = False, what: str = "run",
                 results: tuple[str, ...] = RUN_RESULTS, outputs: tuple[str, ...] = RUN_OUTPUTS) -> OutputFolder:
    """``with claim_output(OUT, ...)``: the claim of ``OUT`` for one run (see ``OutputFolder``)."""
    return OutputFolder(path, overwrite=overwrite, resume=resume, results=results, outputs=outputs, what=what)
