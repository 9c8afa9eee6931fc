"""Convert official Keras / torchvision / timm VGG weights into a vggjax checkpoint: `vggjax convert` from a checkout.

    python tools/convert_weights.py --help

The command lives in vggjax/cli/convert.py (installed as `vggjax convert`); this file only runs it.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("vggjax") is None:  # a checkout, not installed: the repo root is one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vggjax.cli.main import run

if __name__ == "__main__":
    run("convert", sys.argv[1:])
