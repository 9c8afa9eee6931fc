"""VGG's 3x3 convolution through oneDNN: an XLA FFI custom call, built on first use.

oneDNN's JIT kernels use the CPU's bf16 dot units (AVX512-BF16, AMX) that XLA's own CPU conv
leaves idle, and run fp32 faster than XLA's direct conv. In fp32, layers wide and large enough
(`winograd_suits`) run as Winograd F(4,3): 4x fewer multiplies, transforms in C++, the GEMMs on
oneDNN's matmul (timings: benchmarks/results_library.md). The C++ side (`onednn_conv.cc`) is
built on first use (`vggjax.model.onednn_build`).

`unavailable()` says why the fast path cannot run here (None when it can); where and when
"auto" picks this path is `vggjax.model.conv.choose_impl`'s policy.

Limitation: XLA cannot partition a custom call, so under a multi-device mesh (`jax.sharding`
data parallelism) each device runs the conv on the gathered global batch: correct, not faster,
and the result loses the batch sharding.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from vggjax.model import cpu, onednn_build, winograd
from vggjax.utils.deprecation import moved_names

DTYPES = (jnp.float32, jnp.bfloat16)
ALGORITHMS = ("auto", "direct", "winograd")


def unavailable() -> str | None:
    """Why the oneDNN conv cannot run in this process (None: it can). Builds it on first call."""
    return onednn_build.load()


@functools.cache
def warn_fallback(reason: str) -> None:
    """Say once per reason why conv_impl="auto" keeps XLA's conv."""
    warnings.warn(f"vggjax: oneDNN conv unavailable ({reason}); using XLA's conv", stacklevel=3)


def supports(dtype) -> bool:
    """True where oneDNN can run the conv in `dtype` here: float32 on any x86-64 ISA it knows;
    bfloat16 from AVX512_CORE up (emulated there, native with AVX512-BF16 or AMX; oneDNN has
    no bf16 convolution on AVX2)."""
    if dtype == jnp.bfloat16:
        return cpu.has_isa("avx512_core")
    return dtype == jnp.float32 and cpu.effective_isa() is not None


def suits(dtype) -> bool:
    """True where oneDNN's kernels beat XLA's CPU conv for `dtype` (benchmarks/results_library.md):
    float32 from AVX2 up (Winograd F(4,3) on oneDNN's matmul, `winograd_suits`, or oneDNN's
    direct conv), bfloat16 with bf16 dot units (AVX512-BF16 or AMX). Read from oneDNN's
    *effective* ISA, so $ONEDNN_MAX_CPU_ISA lowers it too. Below AVX2, and for bf16 on
    AVX2-only CPUs (oneDNN has no bf16 conv there), XLA's conv stays."""
    if dtype == jnp.bfloat16:
        return cpu.has_isa("avx512_core_bf16")
    return dtype == jnp.float32 and cpu.has_isa("avx2")


def _rows_fold_under_vmap(call):
    """`call(rows, *rest)` -> array, where each row of `rows` (axis 0) gives its own row of the
    output. Under vmap with only `rows` batched (the same kernel for every element, as in the
    filter sheet: one image per filter), the vmapped axis joins the rows: one oneDNN call over
    the whole batch, not one small call per element. Anything else batched: one call per element."""
    @jax.custom_batching.custom_vmap
    def folded(rows, *rest):
        return call(rows, *rest)

    @folded.def_vmap
    def rule(axis_size, in_batched, rows, *rest):
        if in_batched[0] and not any(in_batched[1:]):
            out = folded(rows.reshape(axis_size * rows.shape[1], *rows.shape[2:]), *rest)
            return out.reshape(axis_size, rows.shape[1], *out.shape[1:]), True
        args = (rows, *rest)

        def one(batched):
            it = iter(batched)
            return folded(*[next(it) if b else a for a, b in zip(args, in_batched)])
        return jax.lax.map(one, [a for a, b in zip(args, in_batched) if b]), True

    return folded


