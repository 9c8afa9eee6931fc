"""VGG's 3x3 convolution through oneDNN: an XLA FFI custom call, built on first use.

oneDNN's JIT kernels use the CPU's bf16 dot units (AVX512-BF16, AMX) that XLA's own CPU conv
leaves idle, and run fp32 faster than XLA's direct conv. In fp32, layers wide and large enough
(`winograd_suits`) run as Winograd F(4,3): 4x fewer multiplies, transforms in C++, the GEMMs on
oneDNN's matmul (timings: benchmarks/results_library.md). The C++
side (`onednn_conv.cc`) is compiled with g++ the first time it is needed, into a cache directory
keyed by the source, the oneDNN headers' version and jaxlib's version, so installing vggjax
stays pure Python. oneDNN itself comes from PyPI: `pip install "vggjax[onednn]"`
(onednn-cpu-gomp + onednn-devel-cpu-gomp: the OpenMP CPU build; the plain `onednn` package
is the SYCL/TBB build, which needs Intel's compiler runtime).

`unavailable()` says why the fast path cannot run here (None when it can); `conv_impl="auto"`
then keeps XLA's conv, saying why once.

Limitation: XLA cannot partition a custom call, so under a multi-device mesh (`jax.sharding`
data parallelism) each device runs the conv on the gathered global batch: correct, not faster,
and the result loses the batch sharding. "auto" therefore picks it only with a single device.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from vggjax.model import winograd
from vggjax.utils import atomic, locks
from vggjax.utils.cache import cache_dir

SOURCE = Path(__file__).with_name("onednn_conv.cc")
DTYPES = (jnp.float32, jnp.bfloat16)
_TARGETS = {"vggjax_onednn_conv_fwd": "VggjaxConvFwd",
            "vggjax_onednn_conv_bwd_data": "VggjaxConvBwdData",
            "vggjax_onednn_conv_bwd_weights": "VggjaxConvBwdWeights",
            "vggjax_onednn_winograd_fwd": "VggjaxWinogradFwd"}
ALGORITHMS = ("auto", "direct", "winograd")


def _onednn_prefix() -> Path | None:
    """The install prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so (the
    environment's own, where pip puts onednn-devel-cpu-gomp, or the system's)."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, "/usr", "/usr/local")):
        p = Path(prefix)
        if (p / "include/oneapi/dnnl/dnnl.hpp").is_file() and _libdnnl(p) is not None:
            return p
    return None


def _libdnnl(prefix: Path) -> Path | None:
    """oneDNN's shared library under an install prefix (lib/ or lib64/), None if absent."""
    return next(prefix.glob("lib*/libdnnl.so*"), None)


def _build() -> Path:
    """Compile onednn_conv.cc (once per source/oneDNN/jaxlib version); the shared library's path."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the oneDNN conv is built for Linux x86-64, not {platform.system()} "
                           f"{platform.machine()}")
    prefix = _onednn_prefix()
    if prefix is None:
        raise RuntimeError('oneDNN headers/library not found: pip install "vggjax[onednn]"')
    version = (prefix / "include/oneapi/dnnl/dnnl_version.h").read_bytes()
    key = hashlib.sha256(SOURCE.read_bytes() + version + jax.__version__.encode()).hexdigest()[:16]
    out = cache_dir() / "onednn" / f"onednn_conv-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together (pytest workers, data-parallel hosts) build once: the others
    # wait for the lock, then find the library. Built beside its final name and renamed
    # (vggjax.utils.atomic): an interrupted build never leaves a half-written library behind.
    with locks.locked(out.parent, "the oneDNN build cache", wait=True):
        if not out.is_file():
            _compile(prefix, out)
    return out


def _compile(prefix: Path, out: Path) -> None:
    """g++ onednn_conv.cc against the oneDNN under `prefix` into the shared library `out`."""
    libdir = _libdnnl(prefix).parent
    with atomic.writing(out) as tmp:
        cmd = [os.environ.get("CXX", "g++"), "-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", f"-I{prefix / 'include'}", str(SOURCE),
               f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}", "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"building the oneDNN conv failed ({cmd[0]}): "
                               f"{proc.stderr.strip().splitlines()[-1:]}")


@functools.cache
def _load() -> str | None:
    """Build, load and register the custom calls; None on success, else the reason."""
    if os.environ.get("VGGJAX_ONEDNN", "1") == "0":
        return "disabled by VGGJAX_ONEDNN=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, RuntimeError) as e:
        return str(e)
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def unavailable() -> str | None:
    """Why the oneDNN conv cannot run in this process (None: it can). Builds it on first call."""
    return _load()


@functools.cache
def warn_fallback(reason: str) -> None:
    """Say once per reason why conv_impl="auto" keeps XLA's conv."""
    warnings.warn(f"vggjax: oneDNN conv unavailable ({reason}); using XLA's conv", stacklevel=3)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


