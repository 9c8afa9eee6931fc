"""Command line for converting official Keras / torchvision / timm VGG weights into a vggjax checkpoint.

    python tools/convert_weights.py --source keras --arch vgg16            # conv base, downloads
    python tools/convert_weights.py --source keras --arch vgg16 --include-top --input vgg16.h5
    python tools/convert_weights.py --source timm --arch vgg16_bn --input model.safetensors

The logic lives in vggjax.weights.convert_file; this file only parses arguments.
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    import vggjax
except ImportError:  # run from a checkout without installing: the repo root is one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vggjax

from vggjax.utils import interrupts, logs

INTERRUPTED = "nothing was written"  # what the line "error: interrupted; ..." adds
if __name__ == "__main__":  # first: Ctrl-C while JAX loads ends in one line too
    interrupts.command(INTERRUPTED)

from vggjax import weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, choices=sorted(weights.SOURCES))
    parser.add_argument("--arch", required=True, choices=sorted(vggjax.ARCHS))
    parser.add_argument("--include-top", action="store_true",
                        help="keep the 1000-class classifier (fc1, fc2, predictions)")
    parser.add_argument("--input", metavar="FILE",
                        help="weights file already on disk (default: download the official one)")
    parser.add_argument("--output", metavar="DIR", help="default: $VGGJAX_CACHE/converted/"
                        "<source>_<arch>[_notop], with $VGGJAX_CACHE defaulting to ~/.cache/vggjax")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    logs.add_verbose(parser)
    args = parser.parse_args(argv)
    logs.third_party(args.verbose)  # before TensorFlow or onnx load
    output = args.output or weights.default_output_dir(args.source, args.arch, args.include_top)
    try:
        with interrupts.handling():  # SIGTERM ends like Ctrl-C: one line, nothing written
            meta = weights.convert_file(args.source, args.arch, args.input, output,
                                        include_top=args.include_top, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError) as err:  # bad files, existing output, no network, no torch
        print(f"error: {err}", file=sys.stderr)
        return 1
    top = "with" if meta["include_top"] else "without"
    print(f"converted {args.source} {args.arch} ({top} top) to {os.path.abspath(output)}")
    return 0


if __name__ == "__main__":
    interrupts.run_command(main, INTERRUPTED)
