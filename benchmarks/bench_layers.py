"""Per-layer, per-pass VGG16 conv speed: vggjax's conv algorithms vs TensorFlow's conv, fp32.

    python -m benchmarks.bench_layers [--size 224|150] [--batch 8] [--reps 5]
                                      [--passes fwd,bwd_data,bwd_weights] [--impls ...] [--smoke] [--out F]

Each of VGG16's distinct 3x3 convs at `--size` (block1 at that size, halving per block), and
for each pass:
- fwd: conv + bias + ReLU;
- bwd_data: the input gradient from an output gradient (a conv with the flipped kernel);
- bwd_weights: the kernel and bias gradients from the input and the output gradient.
Impls: "onednn" (the custom call's direct conv primitives), "onednn-winograd" (its Winograd
F(4,3): transforms in C++, GEMMs on oneDNN's matmul; backward-weights is oneDNN's as for
"onednn"), "direct" (XLA's conv and its transposes),
"winograd2" / "winograd4" (F(2,3) / F(4,3) in jnp), and "tf" (tf.nn.conv2d and its
backprop ops, what Keras runs). The impls alternate over `--reps` rounds after a warm-up call
each; each keeps its fastest, in ms and GFLOP/s
(2 * N * H * W * 9 * Cin * Cout per pass). Emulate another CPU kind with its ISA caps, e.g.
ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 (oneDNN's cap also holds TF's oneDNN).
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from vggjax.model import conv, onednn, winograd

# (block, Cin, Cout): VGG16's distinct convs; block b runs at size / 2**(b-1).
LAYERS = [(1, 3, 64), (1, 64, 64), (2, 64, 128), (2, 128, 128), (3, 128, 256), (3, 256, 256),
          (4, 256, 512), (4, 512, 512), (5, 512, 512)]
PASSES = ("fwd", "bwd_data", "bwd_weights")
IMPLS = ("onednn", "onednn-winograd", "direct", "winograd2", "winograd4", "tf")


def conv_fn(impl: str):
    """f(x, kernel, bias, relu) by `impl`, through the public conv functions."""
    if impl.startswith("winograd"):
        tile = int(impl[-1])
        return lambda x, k, b, relu: (jax.nn.relu if relu else (lambda y: y))(
            winograd.conv3x3(x, k, b, tile=tile))
    if impl.startswith("onednn"):
        algorithm = "winograd" if impl == "onednn-winograd" else "direct"
        return lambda x, k, b, relu: onednn.conv3x3(x, k, b, relu=relu, algorithm=algorithm)
    return lambda x, k, b, relu: (jax.nn.relu if relu else (lambda y: y))(conv.direct_conv3x3(x, k, b))


def jax_pass(impl: str, which: str):
    """A jitted f(x, kernel, bias, dy) computing `which` pass with `impl`. The backward passes
    are the conv's own VJP (custom_vjp for oneDNN and the jnp Winograd) with only the wanted
    cotangent returned: XLA drops the forward conv and the other gradient, nothing uses them."""
    f = conv_fn(impl)
    run = {"fwd": lambda x, k, b, dy: f(x, k, b, True),
           "bwd_data": lambda x, k, b, dy: jax.vjp(lambda x: f(x, k, b, False), x)[1](dy)[0],
           "bwd_weights": lambda x, k, b, dy: jax.vjp(lambda k, b: f(x, k, b, False), k, b)[1](dy)}[which]
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
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds; each impl keeps its fastest")
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--impls", default=",".join(IMPLS))
    harness.arguments(p, results=None)
    a = p.parse_args()
    layers = LAYERS
    if a.smoke:  # block1's first conv and block5's at 16x16, batch 1, one round
        a.size, a.batch, a.reps, layers = 16, 1, 1, [LAYERS[0], LAYERS[-1]]
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
    log = harness.Log(f"VGG16 convs per layer and pass, size {a.size}, batch {a.batch}, best of {a.reps} "
                      "interleaved rounds")
    rows = [row for layer in layers for row in bench_layer(layer, a, passes, impls, log)]
    log()
    log.table(["layer, pass", *(f"{impl} ms (GF/s)" for impl in impls), "fastest"], rows)
    log.save(harness.out_path(a))


def bench_layer(layer, a, passes, impls, log) -> list[list[str]]:
    """One table row per pass of one VGG16 conv: each impl's best ms (and GF/s)."""
    block, cin, cout = layer
    size = a.size >> (block - 1)
    rng = np.random.default_rng(0)
    x = rng.random((a.batch, size, size, cin), np.float32)
    k = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
    b = np.zeros(cout, np.float32)
    dy = rng.standard_normal((a.batch, size, size, cout)).astype(np.float32)
    gflop = 2 * a.batch * size * size * 9 * cin * cout / 1e9
    args = tuple(map(jnp.asarray, (x, k, b, dy)))
    rows = []
    for which in passes:
        fns = {impl: tf_pass(which, x, k, b, dy) if impl == "tf"
               else (lambda f=jax_pass(impl, which): f(*args)) for impl in impls}
        times = harness.interleave({impl: harness.Timer(fn) for impl, fn in fns.items()}, a.reps,
                                   log=lambda _: None)
        ms = {impl: 1000 * min(t) for impl, t in times.items()}
        name = f"{size}x{size} {cin}->{cout} {which}"
        log(f"{name}: " + ", ".join(f"{impl} {t:.1f} ms ({gflop / t * 1000:.0f} GF/s)"
                                     for impl, t in ms.items()) + f"; fastest {min(ms, key=ms.get)}")
        log.data.setdefault("ms", {})[name] = ms
        rows.append([name, *(f"{t:.1f} ({gflop / t * 1000:.0f})" for t in ms.values()), min(ms, key=ms.get)])
    return rows


if __name__ == "__main__":
    main()
