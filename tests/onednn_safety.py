"""The oneDNN conv under every way JAX runs it, as a script: `python tests/onednn_safety.py CHECK`.

Run by tests/test_onednn_safety.py in a subprocess (one per check and ISA cap), so that a crash
in the native code is a failed test with its stderr, not a dead pytest worker. Checks:
  grid      every gradient (input, kernel, bias) of the fused conv+ReLU, jitted for maps 1x1 to
            16x16 and several channel counts, eager (each call twice: XLA may run it on another
            thread each time) up to 4x4, against XLA's conv
  finetune  the book's fine-tune step (block5 + head) at 32x32 px, jitted, oneDNN against XLA
  threads   Python threads running forward and backward passes at once, against a serial run
  repro     issue 29's two repros (the jitted 2x2 kernel gradient, the un-jitted VGG16 gradient)
Prints one line per check and exits 0; a wrong value raises (exit 1), a crash kills the process.
"""
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

import vggjax
from vggjax.model import conv, onednn
from vggjax.inference import heads
from vggjax.train import freezing, steps

SIDES = (1, 2, 3, 4, 5, 8, 9, 16)
CHANNELS = ((3, 8), (64, 64), (512, 512))
EAGER_SIDE = 4
TOL = 1e-4  # fp32, relative to the largest magnitude (Winograd's transforms round a little more)


def _assert_close(what, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)  # NumPy: no compiles
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    if not err <= TOL:
        raise AssertionError(f"{what}: relative error {err:.2e} > {TOL}")


def _conv_case(side, cin, cout, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return (normal(batch, side, side, cin), normal(3, 3, cin, cout) / np.sqrt(9 * cin),
            normal(cout) * 0.1, normal(batch, side, side, cout))


def _grads(conv3x3):
    def loss(x, k, b, probe):
        return jnp.sum(conv3x3(x, k, b) * probe)
    return jax.grad(loss, argnums=(0, 1, 2))


ONEDNN = _grads(lambda x, k, b: onednn.conv3x3(x, k, b, relu=True))
XLA = _grads(lambda x, k, b: jax.nn.relu(conv.direct_conv3x3(x, k, b)))


def check_grid():
    jitted = jax.jit(ONEDNN)
    for side in SIDES:
        for cin, cout in CHANNELS:
            if cin * cout > 64 * 64 and side not in (1, 2, 4):
                continue  # VGG's widest layers at large maps add time, not coverage
            args = _conv_case(side, cin, cout)
            want = jax.jit(XLA)(*args)
            # Eager dispatch compiles every op per shape: run it where oneDNN's kernels change
            # (the gemm-based ones at the smallest maps), and twice, as XLA may pick another thread.
            modes = (("jit", jitted, 1),) + ((("eager", ONEDNN, 2),) if side <= EAGER_SIDE else ())
            for mode, grads, calls in modes:
                for _ in range(calls):
                    got = grads(*args)
                for name, g, w in zip(("input", "kernel", "bias"), got, want):
                    _assert_close(f"{mode} {name} gradient {side}x{side} {cin}->{cout}", g, w)
    print(f"grid: {len(SIDES)} map sizes x {len(CHANNELS)} channel pairs, jitted (and eager up to "
          f"{EAGER_SIDE}x{EAGER_SIDE}): ok")


def _finetune_losses(conv_impl, n_steps=3, size=32):
    base = vggjax.create("vgg16", include_top=False, conv_impl=conv_impl)
    base_vars = vggjax.model.vgg.init_random(base, seed=1)
    model, variables = heads.init_classifier(base_vars, base, heads.Head(), size,
                                                  jax.random.key(2))
    tx = freezing.make_optimizer(freezing.book_rmsprop(1e-5), variables["params"], "block5+head")
    state = steps.TrainState.create(variables, tx)
    step = steps.make_train_step(model, tx, preprocess_mode="caffe")
    rng = np.random.default_rng(3)
    losses = []
    for _ in range(n_steps):
        batch = {"image": jnp.asarray(rng.uniform(0, 255, (8, size, size, 3)), jnp.float32),
                 "label": jnp.asarray(rng.integers(0, 2, 8), jnp.int32), "mask": jnp.ones(8, bool)}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state.params["base"]["block5_conv3"]["kernel"]


def check_finetune():
    losses, kernel = _finetune_losses("onednn")
    want_losses, want_kernel = _finetune_losses("direct")
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    _assert_close("block5_conv3 kernel after 3 fine-tune steps", kernel, want_kernel)
    print(f"finetune: 3 steps at 32 px, losses {np.round(losses, 5).tolist()}: ok")


def check_threads(n_threads=4, rounds=4):
    cases = [_conv_case(side, 64, 64, seed=side) for side in (1, 2, 4, 9, 16)]
    jitted = jax.jit(ONEDNN)
    want = [jitted(*c) for c in cases]
    errors = []

    def work(i):
        try:
            for r in range(rounds):
                for c, w in zip(cases, want):
                    got = (jitted if (i + r) % 2 else ONEDNN)(*c)
                    for g, wi in zip(got, w):
                        _assert_close(f"thread {i} round {r}", g, wi)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(f"threads: {n_threads} threads x {rounds} rounds of forward and backward, jit and eager: ok")


def check_repro(times=3):
    k = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) * 0.05
    b = jnp.zeros((64,))
    x = jax.random.normal(jax.random.key(3), (20, 2, 2, 64))
    g = jax.jit(jax.grad(lambda k, b: jnp.sum(onednn.conv3x3(x, k, b, relu=True) ** 2), argnums=(0, 1)))
    first = [float(jnp.abs(g(k, b)[0]).max()) for _ in range(times)]
    m = vggjax.create("vgg16", include_top=False, conv_impl="onednn")
    v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    grad = jax.grad(lambda x: jnp.sum(m.apply(v, x)))
    second = [float(jnp.abs(grad(jax.random.normal(jax.random.key(3), (2, 32, 32, 3)))).max())
              for _ in range(times)]
    if len(set(first)) != 1 or len(set(second)) != 1:
        raise AssertionError(f"repeated calls differ: {first}, {second}")
    print(f"repro: both repros {times} times: ok")


CHECKS = {"grid": check_grid, "finetune": check_finetune, "threads": check_threads,
          "repro": check_repro}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: onednn_safety.py {{{','.join(CHECKS)}}} [times]")
    if reason := onednn.unavailable():
        sys.exit(f"the oneDNN conv is unavailable: {reason}")
    if sys.argv[1] == "repro" and len(sys.argv) > 2:
        check_repro(int(sys.argv[2]))
    else:
        CHECKS[sys.argv[1]]()