def _fwd_ffi(relu: bool):
    def call(x, kernel, bias):
        out = jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[3:], x.dtype)
        return jax.ffi.ffi_call("vggjax_onednn_conv_fwd", out)(x, kernel, bias, relu=relu)
    return _rows_fold_under_vmap(call)


def _winograd_ffi(relu: bool):
    def call(x, u, bias):
        out = jax.ShapeDtypeStruct(x.shape[:3] + u.shape[2:], x.dtype)
        return jax.ffi.ffi_call("vggjax_onednn_winograd_fwd", out)(x, u, bias, relu=relu)
    return _rows_fold_under_vmap(call)


_FWD = {relu: _fwd_ffi(relu) for relu in (False, True)}
_WINOGRAD = {relu: _winograd_ffi(relu) for relu in (False, True)}


@_rows_fold_under_vmap
def _bwd_data_ffi(dy, kernel):
    out = jax.ShapeDtypeStruct(dy.shape[:3] + kernel.shape[2:3], dy.dtype)
    return jax.ffi.ffi_call("vggjax_onednn_conv_bwd_data", out)(dy, kernel)


def winograd_suits(shape, cout: int, dtype) -> bool:
    """The "auto" algorithm of the oneDNN conv for an NHWC input `shape` and Cout: Winograd
    F(4,3) (`VggjaxWinogradFwd`) for float32 from Cin*Cout = 64*64 (block1_conv2 on) and maps
    of at least WINOGRAD_MIN_SIDE pixels, else oneDNN's direct conv (benchmarks/results_library.md: with
    3 input channels the transforms cost more than they save; 9x9 and 14x14 maps pad to whole
    4x4 tiles and lose; bf16 Winograd is ~10% off)."""
    return (dtype == jnp.float32 and shape[-1] * cout >= 64 * 64
            and min(shape[1:3]) >= WINOGRAD_MIN_SIDE)


WINOGRAD_MIN_SIDE = 16


def _use_winograd(algorithm: str, shape, cout: int, dtype) -> bool:
    return algorithm == "winograd" or (algorithm == "auto" and winograd_suits(shape, cout, dtype))


def _fwd_call(x, kernel, bias, relu: bool, algorithm: str = "auto"):
    bias = bias.astype(jnp.float32)
    if _use_winograd(algorithm, x.shape, kernel.shape[-1], x.dtype):
        return _WINOGRAD[bool(relu)](x, winograd.transform_kernel(kernel, 4), bias)
    return _FWD[bool(relu)](x, kernel, bias)


