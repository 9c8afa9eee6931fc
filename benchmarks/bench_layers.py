"""Per-layer, per-pass VGG16 conv speed: vggjax's conv algorithms vs TensorFlow's conv, fp32.

    python benchmarks/bench_layers.py [--size 224|150] [--batch 8] [--reps 5]
                                      [--passes fwd,bwd_data,bwd_weights] [--impls ...]

Each of VGG16's distinct 3x3 convs at `--size` (block1 at that size, halving per block), and
for each pass:
- fwd: conv + bias + ReLU;
- bwd_data: the input gradient from an output gradient (a conv with the flipped kernel);
- bwd_weights: the kernel and bias gradients from the input and the output gradient.
Impls: "onednn" (the custom call's direct conv primitives), "onednn-winograd" (its Winograd
F(4,3): transforms in C++, GEMMs on oneDNN's matmul; backward-weights is oneDNN's as for
"onednn"), "direct" (XLA's conv and its transposes),
"winograd2" / "winograd4" (F(2,3) / F(4,3) in jnp), and "tf" (tf.nn.conv2d and its
backprop ops, what Keras runs). Best of `--reps` calls after a warm-up, in ms and GFLOP/s
(2 * N * H * W * 9 * Cin * Cout per pass). Emulate another CPU kind with its ISA caps, e.g.
ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 (oneDNN's cap also holds TF's oneDNN).
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.model import conv, onednn, winograd

# (block, Cin, Cout): VGG16's distinct convs; block b runs at size / 2**(b-1).
LAYERS = [(1, 3, 64), (1, 64, 64), (2, 64, 128), (2, 128, 128), (3, 128, 256), (3, 256, 256),
          (4, 256, 512), (4, 512, 512), (5, 512, 512)]
PASSES = ("fwd", "bwd_data", "bwd_weights")
IMPLS = ("onednn", "onednn-winograd", "direct", "winograd2", "winograd4", "tf")


def best(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def jax_pass(impl: str, which: str):
    """A jitted f(x, kernel, bias, dy) computing `which` pass with `impl`."""
    if impl.startswith("winograd"):
        tile = int(impl[-1])
        fwd = lambda x, k, b: jax.nn.relu(winograd._conv(x, k, b, tile))
        data = lambda dy, k: winograd._conv(dy, jnp.flip(k, (0, 1)).swapaxes(2, 3), None, tile)
        weights = lambda x, dy: (winograd._kernel_grad(x, dy, tile), dy.sum((0, 1, 2)))
    elif impl.startswith("onednn"):
        algorithm = "winograd" if impl == "onednn-winograd" else "direct"
        fwd = lambda x, k, b: onednn.conv3x3(x, k, b, relu=True, algorithm=algorithm)
        data = lambda dy, k: onednn._bwd_data(dy, k, algorithm)
        weights = lambda x, dy: jax.ffi.ffi_call(
            "vggjax_onednn_conv_bwd_weights",
            (jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32),
             jax.ShapeDtypeStruct(dy.shape[-1:], jnp.float32)))(x, dy)
    else:
        fwd = lambda x, k, b: jax.nn.relu(conv.direct_conv3x3(x, k, b))
        data = lambda dy, k: jax.linear_transpose(
            lambda x: conv.direct_conv3x3(x, k), jax.ShapeDtypeStruct(
                dy.shape[:3] + k.shape[2:3], dy.dtype))(dy)[0]
        weights = lambda x, dy: (jax.linear_transpose(
            lambda k: conv.direct_conv3x3(x, k), jax.ShapeDtypeStruct(
                (3, 3, x.shape[-1], dy.shape[-1]), dy.dtype))(dy)[0], dy.sum((0, 1, 2)))
    run = {"fwd": lambda x, k, b, dy: fwd(x, k, b), "bwd_data": lambda x, k, b, dy: data(dy, k),
           "bwd_weights": lambda x, k, b, dy: weights(x, dy)}[which]
    return jax.jit(run)


def tf_pass(which: str, x, k, b, dy):
    import tensorflow as tf

    xt, kt, bt, dyt = map(tf.constant, (x, k, b, dy))
    f = {"fwd": lambda: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(xt, kt, 1, "SAME"), bt)),
         "bwd_data": lambda: tf.compat.v1.nn.conv2d_backprop_input(
             x.shape, kt, dyt, [1, 1, 1, 1], "SAME"),
         "bwd_weights": lambda: (tf.compat.v1.nn.conv2d_backprop_filter(
             xt, k.shape, dyt, [1, 1, 1, 1], "SAME"), tf.reduce_sum(dyt, (0, 1, 2)))}[which]
    g = tf.function(f)
    return lambda: tf.nest.map_structure(lambda t: t.numpy(), g())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--impls", default=",".join(IMPLS))
    a = p.parse_args()
    if a.size < 16 or a.batch < 1 or a.reps < 1:
        p.error(f"--size must be >= 16 (block5 runs at size/16), --batch and --reps >= 1; found "
                f"{a.size}, {a.batch}, {a.reps}")
    passes, impls = a.passes.split(","), a.impls.split(",")
    if any(i.startswith("onednn") for i in impls) and onednn.unavailable():
        p.error(f"--impls onednn: {onednn.unavailable()}")
    for name in passes:
        if name not in PASSES:
            p.error(f"--passes: {name!r} is not one of {PASSES}")
    for name in impls:
        if name not in IMPLS:
            p.error(f"--impls: {name!r} is not one of {IMPLS}")
    print(f"CPU: {onednn.describe_cpu()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
          f"; size {a.size}, batch {a.batch}, best of {a.reps}", flush=True)
    rng = np.random.default_rng(0)
    for block, cin, cout in LAYERS:
        size = a.size >> (block - 1)
        x = rng.random((a.batch, size, size, cin), np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
        b = np.zeros(cout, np.float32)
        dy = rng.standard_normal((a.batch, size, size, cout)).astype(np.float32)
        gflop = 2 * a.batch * size * size * 9 * cin * cout / 1e9
        for which in passes:
            ms = {}
            for impl in impls:
                if impl == "tf":
                    ms[impl] = best(tf_pass(which, x, k, b, dy), a.reps)
                    continue
                f, args = jax_pass(impl, which), tuple(map(jnp.asarray, (x, k, b, dy)))
                ms[impl] = best(lambda: jax.block_until_ready(f(*args)), a.reps)
            fastest = min(ms, key=ms.get)
            print(f"{size}x{size} {cin}->{cout} {which}: " + ", ".join(
                f"{name} {t:.1f} ms ({gflop / t * 1000:.0f} GF/s)" for name, t in ms.items())
                + f"; fastest {fastest}", flush=True)


if __name__ == "__main__":
    main()
