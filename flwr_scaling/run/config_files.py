"""The files around a run's options: TOML option files, and the output folder checked before anything runs.

One-line ConfigErrors for every way they can fail; no side effects.
"""

from __future__ import annotations

from typing import Any

from flwr_scaling.errors import ConfigError


def check_output_folder(path: str) -> None:
    """Raise ConfigError unless ``path`` is, or can be created as, a writable folder.

    For the command line, before anything runs: it touches nothing. Not part of
    ``validate()``, which also runs on the clients, where the server's folder
    means nothing.
    """
    import os
    from pathlib import Path

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {path!r} is an existing file; choose another --out")
    parent = folder
    while not parent.exists():  # the nearest existing ancestor is where mkdir will start
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output folder {path!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {path!r} cannot be created or written: {str(parent)!r} is not writable")


def read_toml(path: str, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; every way it can fail is one line naming ``what`` and the path."""
    import tomllib
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {path!r} does not exist or is not a file")
    try:
        with open(file, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{what} {path!r} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path!r} is not UTF-8 text (byte {error.start}); TOML files must be UTF-8") from None
    except OSError as error:
        raise ConfigError(f"{what} {path!r} cannot be read: {error.strerror}") from None


def load_toml(path: str) -> dict[str, Any]:
    """Options from a TOML file (kebab-case keys, as on the command line), with one-line errors."""
    values = read_toml(path)
    nested = [key for key, value in values.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(f"config file {path!r}: options must be top-level keys, found table [{nested[0]}]")
    return values


__all__ = ["check_output_folder", "load_toml", "read_toml"]
