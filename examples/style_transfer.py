"""Neural style transfer with VGG19, as "Deep Learning with Python" does it (1st ed. 8.3, 2nd ed. 12.3).

The combination image starts from the content image and is optimised against the book's loss:
content at block5_conv2, Gram-matrix style at block1_conv1 ... block5_conv1, total variation.
  --preset book1 (1st ed., L-BFGS) or book2 (2nd ed., SGD): the loss weights are
  vggjax.losses.perceptual.PRESETS, the optimiser and default steps vggjax.losses.style_transfer.SCHEDULES.
Writes --out/step_NNNNN.png every --save-every steps, final.png and loss.png.

    python tools/convert_weights.py --source keras --arch vgg19      # the book's weights
    python examples/style_transfer.py --content photo.jpg --style painting.jpg \
        --weights ~/.cache/vggjax/converted/keras_vgg19_notop --out runs/style
    python examples/style_transfer.py --smoke     # generated images, random VGG19 weights, < 1 min

The logic lives in vggjax.losses.style_transfer; this file only parses arguments (intentionally kept short).
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

from vggjax.train import synthetic

from vggjax.losses import style_transfer
from vggjax.utils import console, interrupts

SMOKE = dict(size=64, steps=10, save_every=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--content", help="content image file")
    p.add_argument("--style", help="style reference image file")
    p.add_argument("--weights", metavar="DIR", help="converted VGG19 weights (tools/convert_weights.py)")
    schedules = style_transfer.SCHEDULES
    p.add_argument("--preset", default="book1", choices=sorted(schedules))
    p.add_argument("--steps", type=int, help=f"default { {k: s.steps for k, s in schedules.items()} }")
    p.add_argument("--size", type=int, help="image height in pixels, width by aspect ratio (default 400)")
    p.add_argument("--save-every", type=int,
                   help=f"default { {k: s.save_every for k, s in schedules.items()} }")
    p.add_argument("--out", default="runs/style_transfer", help="output directory")
    p.add_argument("--smoke", action="store_true", help="instead of --content, --style, --weights: "
                   "generated images and random VGG19 weights converted from a Keras h5 file")
    console.add_quiet(p)
    args = p.parse_args(argv)
    settings = dict(SMOKE) if args.smoke else dict(size=400)
    settings.update({k: v for k in ("size", "steps", "save_every") if (v := getattr(args, k)) is not None})
    try:
        settings = style_transfer.check_settings(args.preset, settings.get("steps"), settings["size"],
                                                 settings.get("save_every"))
        if args.smoke:
            inputs = os.path.join(args.out, "smoke_inputs")
            folder = synthetic.make_image_folder(os.path.join(inputs, "images"), sizes={"train": 1},
                                             jpeg_size=96)
            args.content, args.style = (str(folder / "train" / k / f"{k}.0.jpg") for k in synthetic.CLASSES)
            args.weights = str(synthetic.make_random_weights(os.path.join(inputs, "random_vgg19_notop"), "vgg19"))
        elif not (args.content and args.style and args.weights):
            p.error("--content, --style and --weights are required (or --smoke)")
        style_transfer.check_inputs(args.content, args.style, args.out, **settings)
        pretrained = vggjax.load(args.weights)
        if args.smoke:
            print(f"smoke run: generated images, RANDOM VGG19 weights in {args.weights}")
        result = style_transfer.run(pretrained, args.content, args.style, args.out, **settings,
                                    progress=not args.quiet)
    except (ValueError, OSError) as err:  # flags, files, and a loss that became NaN
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"loss {result['losses'][0]:.4g} -> {result['losses'][-1]:.4g} in {settings['steps']} steps; "
          f"images and loss.png in {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    interrupts.run_command(main, "the files written so far are complete")
