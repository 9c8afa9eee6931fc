"""NNX vs Linen train steps, same run: the book's VGG16 classifier at 150x150 (batch 20), the
frozen step (head only) and the fine-tune step (block5 + head), conv_impl "auto".

    python -m benchmarks.bench_nnx [--rounds 5] [--steps 5] [--batch 20] [--smoke] [--out F]

Both faces run the same forward pass (vggjax.model.vgg.forward); what differs is the step's
plumbing: a jitted pure function over a TrainState (Linen) vs nnx.jit over the module and
nnx.Optimizer (NNX). Rounds alternate the faces; the table reports median seconds per step and
the NNX/Linen ratio. Weights are random (the speed does not depend on their values).
Recorded results: benchmarks/results_nnx.md (written by hand from a run's output).
"""
import argparse

import jax
import numpy as np
from flax import nnx

import vggjax
import vggjax.nnx
from benchmarks import harness
from vggjax.inference import heads
from vggjax.model import vgg
from vggjax.train import freezing, steps

PHASES = {"frozen": ("head", ("head",)), "finetune": ("block5+head", ("block5", "head"))}


def setup(batch: int, size: int):
    base = vggjax.create("vgg16", include_top=False, conv_impl="auto")
    base_v = vgg.init_random(base)
    linen, v = heads.init_classifier(base_v, base, heads.Head(), size, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    data = {"image": rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 2, batch).astype(np.int32), "mask": np.ones(batch, bool)}
    return linen, v, data


def linen_runner(linen, v, data, spec):
    tx = freezing.make_optimizer(freezing.book_rmsprop(1e-5), v["params"], spec)
    step = steps.make_train_step(linen, tx, preprocess_mode="caffe")
    holder = {"state": steps.TrainState.create(v, tx)}

    def run():
        holder["state"], m = step(holder["state"], data)
        return m["loss"]
    return run


def nnx_runner(linen, v, data, groups):
    model = vggjax.nnx.from_linen(linen, v)
    model.train()
    optimizer = nnx.Optimizer(model, freezing.book_rmsprop(1e-5), wrt=vggjax.nnx.trainable(*groups))
    step = vggjax.nnx.make_train_step(preprocess_mode="caffe")
    key = jax.random.PRNGKey(0)
    return lambda: step(model, optimizer, data, key)["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=20)
    harness.arguments(p, results=None)
    args = p.parse_args()
    size = 150
    if args.smoke:
        args.rounds, args.steps, args.batch, size = 1, 1, 2, 32
    if min(args.rounds, args.steps, args.batch) < 1:
        p.error("--rounds, --steps and --batch must be >= 1")
    log = harness.Log(f"NNX vs Linen train steps, VGG16 + book head, {size}x{size}, batch {args.batch}")
    linen, v, data = setup(args.batch, size)
    rows = []
    for phase, (spec, groups) in PHASES.items():
        runners = {"linen": linen_runner(linen, v, data, spec), "nnx": nnx_runner(linen, v, data, groups)}
        times = harness.interleave({name: harness.Timer(run, args.steps) for name, run in runners.items()},
                                   args.rounds, log)
        log.data[phase] = {name: list(t) for name, t in times.items()}
        rows.append([phase, f"{times['linen'].median:.3f}", f"{times['nnx'].median:.3f}",
                     f"{harness.speedup(times, 'linen', 'nnx'):.3f}"])
    log(f"\nmedians of {args.rounds} rounds x {args.steps} steps, faces alternating:\n")
    log.table(["step", "Linen s/step", "NNX s/step", "NNX / Linen"], rows)
    log.save(harness.out_path(args))


if __name__ == "__main__":
    main()
