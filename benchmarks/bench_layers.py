"""Per-layer VGG16 conv speed at 224x224: vggjax's conv algorithms vs TensorFlow's conv, fp32.

    python benchmarks/bench_layers.py [--batch 8] [--reps 5]

Each of VGG16's distinct 3x3 convs (bias and ReLU included), jitted vggjax `conv.conv` with
impl "onednn", "direct" (XLA) and "winograd", and a tf.function conv2d + bias_add + relu;
best of `--reps` calls after a warm-up, with GFLOP/s (2 * N * H * W * 9 * Cin * Cout).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.model import conv

SHAPES = [(224, 3, 64), (224, 64, 64), (112, 64, 128), (112, 128, 128), (56, 128, 256),
          (56, 256, 256), (28, 256, 512), (28, 512, 512), (14, 512, 512)]


def best(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for size, cin, cout in SHAPES:
        x = rng.random((a.batch, size, size, cin), np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
        b = np.zeros(cout, np.float32)
        xj, kj, bj = map(jnp.asarray, (x, k, b))
        ms = {}
        for impl in ("onednn", "direct", "winograd"):
            f = jax.jit(lambda x, k, b, impl=impl: conv.conv(x, k, b, impl, relu=True))
            ms[impl] = best(lambda: f(xj, kj, bj).block_until_ready(), a.reps)
        xt, kt, bt = map(tf.constant, (x, k, b))
        g = tf.function(lambda x: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kt, 1, "SAME"), bt)))
        ms["tf"] = best(lambda: g(xt).numpy(), a.reps)
        gflop = 2 * a.batch * size * size * 9 * cin * cout / 1e9
        print(f"{size}x{size} {cin}->{cout}: " + ", ".join(
            f"{name} {t:.1f} ms ({gflop / t * 1000:.0f} GFLOP/s)" for name, t in ms.items()), flush=True)


if __name__ == "__main__":
    main()
