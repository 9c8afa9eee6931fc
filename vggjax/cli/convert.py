"""Convert Keras / torchvision / timm VGG weights, or a whole model trained with them, for vggjax.

    vggjax convert --source keras --arch vgg16            # conv base, downloads
    vggjax convert --source keras --arch vgg16 --include-top --input vgg16.h5
    vggjax convert --source timm --arch vgg16_bn --input model.safetensors
    vggjax convert --source timm --arch vgg16 --revision SHA   # from the Hugging Face Hub

A model you trained becomes a classifier directory (vggjax predict --weights DIR, vggjax export DIR):

    vggjax convert --source keras --input fine_tuning.keras --class-names cats,dogs --output DIR
    vggjax convert --source keras --input cats_and_dogs_small_3.h5 --preprocess rescale --output DIR
    vggjax convert --source torchvision --arch vgg16 --input FILE.pth --class-names cats,dogs --output DIR

The logic lives in vggjax.weights.convert_file and vggjax.inference.imported; this file only parses arguments.
"""
from __future__ import annotations

import argparse
import os
import sys

import vggjax

from vggjax.cli import errors
from vggjax import weights
from vggjax.utils import console, interrupts
from vggjax.weights.preprocessing import MODES

MODEL_FLAGS = ("class_names", "preprocess", "image_size", "architecture")  # a classifier import's


def parse_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    parser.add_argument("--source", required=True, choices=sorted(weights.SOURCES))
    parser.add_argument("--arch", choices=sorted(vggjax.ARCHS), help="required except for a whole "
                        "Keras model, whose architecture is read from the file")
    parser.add_argument("--include-top", action="store_true",
                        help="keep the 1000-class classifier (fc1, fc2, predictions)")
    parser.add_argument("--input", metavar="FILE",
                        help="weights or model file already on disk (default: download the official weights)")
    parser.add_argument("--output", metavar="DIR", help="default: $VGGJAX_CACHE/converted/"
                        "<source>_<arch>[_notop], with $VGGJAX_CACHE defaulting to ~/.cache/vggjax")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    parser.add_argument("--revision", metavar="SHA", help="--source timm without --input: the Hub "
                        "commit to download (HF_HUB_OFFLINE=1: from the Hub's cache only)")
    group = parser.add_argument_group("a model you trained, imported as a classifier directory")
    group.add_argument("--class-names", metavar="NAMES|FILE", help="comma-separated, or a file with "
                       "one a line, in output order (imports a torchvision/timm classifier too)")
    group.add_argument("--preprocess", choices=sorted(MODES), help="what a Keras model's inputs "
                       "were when it does not preprocess them itself (rescale: x/255)")
    group.add_argument("--image-size", type=int, help="for a Keras model whose Input leaves it open; "
                       "torchvision/timm: default 224")
    group.add_argument("--architecture", metavar="JSON", help="model.to_json() of a .weights.h5 --input")
    args = console.parse_command(parser, argv)
    args.classifier = args.class_names is not None or (args.source == "keras" and args.arch is None)
    given = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if getattr(args, f) is not None]
    if args.classifier:
        if args.input is None or args.output is None:
            parser.error("importing a model as a classifier needs --input FILE and --output DIR")
        if args.include_top:
            parser.error("--include-top is for weights; a classifier import keeps the model's head")
        if args.source != "keras" and args.arch is None:
            parser.error(f"--source {args.source} needs --arch")
        wrong = [f for f in ("--preprocess", "--architecture") if f in given and args.source != "keras"]
    else:
        if args.arch is None:
            parser.error(f"--source {args.source} needs --arch")
        wrong = given
    if args.revision is not None and (args.source != "timm" or args.input is not None):
        parser.error("--revision is for --source timm without --input (a download from the Hub)")
    if wrong:
        parser.error(f"{', '.join(wrong)} only apply to importing a whole Keras model (--source keras "
                     "without --arch) or a classifier with --class-names")
    return args


def import_classifier(args) -> str:
    from vggjax.inference import imported
    from vggjax.inference.heads import hidden_layers

    names = imported.parse_class_names(args.class_names) if args.class_names is not None else None
    if args.source == "keras":
        clf = imported.from_keras(args.input, args.output, args.preprocess, names, args.image_size,
                                  args.architecture, args.overwrite)
    else:
        clf = imported.from_torch(args.input, args.arch, args.output, names, args.source,
                                  args.image_size or 224, args.overwrite)
    head = clf.model.head
    widths = [w for _, w in hidden_layers(head)]
    return (f"imported {args.input} as a classifier into {os.path.abspath(args.output)}: "
            f"{clf.image_size}x{clf.image_size} images, preprocessing {clf.preprocessing}, head "
            f"{head.pooling} -> {widths} -> {head.num_outputs}, classes {list(clf.class_names)}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    args = parse_args(parser, argv)
    try:
        with interrupts.handling():  # SIGTERM ends like Ctrl-C: one line, nothing written
            if args.classifier:
                print(import_classifier(args))
                return 0
            output = args.output or weights.default_output_dir(args.source, args.arch, args.include_top)
            meta = weights.convert_file(args.source, args.arch, args.input, output,
                                        include_top=args.include_top, overwrite=args.overwrite,
                                        revision=args.revision, progress=not args.quiet)
    except (ValueError, OSError, ImportError) as err:  # bad files, existing output, no network, no torch
        print(errors.error_line(err), file=sys.stderr)
        return 1
    top = "with" if meta["include_top"] else "without"
    print(f"converted {args.source} {args.arch} ({top} top) to {os.path.abspath(output)}")
    return 0
