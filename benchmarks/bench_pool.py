"""VGG's 2x2 max pool, forward + gradient: flax's nn.max_pool vs vggjax's max_pool2x2, interleaved.

    python -m benchmarks.bench_pool [--rounds 5] [--reps 3] [--dtypes float32,bfloat16] [--smoke] [--out F]

nn.max_pool's gradient is XLA's select-and-scatter; vggjax.model.pooling.max_pool2x2 (a reshape and
a max, its gradient a mask) is what the model uses. Shapes: one 64x64x64x64 pool, and VGG16's
five pools at 150x150, batch 20 (the fine-tune step's). Reports the first call (trace +
compile + one run) and the median seconds of one forward + backward, and the ratio.
The filter sheet against the book's TF loop is bench_viz's (`--filters N`). Recorded results:
benchmarks/results_pool.md (its sheet with nn.max_pool swapped into the model was measured by
this script as of commit 8155b32, which patched the model; the library's pool is no longer
swapped by any benchmark).
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from vggjax.model.pooling import max_pool2x2

SHAPES = [(64, 64, 64, 64)] + [(20, s, s, c) for s, c in
                               ((150, 64), (75, 128), (37, 256), (18, 512), (9, 512))]
SMOKE_SHAPES = [(2, 16, 16, 8)]
POOLS = {"nn.max_pool": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"),
         "max_pool2x2": max_pool2x2}


def step(pool):
    """x, g -> (pool(x), its vjp with g): one forward and backward, jitted."""
    def run(x, g):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(g)[0]
    return jax.jit(run)


def bench(shape, dtype, rounds: int, reps: int, log) -> list[str]:
    """One table row: both pools' first call and median best-of-`reps` seconds, interleaved."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.normal(size=shape), 0), dtype)  # post-ReLU: zero windows tie
    g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), dtype)
    fns = {name: step(pool) for name, pool in POOLS.items()}
    times = harness.interleave({name: harness.Timer(lambda fn=fn: fn(x, g), best_of=reps)
                                for name, fn in fns.items()}, rounds, log=lambda _: None)
    old, new = times["nn.max_pool"], times["max_pool2x2"]
    name = "x".join(map(str, shape))
    log.data.setdefault("seconds", {})[f"{name} {jnp.dtype(dtype).name}"] = {k: list(v) for k, v in times.items()}
    return [name, jnp.dtype(dtype).name, f"{old.first:.2f}", f"{new.first:.2f}", f"{old.median * 1e3:.1f}",
            f"{new.median * 1e3:.1f}", f"{harness.speedup(times, 'max_pool2x2', 'nn.max_pool'):.1f}x"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="calls per round; the round keeps the fastest")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list; empty: none")
    harness.arguments(p, results=None)
    a = p.parse_args(argv)
    shapes = SHAPES
    if a.smoke:
        a.rounds, a.reps, shapes = 1, 1, SMOKE_SHAPES
    if a.rounds < 1 or a.reps < 1:
        p.error("--rounds and --reps must be >= 1")
    dtypes = [d for d in a.dtypes.split(",") if d]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            p.error(f"--dtypes: {d!r} is not one of float32, bfloat16, float16")
    log = harness.Log(f"VGG's 2x2 max pool, forward + gradient: {a.rounds} interleaved rounds (best of {a.reps})")
    rows = [bench(shape, jnp.dtype(d), a.rounds, a.reps, log) for d in dtypes for shape in shapes]
    log.table(["input (NHWC)", "dtype", "first call nn.max_pool s", "first call max_pool2x2 s",
               "nn.max_pool ms", "max_pool2x2 ms", "speed-up"], rows)
    log.save(harness.out_path(a))


if __name__ == "__main__":
    main()
