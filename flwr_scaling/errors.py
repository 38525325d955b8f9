"""The two errors a user sees: a bad option and unusable data.

Both live at the bottom of the package so that every layer can raise them
(the data layer must not import the run configuration to say a file is
corrupt). Each message is one line that says what is wrong and what to do;
the command line prints it and exits with status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option: the message is one line that says what is wrong and what to do."""


class DataError(ValueError):
    """A dataset that cannot be used; the message is one line."""


def first_line(error: BaseException) -> str:
    """An error as one line for a message: its first non-blank line, or its type when it has no text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


__all__ = ["ConfigError", "DataError", "first_line"]
