"""VGG's 2x2 max pool, forward + gradient: flax's nn.max_pool vs vggjax's max_pool2x2, interleaved.

    python benchmarks/bench_pool.py [--rounds 5] [--reps 3] [--sheet-filters 8 --sheet-rounds 2]

nn.max_pool's gradient is XLA's select-and-scatter; vggjax.model.vgg.max_pool2x2 (a reshape and
a max, its gradient a mask) is what the model uses. Shapes: one 64x64x64x64 pool, and VGG16's
five pools at 150x150, batch 20 (the fine-tune step's). Reports the first call (trace +
compile + one run) and the median seconds of one forward + backward, and the ratio.
`--sheet-filters N` also draws bench_viz.py's filter sheet (block3_conv1, 64 px, 40 steps, N
filters, conv_impl "auto") with the model's pool swapped back to nn.max_pool, with max_pool2x2,
and by the book's TF loop, interleaved (needs bench_viz.py's torch and TF).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # vggjax; bench_viz beside

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


def sheet(n: int, rounds: int) -> None:
    """The filter sheet with either pool in the model, and the book's TF loop, interleaved."""
    import tempfile

    import bench_viz
    from vggjax.model import vgg
    from vggjax.viz import convnet

    bench_viz.testing.install_torchvision_standin()
    with tempfile.TemporaryDirectory() as tmp:
        _, pt = bench_viz.same_weights(Path(tmp))
    base = pt.model.clone(include_top=False, pooling=None, conv_impl="auto")
    init = jax.random.uniform(jax.random.key(0), (n, 64, 64, 3)) * 20 + 128
    args = (base, pt.variables, init, jnp.arange(n), jnp.float32(1))
    fns, sheets = {}, {}
    for name, pool in POOLS.items():
        vgg.max_pool2x2 = pool  # the model's pool while this sheet's step is traced
        try:
            start = time.perf_counter()
            # (a fresh function per pool: jit caches a trace by its function, across jit objects)
            step = jax.jit(lambda m, v, x, i, s: convnet._ascend.__wrapped__(
                m, v, x, i, s, layer="block3_conv1", steps=40), static_argnums=0).lower(*args).compile()
            print(f"  trace + compile vggjax, {name}: {time.perf_counter() - start:.2f} s")
        finally:
            vgg.max_pool2x2 = POOLS["max_pool2x2"]
        fns[f"vggjax, {name}"] = lambda step=step: convnet.grid(convnet.deprocess_image(step(*args[1:])))
        sheets[name] = fns[f"vggjax, {name}"]()
    print(f"filter sheet, {n} filters, sheets equal: {np.array_equal(*sheets.values())}")
    fns["book loop, TF"] = bench_viz.book_loop(pt, "block3_conv1", 64, 40, n)
    times = bench_viz.interleave(fns, rounds, print)
    tf_s = statistics.median(times["book loop, TF"])
    print(f"| {n}-filter sheet (block3_conv1, 64 px, 40 steps) | seconds (median) | rounds min–max s | "
          "speed-up vs TF loop |\n|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} | {min(t):.2f}–{max(t):.2f} | {tf_s / med:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="calls per round; the round keeps the fastest")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list; empty: none")
    p.add_argument("--sheet-filters", type=int, default=0, help="also the filter sheet (0: no)")
    p.add_argument("--sheet-rounds", type=int, default=2)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.reps < 1 or a.sheet_filters < 0 or a.sheet_rounds < 1:
        p.error("--rounds, --reps and --sheet-rounds must be >= 1, --sheet-filters >= 0")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}, jax {jax.__version__}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, {a.rounds} interleaved rounds (best of {a.reps})")
    print("| input (NHWC) | dtype | first call nn.max_pool s | first call max_pool2x2 s | "
          "nn.max_pool ms | max_pool2x2 ms | speed-up |\n|---|---|---|---|---|---|---|")
    for dtype in filter(None, a.dtypes.split(",")):
        for shape in SHAPES:
            bench(shape, jnp.dtype(dtype), a.rounds, a.reps, lambda s: print(s, flush=True))
    if a.sheet_filters:
        sheet(a.sheet_filters, a.sheet_rounds)


if __name__ == "__main__":
    main()
