"""The book's fine-tuning (ch. 5.3) with Flax NNX: a frozen VGG16 base under a new head, then block5.

    python examples/finetune_nnx.py --weights DIR --data ../shared/data/cats_and_dogs_small
    python examples/finetune_nnx.py --smoke     # generated images, random weights, < 2 min

Phase "frozen" trains the head (RMSprop 2e-5, augmentation), phase "finetune" block5 and the head
(1e-5); each ends in an Orbax checkpoint of the whole classifier in --workdir/<phase>, evaluated on
the test split. As the Linen workflow: progress bars (--quiet: none), history.json, curves.png
and TensorBoard event files (--workdir/tensorboard/<phase>) in --workdir. The logic lives in vggjax.nnx (intentionally kept short); resuming mid-phase and
exports are the Linen workflow's (examples/finetune_catsdogs.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import vggjax
except ImportError:  # run from a checkout without installing: the repo root is one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vggjax

import jax
from flax import nnx

import vggjax.nnx as vnnx
from vggjax import weights
from vggjax.train import augmentation, freezing, metric_writers, report, synthetic
from vggjax.train.config import Config
from vggjax.utils import atomic, console, interrupts, locks

PHASES = (("frozen", ("head",), 2e-5), ("finetune", ("block5", "head"), 1e-5))


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, found {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", metavar="DIR", help="converted VGG weights without top")
    p.add_argument("--data", metavar="DIR", help="image folder: DIR/{train,validation,test}/<class>/*.jpg")
    p.add_argument("--workdir", default="runs/finetune_nnx")
    p.add_argument("--image-size", type=positive, default=150)
    p.add_argument("--batch-size", type=positive, default=20)
    p.add_argument("--epochs", type=positive, nargs=2, metavar=("FROZEN", "FINETUNE"),
                   help="epochs of the two phases (default 30 100; --smoke: 2 2)")
    p.add_argument("--pipeline", choices=("tfdata", "grain"), default="tfdata")
    p.add_argument("--smoke", action="store_true", help="generated images and random weights, "
                   "48x48, 2 + 2 epochs (or --epochs), the smoke learning rates")
    console.add_quiet(p)
    args = p.parse_args(argv)
    console.show_logs()
    if args.smoke:
        args.data, args.weights = synthetic.inputs(os.path.join(args.workdir, "smoke_inputs"))
        args.image_size, args.epochs = synthetic.SETTINGS["image_size"], args.epochs or (2, 2)
        args.learning_rates = synthetic.SETTINGS["learning_rates"]  # random weights learn slowly
    elif not (args.weights and args.data):
        p.error("give --weights and --data (or --smoke)")
    args.epochs = args.epochs or (30, 100)
    try:  # the Linen example's checks of these flags (sizes that cannot fit, ...), before any work
        Config(weights=args.weights, workdir=args.workdir, data=args.data, phases=("frozen", "finetune"),
               image_size=args.image_size, batch_size=args.batch_size, pipeline=args.pipeline,
               epochs=dict(zip(("frozen", "finetune"), args.epochs)))
        os.makedirs(args.workdir, exist_ok=True)
        with interrupts.handling(), locks.locked(args.workdir, f"--workdir {args.workdir}"):
            return run(args)  # a second run into the same --workdir is refused, naming this one's pid
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (interrupts.Interrupted, status 143)
        print("error: interrupted; the finished phases' checkpoints are kept", file=sys.stderr)
        return getattr(err, "status", 130)
    except (ValueError, OSError, atomic.RefusedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def run(args) -> int:
    splits = vnnx.book_splits(args.data, args.image_size, args.batch_size, args.pipeline)
    base = vnnx.load(args.weights, conv_impl="auto")
    model = vnnx.book_classifier(base, args.image_size, num_classes=len(splits["train"].class_names))
    train_step = vnnx.make_train_step(augment=augmentation.FIRST_EDITION, preprocess_mode=base.preprocessing)
    eval_step = vnnx.make_eval_step(preprocess_mode=base.preprocessing)
    for (phase, groups, lr), epochs in zip(PHASES, args.epochs):
        lr = getattr(args, "learning_rates", {}).get(phase, lr)
        wrt = vnnx.trainable(*groups)
        print(f"{phase}: {vnnx.trainable_report(model, wrt)}", flush=True)
        optimizer = nnx.Optimizer(model, freezing.book_rmsprop(lr), wrt=wrt)
        writer = metric_writers.TensorBoard(os.path.join(args.workdir, metric_writers.TENSORBOARD, phase))
        history = vnnx.fit(model, optimizer, train_step, eval_step, splits["train"], splits["validation"],
                           epochs=epochs, key=jax.random.PRNGKey(0), where=phase, progress=not args.quiet,
                           writer=writer, learning_rate=lr)
        writer.close()
        saved = vnnx.save(os.path.join(args.workdir, phase), model, overwrite=True)
        test = vnnx.evaluate(model, eval_step, splits["test"], progress=not args.quiet, desc=f"{phase}: test")
        print(f"{phase}: test accuracy {test['accuracy']:.3f} on {test['count']} images; saved {saved}", flush=True)
        histories = report.update_json(os.path.join(args.workdir, report.HISTORY), phase, history)
    report.plot_curves(histories, os.path.join(args.workdir, report.CURVES),
                       notes=synthetic.notes(args.data, json.loads(Path(args.weights, weights.METADATA).read_text())))
    return 0


if __name__ == "__main__":
    interrupts.run_command(main, "the finished phases' checkpoints are kept")
