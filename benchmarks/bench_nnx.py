"""NNX vs Linen train steps, same run: the book's VGG16 classifier at 150x150 (batch 20), the
frozen step (head only) and the fine-tune step (block5 + head), conv_impl "auto".

    python benchmarks/bench_nnx.py [--rounds 5] [--steps 5] [--batch 20]

Both faces run the same forward pass (vggjax.model.vgg.forward); what differs is the step's
plumbing: a jitted pure function over a TrainState (Linen) vs nnx.jit over the module and
nnx.Optimizer (NNX). Rounds alternate the faces; the table reports median seconds per step and
the NNX/Linen ratio. Weights are random (the speed does not depend on their values).
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import vggjax  # noqa: E402
import vggjax.nnx as vnnx  # noqa: E402
from benchlog import Log  # noqa: E402
from vggjax.model.vgg import init_random  # noqa: E402
from vggjax.inference import classifier  # noqa: E402
from vggjax.train import freezing, loop  # noqa: E402

PHASES = {"frozen": ("head", ("head",)), "finetune": ("block5+head", ("block5", "head"))}


def setup(batch: int):
    base = vggjax.create("vgg16", include_top=False, conv_impl="auto")
    base_v = init_random(base)
    linen, v = classifier.init_classifier(base_v, base, classifier.Head(), 150, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    data = {"image": rng.uniform(0, 255, (batch, 150, 150, 3)).astype(np.float32),
            "label": rng.integers(0, 2, batch).astype(np.int32), "mask": np.ones(batch, bool)}
    return linen, v, data


def linen_runner(linen, v, data, spec):
    tx = freezing.make_optimizer(freezing.book_rmsprop(1e-5), v["params"], spec)
    step = loop.make_train_step(linen, tx, preprocess_mode="caffe")
    holder = {"state": loop.TrainState.create(v, tx)}

    def run():
        holder["state"], m = step(holder["state"], data)
        return m["loss"]
    return run


def nnx_runner(linen, v, data, groups):
    model = vnnx.from_linen(linen, v)
    model.train()
    optimizer = nnx.Optimizer(model, freezing.book_rmsprop(1e-5), wrt=vnnx.trainable(*groups))
    step = vnnx.make_train_step(preprocess_mode="caffe")
    key = jax.random.PRNGKey(0)
    return lambda: step(model, optimizer, data, key)["loss"]


def timed(run, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = run()
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=20)
    args = p.parse_args()
    log = Log()
    flags = subprocess.run("grep -o 'amx_bf16\\|avx512_bf16\\|avx512f\\|avx2' /proc/cpuinfo | sort -u",
                           shell=True, capture_output=True, text=True).stdout.split()
    log(f"CPU flags: {' '.join(flags)}; jax {jax.__version__}; batch {args.batch}, 150x150, VGG16 + book head")
    linen, v, data = setup(args.batch)
    for phase, (spec, groups) in PHASES.items():
        runners = {"linen": linen_runner(linen, v, data, spec), "nnx": nnx_runner(linen, v, data, groups)}
        for run in runners.values():
            timed(run, 1)  # compile
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                times[name].append(timed(run, args.steps))
        med = {name: statistics.median(t) for name, t in times.items()}
        log(f"{phase}: linen {med['linen']:.3f} s/step, nnx {med['nnx']:.3f} s/step, "
            f"nnx/linen {med['nnx'] / med['linen']:.3f} (medians of {args.rounds} rounds x {args.steps} steps)")


if __name__ == "__main__":
    main()
