"""Cats vs dogs with a pretrained VGG16, the three ways "Deep Learning with Python" (ch. 5.3) does it:
feature extraction, a frozen base with augmentation, then block5 fine-tuned.

    python examples/finetune_catsdogs.py --data ../shared/data/cats_and_dogs_small
    python examples/finetune_catsdogs.py --smoke     # generated images, random weights, < 3 min

The same command as `vggjax finetune` (installed); its flags, phases and outputs are described in
vggjax/cli/finetune.py and the README. This file only runs it from a checkout.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("vggjax") is None:  # a checkout, not installed: the repo root is one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vggjax.cli.main import run

if __name__ == "__main__":
    run("finetune", sys.argv[1:])
