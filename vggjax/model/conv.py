"""VGG's one convolution, 3x3 stride 1 SAME, and the choice of algorithm that computes it:
XLA's own ("direct"), Winograd F(m, 3) in jnp (`vggjax.model.winograd`), oneDNN through XLA
custom calls (`vggjax.model.onednn`: its direct conv or Winograd F(4,3) on its matmul), or
"auto", which picks by device, dtype and CPU (`choose_impl`).
`Conv3x3` is the Linen layer; NNX's layer computes the same `conv3x3`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vggjax.model import onednn, winograd

IMPLS = ("direct", "winograd", "onednn", "auto")

# He-normal over fan-out, as torchvision initialises VGG convs (used only for random weights).
CONV_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(x, kernel, bias=None, impl: str = "direct", relu: bool = False):
    """3x3 stride-1 SAME conv by `impl`: "direct" (XLA's conv), "winograd" (in jnp, every layer:
    F(4,3) from 32 pixels up, else F(2,3)), "onednn" (`vggjax.model.onednn`: oneDNN through XLA
    custom calls, float32/bfloat16; fp32 layers wide and large enough run as Winograd F(4,3) on
    oneDNN's matmul, `onednn.winograd_suits`) or "auto" (`choose_impl`). Same contract as `winograd.conv3x3`; `relu`
    applies max(y, 0) after the bias (fused into oneDNN's kernel, saving a memory pass)."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, found {impl!r}")
    if impl == "auto":
        impl = choose_impl(x.shape, kernel.shape[-1], x.dtype)
    if impl == "onednn":
        return onednn.conv3x3(x, kernel, bias, relu=relu)
    if impl == "direct":
        y = direct_conv3x3(x, kernel, bias)
    else:
        y = winograd.conv3x3(x, kernel, bias, tile=winograd.tile_for(x.shape))
    return jax.nn.relu(y) if relu else y


def choose_impl(shape, cout: int, dtype) -> str:
    """The "auto" policy for an NHWC input `shape`, Cout and compute dtype: "onednn" on a CPU
    where oneDNN beats XLA for the dtype (`onednn.suits`: fp32 from AVX2 up, bf16 on AVX512-BF16
    or AMX); otherwise "winograd" where `choose_tile` expects it to win, else "direct". Without
    the oneDNN custom call (not installed, no compiler) it falls back, saying why once. With more
    than one device it keeps XLA's convs, which a mesh can partition (a custom call cannot)."""
    if jax.default_backend() == "cpu" and jax.device_count() == 1 and onednn.suits(dtype):
        reason = onednn.unavailable()
        if reason is None:
            return "onednn"
        onednn.warn_fallback(reason)
    return "direct" if winograd.choose_tile(shape, cout, dtype) is None else "winograd"


def direct_conv3x3(x, kernel, bias=None):
    """The reference: XLA's own 3x3 stride-1 SAME conv, NHWC/HWIO, same contract as winograd.conv3x3."""
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias.astype(y.dtype)


def conv3x3(x, kernel, bias, impl: str, relu: bool, dtype):
    """The conv both faces (Linen, NNX) compute: promote to `dtype`, then `conv`."""
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    return conv(x, kernel, bias, impl, relu=relu)


class Conv3x3(nn.Module):
    """3x3 stride-1 SAME conv with nn.Conv's parameters ("kernel" HWIO, "bias"), so weights
    load alike whichever algorithm `impl` ("direct", "winograd", "onednn", "auto") computes it
    with; `relu` adds the ReLU (fused into the conv by "onednn")."""

    features: int
    impl: str = "direct"
    relu: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = CONV_KERNEL_INIT

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return conv3x3(x, kernel, bias, self.impl, self.relu, self.dtype)