def _bwd_data(dy, kernel, algorithm: str):
    """The input gradient of the SAME 3x3 conv: oneDNN's backward-data, or (Winograd) the
    forward conv of dy with the kernel rotated 180 degrees and in/out swapped."""
    if _use_winograd(algorithm, dy.shape, kernel.shape[2], dy.dtype):
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
        return _fwd_call(dy, flipped, jnp.zeros(kernel.shape[2:3], jnp.float32), False, "winograd")
    return _bwd_data_ffi(dy, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv(x, kernel, bias, relu, algorithm="auto"):
    return _fwd_call(x, kernel, bias, relu, algorithm)


def _conv_fwd(x, kernel, bias, relu, algorithm="auto"):
    y = _fwd_call(x, kernel, bias, relu, algorithm)
    return y, (x, kernel, y if relu else None)


def _conv_bwd(relu, algorithm, res, dy):
    x, kernel, y = res
    if relu:
        dy = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    dx = _bwd_data(dy, kernel, algorithm)
    f32 = jnp.float32
    if _kernel_grad_by_matmul(x):
        dk, db = _kernel_grad_matmul(x, dy)
    else:
        dk, db = jax.ffi.ffi_call(
            "vggjax_onednn_conv_bwd_weights",
            (jax.ShapeDtypeStruct(kernel.shape, f32), jax.ShapeDtypeStruct(kernel.shape[3:], f32)),
            vmap_method="sequential")(x, dy)
    return dx, dk.astype(kernel.dtype), db.astype(kernel.dtype)


# Without AMX (AVX512-BF16 only) oneDNN 3.2's bf16 backward-weights kernel (jit_bf16, no
# brgemm) is slow on small maps (block5 at 150x150: 9x9), slower even than its fp32 one; there
# the nine shifted copies of x are small and one XLA bf16 matmul over them wins. From 18x18 up
# oneDNN wins (benchmarks/results_library.md).
SMALL_MAP = 10 * 10


def _kernel_grad_by_matmul(x) -> bool:
    """Whether the kernel gradient of the conv of `x` takes `_kernel_grad_matmul`: bf16 maps up
    to SMALL_MAP pixels on CPUs without AMX. With AMX, oneDNN's bf16 backward-weights (brgemm on
    the tile unit) beats the matmul there too (benchmarks/results_library.md)."""
    return (x.dtype == jnp.bfloat16 and x.shape[1] * x.shape[2] <= SMALL_MAP
            and not cpu.has_isa("avx512_core_amx"))


def _kernel_grad_matmul(x, dy):
    """(dk (3, 3, Cin, Cout) f32, db (Cout,) f32) of a SAME 3x3 conv as one matmul:
    dk[i, j] = sum over n, h, w of x_padded[n, h + i, w + j] (x) dy[n, h, w]."""
    _, h, w, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], 3)
    dk = jnp.einsum("nhwkc,nhwd->kcd", patches, dy, preferred_element_type=jnp.float32)
    return dk.reshape(3, 3, cin, -1), jnp.sum(dy, (0, 1, 2), dtype=jnp.float32)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x, kernel, bias=None, relu: bool = False, algorithm: str = "auto"):
    """3x3 stride-1 SAME conv (+ bias, + ReLU if `relu`) by oneDNN, same contract as
    `conv.direct_conv3x3`: x (N, H, W, Cin) float32 or bfloat16, kernel (3, 3, Cin, Cout)
    HWIO, bias (Cout,) or None; returns (N, H, W, Cout) in x's dtype (bf16 in, f32 accumulate).
    `algorithm`: "direct" (oneDNN's conv), "winograd" (F(4,3) on oneDNN's matmul; float32
    only) or "auto" (`winograd_suits`, for the forward and the input gradient each).
    Jits, differentiates (input gradient by the same algorithm, kernel gradient by oneDNN's
    backward-weights), vmaps (over the images alone: one call for the whole batch; over the
    kernel too: one call per element). Raises RuntimeError when the custom call cannot be
    built here, ValueError for a dtype this CPU's oneDNN cannot run (bf16 below AVX512_CORE:
    `supports`) or an unknown algorithm."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"oneDNN conv algorithm must be one of {ALGORITHMS}, found {algorithm!r}")
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the oneDNN conv is unavailable: {reason}")
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv3x3 expects NHWC input and a (3, 3, Cin, Cout) HWIO kernel with "
                         f"matching Cin, found input {tuple(x.shape)}, kernel {tuple(kernel.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"the oneDNN conv computes in float32 or bfloat16, found {x.dtype}")
    if algorithm == "winograd" and x.dtype != jnp.float32:
        raise ValueError(f"the oneDNN Winograd conv computes in float32 (F(4,3) in {x.dtype} "
                         f"is ~10% off), found {x.dtype}; use algorithm='auto' or 'direct'")
    if not supports(x.dtype):
        raise ValueError(f"the oneDNN {x.dtype} conv needs AVX512_CORE, which this CPU lacks "
                         f"({cpu.describe_cpu()}); use conv_impl='auto' or 'direct', or float32")
    if bias is None:
        bias = jnp.zeros(kernel.shape[-1:], x.dtype)
    return _conv(x, kernel.astype(x.dtype), bias.astype(x.dtype), relu, algorithm)


# Moved in 0.1: CPU detection to vggjax.model.cpu (kept one release).
__getattr__ = moved_names(__name__, {n: "vggjax.model.cpu" for n in ("cpu_flags", "effective_isa",
                                                                     "describe_cpu")})
