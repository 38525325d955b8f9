"""A run's output sent to its log file: what it prints, and what Flower's and Ray's loggers write to the terminal.

Used by the serial sweep runner and by each Ray task of a parallel sweep.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO


@contextlib.contextmanager
def output_to(log: TextIO):
    """Send what a run prints (stdout, stderr, and log handlers writing to them: Flower's, Ray's) to ``log``."""
    terminals = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    stderr = sys.stderr

    def stream_handlers():
        loggers = [logging.getLogger()] + [
            logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
        ]
        return [h for logger in loggers for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and not isinstance(getattr(type(h), "stream", None), property)]  # those follow sys.stderr

    swapped = [(h, h.stream) for h in stream_handlers() if id(h.stream) in terminals]
    for handler, _ in swapped:
        handler.setStream(log)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for handler, old in swapped:
            handler.setStream(old)
        for handler in stream_handlers():  # created during the run, on the redirected stderr
            if handler.stream is log:
                handler.setStream(stderr)


__all__ = ["output_to"]
