"""A small model's forward and backward through the oneDNN conv, eager and jitted, fp32 and
(where this CPU's oneDNN runs it) bf16: the workload tests/test_memcheck.py runs under
AddressSanitizer and valgrind. 2x2 maps (block5 at 32 px) included: issue 29's scratchpad bug
lived there. `--eager-only`: no jitted pass (valgrind cannot translate XLA's JIT code)."""
import sys

import jax
import jax.numpy as jnp

import vggjax
from vggjax.model import onednn

if __name__ == "__main__":
    if reason := onednn.unavailable():
        raise SystemExit(f"the oneDNN conv is unavailable: {reason}")
    for dtype in (jnp.float32, jnp.bfloat16):
        if not onednn.supports(dtype):
            print(f"{jnp.dtype(dtype).name}: not run here (oneDNN cannot on this CPU)")
            continue
        model = vggjax.create("vgg11", include_top=False, conv_impl="onednn", dtype=dtype)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
        grad = jax.grad(lambda v, x: jnp.sum(model.apply(v, x).astype(jnp.float32)))
        modes = (("eager", grad),) + (() if "--eager-only" in sys.argv else (("jit", jax.jit(grad)),))
        for name, fn in modes:
            for _ in range(2):  # a second call may run on another XLA thread
                jax.block_until_ready(fn(variables, x))
            print(f"{jnp.dtype(dtype).name} {name}: forward and backward done")
