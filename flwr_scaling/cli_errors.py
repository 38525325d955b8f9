"""How the command line ends when something fails: one line on stderr, exit 2 or 1.

Every subcommand runs inside ``exit_on_failure``. A failure the user can fix by
changing what they gave (an option, a file, a folder) exits with status 2; a
failure while working (a run that failed, a full disk, a permission that
changed) with status 1. Both print exactly one line,
``flwr-scaling: error: ...``, that names the file or option and says what to
do; ``--verbose`` prints the traceback before it. Paths given on the command
line are checked for length before anything uses them, so that an over-long
name is reported with its option rather than as an ``OSError`` from deep inside.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Iterator

from flwr_scaling.errors import ConfigError

PREFIX = "flwr-scaling: error: "
BAD_INPUT, RUNTIME_FAILURE, INTERRUPTED = 2, 1, 130
# OSErrors about the path itself: the user named something that cannot be used (exit 2).
BAD_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENOENT}
# Argument names (argparse dests) that are paths, and how to call them in a message.
PATH_ARGUMENTS = {"out": "--out", "config": "--config", "resume": "--resume", "workdir": "--workdir",
                  "file": "FILE", "dir": "DIR", "write": "--write", "test_path": "--test-path",
                  "name": "--name"}
DATA_PATH_ARGUMENTS = {"dataset": "--dataset"}  # KIND:PATH, or a name
NAME_MAX, PATH_MAX = 255, 4095  # Linux: bytes in one name; bytes in a path, without its terminating NUL
SHORT = 60  # characters of a long path shown in a message


def shown(path: str) -> str:
    """``path`` for a one-line message: whole when short, else its start and end and its length."""
    if len(path) <= 2 * SHORT:
        return repr(path)
    return f"'{path[:SHORT]}...{path[-20:]}' ({len(path)} characters)"


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file on this system (too long a path or name), or None."""
    size = len(os.fsencode(path))
    if size > PATH_MAX:
        return f"is {size} bytes long; a path may have at most {PATH_MAX}"
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > NAME_MAX:
            which = "" if part == path else f" ({shown(part)})"
            return f"has a name of {len(os.fsencode(part))} bytes{which}; a name may have at most {NAME_MAX}"
    return None


def check_path_arguments(args: argparse.Namespace) -> None:
    """ConfigError for the first path argument that no file system here accepts."""
    for dest, option in {**PATH_ARGUMENTS, **DATA_PATH_ARGUMENTS}.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str):
            continue
        path = value.split(":", 1)[1] if dest in DATA_PATH_ARGUMENTS and ":" in value else value
        problem = path_problem(path)
        if problem:
            raise ConfigError(f"{option} {shown(path)} {problem}; choose a shorter path")


def describe(error: BaseException) -> tuple[int, str]:
    """The exit status and the one line (without the prefix) for ``error``."""
    text = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OSError) and error.errno is not None:
        where = shown(str(error.filename)) if error.filename is not None else "a file"
        if error.filename2 is not None:
            where += f" -> {shown(str(error.filename2))}"
        if error.errno in BAD_PATH_ERRNOS:
            return BAD_INPUT, f"{where}: {error.strerror}; check the path and choose another file or folder"
        return RUNTIME_FAILURE, (f"{where}: {error.strerror}; check the folder's permissions and free space, "
                                 f"then run the command again")
    if isinstance(error, (ValueError, FileNotFoundError)):  # ConfigError, DataError and KeyFileError among them
        return BAD_INPUT, text
    if isinstance(error, RuntimeError):
        return RUNTIME_FAILURE, text
    return RUNTIME_FAILURE, (f"unexpected {type(error).__name__}: {text}; run the command again with --verbose "
                             f"for the traceback, and report it")


@contextlib.contextmanager
def exit_on_failure(verbose: bool) -> Iterator[None]:
    """Turn any failure of the block into one line on stderr and ``SystemExit`` (2, 1, or 130 when interrupted)."""
    try:
        yield
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("flwr-scaling: interrupted; finished rounds are in the checkpoint (run --resume DIR, or run the "
              "sweep again)", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except Exception as error:
        if verbose:
            traceback.print_exc()
        status, line = describe(error)
        print(PREFIX + line, file=sys.stderr)
        raise SystemExit(status) from None


__all__ = ["PREFIX", "BAD_INPUT", "RUNTIME_FAILURE", "shown", "path_problem", "check_path_arguments", "describe",
           "exit_on_failure"]
