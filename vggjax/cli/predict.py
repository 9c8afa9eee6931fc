"""Classify image files with converted VGG weights (top-k ImageNet classes) or an exported cats-vs-dogs classifier.

    vggjax predict elephant.jpg --weights ~/.cache/vggjax/converted/keras_vgg16
    vggjax predict a.jpg b.png --weights DIR --top 3 --cam cams/ --json
    vggjax predict cat.jpg --weights runs/finetune_catsdogs/classifiers/finetune   # the class, then P(dogs)

Images are read and resized as keras.utils.load_img(target_size=(224, 224)) does (nearest by
default) and classified 32 at a time, with a progress bar on stderr (--quiet: none); stdout holds
only the predictions. The logic lives in vggjax.inference.predictor; this file only parses
arguments and prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vggjax.cli import errors
from vggjax.utils import console, images


from vggjax.inference.predictor import load_predictor, predict_files
from vggjax.viz import convnet


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would name this function: "invalid positive_int value"
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {value}")
    return value


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--weights", required=True, metavar="DIR",
                        help="converted weights with their top, or a classifier directory")
    parser.add_argument("--top", type=positive_int,
                        help="classes to print (default 5, or all when there are fewer)")
    parser.add_argument("--cam", metavar="OUTDIR", help="write a Grad-CAM overlay PNG per image")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--interpolation", choices=images.INTERPOLATIONS, default="nearest",
                        help="resizing filter, as keras.utils.load_img (default nearest)")
    args = console.parse_command(parser, argv)  # --quiet: no progress bar (stderr)
    if args.cam is not None and os.path.exists(args.cam) and not os.path.isdir(args.cam):
        parser.error(f"--cam {args.cam} exists and is not a directory")
    try:
        predictor = load_predictor(args.weights)
        if args.top is not None and args.top > predictor.num_classes:
            parser.error(f"--top {args.top} exceeds the {predictor.num_classes} classes of {args.weights}")
        top = args.top or min(5, predictor.num_classes)
        records = predict_files(predictor, args.images, top, args.cam, args.interpolation,
                                cam_overlay=convnet.cam_overlay, progress=not args.quiet)
    except (ValueError, OSError) as err:
        print(errors.error_line(err), file=sys.stderr)
        return 1
    for r in records:
        if "error" in r:
            print(f"skipped {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in (r for r in records if "top" in r):
            print(r["file"])
            if predictor.num_classes == 2 and predictor.class_names:
                best = r["top"][0]  # a binary head: the class it predicts, then P(positive class)
                p = best["probability"] if best["index"] == 1 else 1.0 - best["probability"]
                print(f"  {best['name']} ({best['probability']:.4f}); P({predictor.class_names[1]}) = {p:.4f}")
            else:
                for t in r["top"]:
                    print(f"  {t['probability']:.4f}  {t['index']:4d}  {t['name']}")
            if "cam" in r:
                print(f"  Grad-CAM: {r['cam']}")
    return 0 if any("top" in r for r in records) else 2
