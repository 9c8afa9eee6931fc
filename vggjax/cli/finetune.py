"""Cats vs dogs with a pretrained VGG16, the three ways "Deep Learning with Python" (ch. 5.3) does it.

1. features: run the conv base once, train a small densely connected head on the stored
   4x4x512 features. The book: ~90% validation accuracy.
2. frozen:   conv base frozen, fresh head, data augmentation. The book reports ~96%, but that run's
   base was not actually frozen; truly frozen it is ~90%.
3. finetune: continue from 2 with block5 unfrozen, RMSprop 1e-5. The book: 96.8% test accuracy.

Every phase evaluates on the test split, writes history.json, results.json, curves.png and
TensorBoard logs in --workdir, saves its classifier in --workdir/classifiers/<phase>, and resumes
where it stopped if interrupted. Defaults are the 1st edition's: 150x150, batch 20, RMSprop 2e-5
(heads) and 1e-5 (block5), 30 / 30 / 100 epochs, the ImageDataGenerator augmentation.

    vggjax finetune --data ../shared/data/cats_and_dogs_small
    vggjax finetune --smoke     # generated images, random weights, < 3 min

The logic lives in vggjax.train.workflow (the flags are vggjax.train.config.Config's fields); this
module only parses arguments. `python examples/finetune_catsdogs.py` runs it from a checkout.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from vggjax.train import inputs, parallel, synthetic, workflow
from vggjax.train.config import Config, add_arguments, config_arguments
from vggjax.utils import console, interrupts


TFDS_HOST = "download.microsoft.com"  # where tfds fetches cats_vs_dogs from


def check_tfds(pipeline: str, data_dir: str | None) -> None:
    """Fail at once when tfds cats_vs_dogs cannot be read: for grain, not prepared in ArrayRecord
    (Grain never downloads); for tfdata, neither prepared nor downloadable (offline)."""
    if pipeline == "grain":
        from vggjax.train import grain_data
        grain_data.tfds_source(data_dir)
        return
    import tensorflow_datasets as tfds

    if tfds.builder("cats_vs_dogs", data_dir=data_dir).is_prepared():
        return
    try:
        socket.getaddrinfo(TFDS_HOST, 443)
    except OSError as err:
        raise inputs.MissingInputError(
            f"tfds cats_vs_dogs is not prepared on this machine and {TFDS_HOST} cannot be reached "
            f"({err}); provide the images with --data DIR in the book's layout: DIR/train/cats/*.jpg, "
            "DIR/train/dogs/*.jpg, and the same under DIR/validation and DIR/test") from None


WORKDIR = "runs/finetune_catsdogs"
SMOKE_WORKDIR = "runs/smoke_{pipeline}"  # one per pipeline: make demo's (grain) and tf.data's apart


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--weights", metavar="DIR", help="converted weights (vggjax convert), or a classifier (--phases finetune continues from it) (default: Keras VGG16 no-top, "
                   "downloaded and converted into $VGGJAX_CACHE on first use)")
    p.add_argument("--workdir", help="where the run keeps its checkpoints, results and exports "
                   f"(default {WORKDIR}; with --smoke {SMOKE_WORKDIR.format(pipeline='PIPELINE')}, so "
                   "smoke runs never meet real ones)")
    p.add_argument("--restart", action="store_true", help="discard the run already in --workdir "
                   "(its checkpoints, results and exports) instead of refusing a different one")
    add_arguments(p)
    p.add_argument("--smoke", action="store_true", help="instead of --data and --weights: generated "
                   "two-class JPEGs and random VGG16 weights converted from a Keras h5 file, "
                   f"{synthetic.SETTINGS}; all phases in < 3 min on 2 CPU cores")
    args = console.parse_command(p, argv)
    console.show_logs()
    given = config_arguments(args)
    if args.workdir is None:
        args.workdir = SMOKE_WORKDIR.format(pipeline=given.get("pipeline", "tfdata")) if args.smoke else WORKDIR
    if given.get("data_parallel"):
        parallel.initialize_distributed()  # multi-host: before any other JAX call; no-op on one host

    start = time.time()
    try:
        # Every flag value, before any work (--smoke makes its own image folder: not tfds).
        Config(weights="", workdir=args.workdir, **{"data": "smoke" if args.smoke else "tfds", **given})
        if args.smoke:
            data, weights = synthetic.inputs(os.path.join(args.workdir, "smoke_inputs"), seed=given.get("seed", 0))
            print(f"smoke run: generated images in {data}, RANDOM VGG16 weights in {weights}; the "
                  "accuracies show that the pipeline learns, not what ImageNet weights reach", flush=True)
        else:
            data = given.get("data", "tfds")
            weights = inputs.resolve_inputs(args.weights, data)
            if data == "tfds":
                check_tfds(given.get("pipeline", "tfdata"), given.get("tfds_data_dir"))
        config = Config(weights=weights, workdir=args.workdir, progress=not args.quiet,
                                 **{**(synthetic.SETTINGS if args.smoke else {}), **given, "data": data})
        with interrupts.handling():  # SIGTERM ends like Ctrl-C, resumable
            results = workflow.run(config, restart=args.restart)
    except (inputs.MissingInputError, ValueError, OSError, ImportError) as err:  # flags, data, workdir, extras
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (interrupts.Interrupted, status 143)
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return getattr(err, "status", 130)
    for phase, r in results.items():
        best = "none: no epoch trained" if r["best_val_accuracy"] is None else f"{r['best_val_accuracy']:.4f}"
        tested = "" if r["tested_epoch"] is None else f", epoch {r['tested_epoch']} ({r['evaluate']})"
        print(f"{phase:>8}: test accuracy {r['test_accuracy']:.4f}  (best val {best}{tested})")
    print(f"done in {time.time() - start:.0f} s; results, curves, exports and TensorBoard logs (tensorboard "
          f"--logdir {os.path.join(args.workdir, 'tensorboard')}) in {os.path.abspath(args.workdir)}")
    return 0
