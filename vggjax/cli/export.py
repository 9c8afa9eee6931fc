"""Export a fine-tuned classifier or converted VGG weights to StableHLO (jax), a TF SavedModel or ONNX.

    vggjax export runs/finetune_catsdogs/classifiers/finetune --format onnx --output catsdogs-onnx
    vggjax export ~/.cache/vggjax/converted/keras_vgg16 --format jax --output vgg16-jax

The artifact takes uint8 RGB images (N, S, S, 3), any batch size, preprocessing inside, and runs
without vggjax (see README, "Shipping a model"). `vggjax predict --weights OUT` runs it.
"""
import argparse
import os
import sys

from vggjax.cli import errors
from vggjax.export import artifact
from vggjax.inference import serving
from vggjax.utils import console, interrupts



def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC", help="a classifier directory (a run's classifiers/<phase>) or a "
                        "converted weights directory (vggjax convert)")
    parser.add_argument("--format", required=True, choices=sorted(artifact.FORMATS))
    parser.add_argument("--output", required=True, metavar="OUT")
    parser.add_argument("--precision", choices=sorted(serving.PRECISIONS), default="fp32",
                        help="bf16 halves the artifact (jax and savedmodel only)")
    parser.add_argument("--image-size", type=int, help="input size for conv features (default 224); "
                        "a classifier keeps the size it was trained at")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier vggjax export")
    args = console.parse_command(parser, argv)
    try:
        with interrupts.handling():
            manifest = artifact.export(args.src, args.format, args.output, args.precision,
                                       args.image_size, args.overwrite, progress=not args.quiet)
    except (ValueError, OSError, ImportError) as err:
        print(errors.error_line(err), file=sys.stderr)
        return 1
    s = manifest["input"]["shape"][1]
    print(f"wrote {args.format} artifact to {os.path.abspath(args.output)}: uint8 (N, {s}, {s}, 3) -> "
          + ", ".join(manifest["outputs"]) + f" ({manifest['precision']})")
    return 0
