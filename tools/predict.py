"""Classify image files with converted VGG weights or a classifier directory: `vggjax predict` from a checkout.

    python tools/predict.py --help

The command lives in vggjax/cli/predict.py (installed as `vggjax predict`); this file only runs it.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("vggjax") is None:  # a checkout, not installed: the repo root is one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vggjax.cli.main import run

if __name__ == "__main__":
    run("predict", sys.argv[1:])
