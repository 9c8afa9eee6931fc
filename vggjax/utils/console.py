"""What a command line shows: vggjax's log lines (the `logging` module, logger "vggjax") as plain
lines on stdout, and `--quiet` to turn the progress bars (stderr) off."""
from __future__ import annotations

import argparse
import logging
import sys

LOGGER = "vggjax"


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """Add `--quiet`: no progress bars (the log lines stay)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the log lines stay); "
                        "in a log file the bars print a line per tenth of a job at most")


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever sys.stdout is at each record (pytest and Jupyter swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; sys.stdout is looked up instead
        pass


def show_logs(level: int = logging.INFO) -> None:
    """Print vggjax's log records from `level` up as bare lines on stdout, flushed at once (a log
    file then holds them in order with the progress lines); once per process."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # absl (TensorFlow, Orbax) handles the root logger: no second copy
