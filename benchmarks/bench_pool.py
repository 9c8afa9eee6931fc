"""VGG's 2x2 max pool, forward + gradient: flax's nn.max_pool vs vggjax's max_pool2x2, interleaved.

    python benchmarks/bench_pool.py [--rounds 5] [--reps 3]

nn.max_pool's gradient is XLA's select-and-scatter; vggjax.model.vgg.max_pool2x2 (a reshape and
a max, its gradient a mask) is what the model uses. Shapes: one 64x64x64x64 pool, and VGG16's
five pools at 150x150, batch 20 (the fine-tune step's). Reports the first call (trace +
compile + one run) and the median seconds of one forward + backward, and the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vggjax.model.vgg import max_pool2x2  # noqa: E402

SHAPES = [(64, 64, 64, 64)] + [(20, s, s, c) for s, c in
                               ((150, 64), (75, 128), (37, 256), (18, 512), (9, 512))]
POOLS = {"nn.max_pool": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"),
         "max_pool2x2": max_pool2x2}


def step(pool):
    """x, g -> (pool(x), its vjp with g): one forward and backward, jitted."""
    def run(x, g):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(g)[0]
    return jax.jit(run)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench(shape, dtype, rounds: int, reps: int, log) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.normal(size=shape), 0), dtype)  # post-ReLU: zero windows tie
    g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), dtype)
    fns = {name: step(pool) for name, pool in POOLS.items()}
    first = {name: timed(fn, x, g) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(min(timed(fn, x, g) for _ in range(reps)))
    old, new = (statistics.median(times[n]) for n in POOLS)
    log(f"| {'x'.join(map(str, shape))} | {jnp.dtype(dtype).name} | {first['nn.max_pool']:.2f} | "
        f"{first['max_pool2x2']:.2f} | {old * 1e3:.1f} | {new * 1e3:.1f} | {old / new:.1f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="calls per round; the round keeps the fastest")
    p.add_argument("--dtypes", default="float32,bfloat16")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.reps < 1:
        p.error("--rounds and --reps must be >= 1")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}, jax {jax.__version__}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, {a.rounds} interleaved rounds (best of {a.reps})")
    print("| input (NHWC) | dtype | first call nn.max_pool s | first call max_pool2x2 s | "
          "nn.max_pool ms | max_pool2x2 ms | speed-up |\n|---|---|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        for shape in SHAPES:
            bench(shape, jnp.dtype(dtype), a.rounds, a.reps, lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
