"""What a vggjax command shows: its own lines, not the log output of the libraries under it."""
from __future__ import annotations

import logging
import os

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
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.CRITICAL if name == "asyncio" else logging.ERROR)


def add_verbose(parser) -> None:
    """A command's --verbose flag (argparse), which `third_party` takes."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show the log output of the libraries underneath (TensorFlow, onnx, ...)")
