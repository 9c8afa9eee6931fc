"""DLwP 1st ed. 5.4 with vggjax: activation grids, 8x8 filter-pattern sheets, a Grad-CAM overlay.

    python examples/visualize_convnet.py --weights DIR --image elephant.jpg --out viz/
    python examples/visualize_convnet.py --smoke --out /tmp/viz     # offline, random weights

DIR: weights converted with --include-top (Grad-CAM needs the classifier; without it the
overlay is skipped). Intentionally kept short: the logic lives in vggjax.viz.convnet.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

try:
    import vggjax
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vggjax

from vggjax.utils import atomic, console, images, interrupts
from vggjax.utils.progress import progress_bar

from vggjax.viz import convnet
from vggjax.weights.random_weights import CAFFE_INPUT_RMS, random_variables

ACTIVATION_LAYERS = ("block1_conv1", "block1_conv2", "block2_conv1", "block3_conv1")
FILTER_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1")


def smoke_inputs(out: Path):
    """Random VGG16 weights with top and a generated picture: the offline smoke run."""
    model = vggjax.VGG16()
    # Scaled for caffe inputs so logits stay in softmax's range; NumPy draws the 138M numbers
    # in seconds, where model.init takes ~20 s.
    variables = random_variables("vgg16", include_top=True, seed=0, input_rms=CAFFE_INPUT_RMS)
    yy, xx = np.mgrid[0:180, 0:240]
    picture = np.stack([90 + 60 * np.sin(xx / 40.0), 110 + 50 * np.cos(yy / 30.0),
                        140 + 40 * np.sin((xx + yy) / 50.0)], axis=-1)
    for cy, cx, r, colour in ((60, 70, 35, (230, 200, 40)), (120, 170, 45, (200, 40, 60))):
        picture[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour  # two discs to look at
    picture[140:165, 20:110] = (30, 30, 30)
    picture = picture.astype(np.uint8)
    path = images.save_png(out / "smoke_input.png", picture)
    return model, variables, lambda x: vggjax.preprocess_input(x, "caffe"), path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", metavar="DIR")
    parser.add_argument("--image", metavar="FILE")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--smoke", action="store_true",
                        help="random weights and a generated image, smaller filter patterns")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    if args.smoke and (args.weights or args.image):
        parser.error("--smoke runs on random weights and a generated image: drop --weights/--image")
    if not args.smoke and not (args.weights and args.image):
        parser.error("give --weights and --image (or --smoke)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    start = time.time()
    try:  # what a user can get wrong (paths, weights, images) ends in one line, before any work
        if args.smoke:
            model, variables, preprocess, image_path = smoke_inputs(out)
            size, steps = 32, 3
        else:
            pre = vggjax.load(args.weights)
            model, variables, preprocess, image_path = pre.model, pre.variables, pre.preprocess, args.image
            size, steps = 64, 40  # the book's sheets: 64-px patterns, 40 steps
        original = images.load_image(image_path)
        # The book's layers where this arch has them (VGG11's block1 has one conv).
        shown = [n for n in ACTIVATION_LAYERS if n in model.layer_names()]
        written = [out / f"activations_{n}.png" for n in shown] + [
            out / f"filters_{n}.png" for n in FILTER_LAYERS] + [out / "gradcam.png"] * model.include_top
        for path in written:  # a PNG of the user's under one of these names is never replaced
            atomic.check_target(path, directory=False)
    except (ValueError, OSError) as err:
        parser.error(str(err))

    # Activations of the first layers for the picture at the book's 150x150.
    x = preprocess(images.load_image(image_path, (150, 150))[None])
    base = model.clone(include_top=False)
    acts = base.apply(variables, x, outputs=shown)
    for name in shown:
        images.save_png(out / f"activations_{name}.png", convnet.activation_grid(acts[name]))

    fast = model.clone(conv_impl="auto")  # the fastest conv on this CPU (oneDNN / Winograd)
    # 64 filters per layer in one compiled call
    for name in progress_bar(FILTER_LAYERS, desc="filter patterns", unit="layer", enabled=not args.quiet):
        tiles = convnet.filter_pattern(fast, variables, name, range(64), size=size, steps=steps)
        images.save_png(out / f"filters_{name}.png", convnet.grid(tiles))

    if model.include_top:
        x = preprocess(images.load_image(image_path, (224, 224))[None])
        cam = convnet.grad_cam(model, variables, x, book=True)[0]
        images.save_png(out / "gradcam.png", convnet.overlay(original, cam))
    else:
        print("no classifier in these weights: Grad-CAM skipped")
    print(f"wrote {len(written)} PNGs to {out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    interrupts.run_command(main, "the files written so far are complete")