# oneDNN's dnnl_cpu_isa_t (dnnl_types.h): each ISA's bits include those of the ISAs below it.
_ISAS = {0x1: "sse41", 0x7: "avx2", 0xF: "avx2_vnni", 0x1F: "avx2_vnni_2", 0x27: "avx512_core",
         0x67: "avx512_core_vnni", 0xE7: "avx512_core_bf16", 0x1EF: "avx512_core_fp16",
         0xFEF: "avx512_core_amx", 0x1FEF: "avx512_core_amx_fp16"}
_ISA_BITS = {name: bits for bits, name in _ISAS.items()}


@functools.cache
def effective_isa() -> str | None:
    """The ISA oneDNN's kernels use in this process, e.g. "avx2", "avx512_core_amx": the CPU's,
    lowered by $ONEDNN_MAX_CPU_ISA (read once, at oneDNN's first use). None without oneDNN."""
    prefix = _onednn_prefix()
    if prefix is None:
        return None
    try:
        lib = ctypes.CDLL(str(_libdnnl(prefix)))
    except OSError:
        return None
    bits = lib.dnnl_get_effective_cpu_isa()
    return _ISAS.get(bits, f"isa 0x{bits:x}")


def _has(isa: str) -> bool:
    """True where oneDNN's effective ISA includes `isa` (a key of _ISA_BITS)."""
    bits = _ISA_BITS.get(effective_isa() or "", 0)
    return bits & _ISA_BITS[isa] == _ISA_BITS[isa]


def describe_cpu() -> str:
    """One line naming what decides the fast paths: the CPU's flags and oneDNN's effective ISA."""
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) or ["none of avx2/avx512f"]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{' '.join(flags)}; oneDNN ISA {effective_isa() or 'n/a (oneDNN not installed)'}"
            + (f" (capped by ONEDNN_MAX_CPU_ISA={cap})" if cap else ""))


def supports(dtype) -> bool:
    """True where oneDNN can run the conv in `dtype` here: float32 on any x86-64 ISA it knows;
    bfloat16 from AVX512_CORE up (emulated there, native with AVX512-BF16 or AMX; oneDNN has
    no bf16 convolution on AVX2)."""
    if dtype == jnp.bfloat16:
        return _has("avx512_core")
    return dtype == jnp.float32 and effective_isa() is not None


def suits(dtype) -> bool:
    """True where oneDNN's kernels beat XLA's CPU conv for `dtype` (benchmarks/results_library.md):
    float32 from AVX2 up (Winograd F(4,3) on oneDNN's matmul, `winograd_suits`, or oneDNN's
    direct conv), bfloat16 with bf16 dot units (AVX512-BF16 or AMX). Read from oneDNN's
    *effective* ISA, so $ONEDNN_MAX_CPU_ISA lowers it too. Below AVX2, and for bf16 on
    AVX2-only CPUs (oneDNN has no bf16 conv there), XLA's conv stays."""
    if dtype == jnp.bfloat16:
        return _has("avx512_core_bf16")
    return dtype == jnp.float32 and _has("avx2")


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
            and not _has("avx512_core_amx"))


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
                         f"({describe_cpu()}); use conv_impl='auto' or 'direct', or float32")
    if bias is None:
        bias = jnp.zeros(kernel.shape[-1:], x.dtype)
    return _conv(x, kernel.astype(x.dtype), bias.astype(x.dtype), relu, algorithm)
