"""Export a fine-tuned classifier or converted VGG weights to StableHLO (jax), a TF SavedModel or ONNX.

    python tools/export.py runs/finetune_catsdogs/export/finetune --format onnx --output catsdogs-onnx
    python tools/export.py ~/.cache/vggjax/converted/keras_vgg16 --format jax --output vgg16-jax

The artifact takes uint8 RGB images (N, S, S, 3), any batch size, preprocessing inside, and runs
without vggjax (see README, "Shipping a model"). tools/predict.py --weights OUT runs it.
"""
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

from vggjax.export import artifact
from vggjax.inference import serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC", help="an exported classifier (export/<phase>) or a "
                        "converted weights directory (tools/convert_weights.py)")
    parser.add_argument("--format", required=True, choices=sorted(artifact.FORMATS))
    parser.add_argument("--output", required=True, metavar="OUT")
    parser.add_argument("--precision", choices=sorted(serving.PRECISIONS), default="fp32",
                        help="bf16 halves the artifact (jax and savedmodel only)")
    parser.add_argument("--image-size", type=int, help="input size for conv features (default 224); "
                        "a classifier keeps the size it was trained at")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier vggjax export")
    logs.add_verbose(parser)
    args = parser.parse_args(argv)
    logs.third_party(args.verbose)  # before TensorFlow or onnx load
    try:
        with interrupts.handling():
            manifest = artifact.export(args.src, args.format, args.output, args.precision,
                                       args.image_size, args.overwrite)
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    s = manifest["input"]["shape"][1]
    print(f"wrote {args.format} artifact to {os.path.abspath(args.output)}: uint8 (N, {s}, {s}, 3) -> "
          + ", ".join(manifest["outputs"]) + f" ({manifest['precision']})")
    return 0


if __name__ == "__main__":
    interrupts.run_command(main, INTERRUPTED)
