"""What a command line shows: vggjax's log lines (the `logging` module, logger "vggjax") as plain
lines on stdout, `--quiet` to turn the progress bars (stderr) off, and not the log output of the
libraries underneath unless `--verbose`."""
from __future__ import annotations

import argparse
import logging
import os
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


# Loggers whose records a command keeps out of sight: onnx_ir's serde warnings on every onnx export
# ("The value type for shape ... is not known"), jax2onnx's plugin reports, asyncio's reports of
# TensorStore futures nobody awaited, absl's and TensorFlow's Python-side lines.
THIRD_PARTY = ("onnx_ir", "onnxscript", "jax2onnx", "asyncio", "absl", "tensorflow")


def third_party(verbose: bool = False) -> None:
    """Keep third-party log output out of a command's output, unless `verbose` (its --verbose).

    At the source: those libraries' loggers at ERROR (asyncio's at CRITICAL: its ERROR records
    are the unawaited futures), TensorFlow's C++ log (TF_CPP_MIN_LOG_LEVEL=2: errors only) set
    before TensorFlow is imported, unless the environment sets it. A command's own errors and
    every exception still show.
    """
    for name in THIRD_PARTY:  # set either way: the library's own default (`quiet_by_default`) yields
        quiet = logging.CRITICAL if name == "asyncio" else logging.ERROR
        logging.getLogger(name).setLevel(logging.INFO if verbose else quiet)
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def add_verbose(parser) -> None:
    """A command's --verbose flag (argparse), which `third_party` takes."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show the log output of the libraries underneath (TensorFlow, onnx, ...)")


def quiet_by_default(*names: str) -> None:
    """Library code's default for third-party loggers that only say what no user can act on:
    ERROR, unless the application (a command's --verbose, `third_party`) set their level."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def parse_command(parser: argparse.ArgumentParser, argv, quiet: bool = True) -> argparse.Namespace:
    """A command's flags: adds --verbose (and --quiet when the command has progress bars), parses
    `argv`, then applies `third_party` before TensorFlow or onnx can load."""
    if quiet:
        add_quiet(parser)
    add_verbose(parser)
    args = parser.parse_args(argv)
    third_party(args.verbose)
    return args
