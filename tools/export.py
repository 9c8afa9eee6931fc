"""Export a fine-tuned classifier or converted VGG weights to StableHLO, a TF SavedModel or ONNX: `vggjax export` from a checkout.

    python tools/export.py --help

The command lives in vggjax/cli/export.py (installed as `vggjax export`); this file only runs it.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("vggjax") is None:  # a checkout, not installed: the repo root is one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vggjax.cli.main import run

if __name__ == "__main__":
    run("export", sys.argv[1:])
