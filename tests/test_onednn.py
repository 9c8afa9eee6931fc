"""The oneDNN conv custom call against XLA's direct conv: values, gradients, the whole VGG16,
bf16, jit/vmap, the "auto" policy, and the fallback when the native part cannot be built."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from helpers import script_env
from vggjax.model import conv, cpu, onednn
from vggjax.weights.preprocessing import preprocess_input
from test_winograd import _data, _photos  # the same random convs and smooth photos

pytestmark = pytest.mark.skipif(onednn.unavailable() is not None,
                                reason=f"oneDNN conv unavailable: {onednn.unavailable()}")
# oneDNN has no bf16 conv below AVX512_CORE: there each bf16 check becomes a check of the refusal.
BF16 = onednn.supports(jnp.bfloat16)
REFUSAL = r"the oneDNN bfloat16 conv needs AVX512_CORE, which this CPU lacks \(.*oneDNN ISA avx2"


def _rel_err(a, b):
    return float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("shape", [(2, 9, 9, 5, 7), (1, 37, 18, 16, 32), (2, 1, 3, 3, 2)])
def test_conv_matches_direct_conv(shape):
    x, kernel, bias = _data(*shape)
    want = conv.direct_conv3x3(x, kernel, bias)
    got = jax.jit(onednn.conv3x3)(x, kernel, bias)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _rel_err(got, want) < 2e-6
    fused = onednn.conv3x3(x, kernel, bias, relu=True)
    assert _rel_err(fused, jax.nn.relu(want)) < 2e-6
    if not BF16:
        with pytest.raises(ValueError, match=REFUSAL):
            onednn.conv3x3(x.astype(jnp.bfloat16), kernel, bias)
        return
    bf16 = onednn.conv3x3(x.astype(jnp.bfloat16), kernel, bias)
    # bf16 inputs and output, f32 accumulation: a few bf16 roundings (2^-8 each).
    assert bf16.dtype == jnp.bfloat16 and _rel_err(bf16, want) < 2e-2


# Without AMX, 11x9 maps take the bf16 kernel gradient's matmul path (onednn.SMALL_MAP), 12x13
# oneDNN's; with AMX both take oneDNN's (the matmul path is checked on its own below).
@pytest.mark.parametrize("shape", [(2, 11, 9, 6, 5), (1, 12, 13, 6, 5)])
@pytest.mark.parametrize("relu", [False, True])
def test_gradients_match_direct_conv(relu, shape):
    x, kernel, bias = _data(*shape)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=shape[:3] + shape[4:]), jnp.float32)
    act = jax.nn.relu if relu else (lambda y: y)

    def loss(conv):
        return lambda x, k, b: jnp.sum(conv(x, k, b).astype(jnp.float32) * probe)

    want = jax.grad(loss(lambda x, k, b: act(conv.direct_conv3x3(x, k, b))), (0, 1, 2))(x, kernel, bias)
    got = jax.jit(jax.grad(loss(lambda x, k, b: onednn.conv3x3(x, k, b, relu=relu)), (0, 1, 2)))(
        x, kernel, bias)
    for name, g, w in zip(("input", "kernel", "bias"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        assert _rel_err(g, w) < 1e-5, name
    if relu or not BF16:  # bf16 outputs within a rounding of 0 may fall on the other side of the ReLU
        return
    # bf16 compute with fp32 parameters (what precision="bf16" does): gradients in the
    # parameters' dtype, within bf16 rounding of the fp32 ones.
    got16 = jax.grad(loss(lambda x, k, b: onednn.conv3x3(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                         b, relu=relu)), (0, 1, 2))(x, kernel, bias)
    for name, g, w in zip(("input", "kernel", "bias"), got16, want):
        assert g.dtype == jnp.float32, name
        assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 1e-2, name


def test_bf16_kernel_gradient_by_matmul_on_small_maps_without_amx(monkeypatch):
    x, _, _ = _data(2, 9, 9, 6, 5)
    dy = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 5)), jnp.float32)
    want = jax.grad(lambda k: jnp.sum(conv.direct_conv3x3(x, k) * dy))(jnp.zeros((3, 3, 6, 5)))
    dk, db = onednn._kernel_grad_matmul(x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
    assert dk.dtype == jnp.float32 and _rel_err(dk, want) < 2e-2
    np.testing.assert_allclose(db, dy.astype(jnp.bfloat16).astype(jnp.float32).sum((0, 1, 2)), rtol=1e-5)
    small, large = jnp.zeros((1, 10, 10, 4), jnp.bfloat16), jnp.zeros((1, 11, 10, 4), jnp.bfloat16)
    for isa, small_by_matmul in (("avx512_core_bf16", True), ("avx512_core_amx", False)):
        monkeypatch.setattr(cpu, "effective_isa", lambda: isa)
        assert onednn._kernel_grad_by_matmul(small) == small_by_matmul, isa
        assert not onednn._kernel_grad_by_matmul(large) and not onednn._kernel_grad_by_matmul(
            small.astype(jnp.float32)), isa


def test_vmap_and_rejects_bad_input():
    x, kernel, bias = _data(3, 8, 8, 4, 6)
    want = conv.direct_conv3x3(x, kernel, bias)
    got = jax.vmap(onednn.conv3x3, (0, None, None))(x[:, None], kernel, bias)[:, 0]
    assert _rel_err(got, want) < 2e-6
    # Only the images vmapped (the filter sheet): the vmapped axis joins the batch, one oneDNN
    # call forward and one backward-data for all elements, no loop; the same values and gradients.
    def loss(x):
        return jnp.sum(onednn.conv3x3(x[None], kernel, bias, relu=True) ** 2)
    per_image = jax.jit(jax.vmap(jax.grad(loss)))
    hlo = per_image.lower(x).compile().as_text()
    assert hlo.count('custom_call_target="vggjax_onednn_conv_fwd"') == 1 and " while(" not in hlo
    assert hlo.count('custom_call_target="vggjax_onednn_conv_bwd_data"') == 1
    direct = jax.vmap(jax.grad(lambda x: jnp.sum(jax.nn.relu(conv.direct_conv3x3(x[None], kernel, bias)) ** 2)))
    assert _rel_err(per_image(x), direct(x)) < 2e-6
    # vmapped over the kernel too: one call per element.
    kernels = jnp.stack([kernel, 2 * kernel])
    got2 = jax.jit(jax.vmap(onednn.conv3x3, (None, 0, None)))(x, kernels, None)
    assert _rel_err(got2[1], 2 * conv.direct_conv3x3(x, kernel)) < 2e-6
    with pytest.raises(ValueError, match="float32 or bfloat16, found float16"):
        onednn.conv3x3(x.astype(jnp.float16), kernel)
    with pytest.raises(ValueError, match=r"found input \(3, 8, 8, 4\), kernel \(3, 3, 5, 6\)"):
        onednn.conv3x3(x, jnp.zeros((3, 3, 5, 6)))


# Odd sizes (tiles cropped at the border), channels off the 16-wide vector blocks, 1x1 maps,
# and (5, 37, 37, 256, 256): 500 tiles, more than one chunk of the 24 MB scratch.
@pytest.mark.parametrize("shape", [(2, 9, 13, 5, 7), (1, 1, 1, 17, 33), (3, 6, 5, 40, 24),
                                   (5, 37, 37, 256, 256)])
def test_winograd_matches_direct_conv_with_gradients(shape):
    x, kernel, bias = _data(*shape)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=shape[:3] + shape[4:]), jnp.float32)

    def grads(conv):
        return jax.jit(jax.value_and_grad(lambda x, k, b: jnp.sum(conv(x, k, b) * probe), (0, 1, 2)))

    want = grads(lambda x, k, b: jax.nn.relu(conv.direct_conv3x3(x, k, b)))(x, kernel, bias)
    winograd = lambda x, k, b: onednn.conv3x3(x, k, b, relu=True, algorithm="winograd")
    got = grads(winograd)(x, kernel, bias)
    hlo = grads(winograd).lower(x, kernel, bias).as_text()
    # Forward and input gradient are both Winograd; the kernel gradient is oneDNN's.
    assert hlo.count("vggjax_onednn_winograd_fwd") == 2 and "vggjax_onednn_conv_fwd" not in hlo
    assert "vggjax_onednn_conv_bwd_data" not in hlo and "vggjax_onednn_conv_bwd_weights" in hlo
    # F(4,3) about doubles fp32 rounding: well within the 1e-4 every fast path keeps.
    assert _rel_err(jax.jit(winograd)(x, kernel, bias), jax.nn.relu(conv.direct_conv3x3(x, kernel, bias))) < 2e-5
    for name, g, w in zip(("loss", "input", "kernel", "bias"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == jnp.float32, name
        assert _rel_err(g, w) < 2e-5, name


def test_auto_algorithm_picks_winograd_by_shape_and_dtype():
    lowered = lambda x, k, **kw: jax.jit(lambda x, k: onednn.conv3x3(x, k, **kw)).lower(x, k).as_text()
    wide, thin = jnp.zeros((1, 16, 16, 64)), jnp.zeros((1, 16, 16, 3))
    assert "winograd" in lowered(wide, jnp.zeros((3, 3, 64, 64)))
    assert "winograd" not in lowered(thin, jnp.zeros((3, 3, 3, 64)))        # block1_conv1: too thin
    assert "winograd" not in lowered(wide[:, :15], jnp.zeros((3, 3, 64, 64)))  # below 16 pixels
    assert "winograd" not in lowered(wide, jnp.zeros((3, 3, 64, 64)), algorithm="direct")
    assert onednn.winograd_suits((1, 16, 16, 64), 64, jnp.float32)
    assert not onednn.winograd_suits((1, 16, 16, 64), 64, jnp.bfloat16)
    # vmapped over images alone: one Winograd call for the whole batch, as for the direct conv.
    x, kernel, bias = _data(3, 16, 16, 64, 64)
    per_image = jax.jit(jax.vmap(lambda x: onednn.conv3x3(x[None], kernel, bias)[0]))
    assert per_image.lower(x).compile().as_text().count(
        'custom_call_target="vggjax_onednn_winograd_fwd"') == 1
    assert _rel_err(per_image(x), conv.direct_conv3x3(x, kernel, bias)) < 2e-5
    with pytest.raises(ValueError, match="algorithm must be one of .*found 'fft'"):
        onednn.conv3x3(x, kernel, algorithm="fft")
    with pytest.raises(ValueError, match="Winograd conv computes in float32.*found bfloat16"):
        onednn.conv3x3(x.astype(jnp.bfloat16), kernel, algorithm="winograd")
    # The custom call itself checks every shape it is given, the output's too.
    call = lambda out, b: jax.ffi.ffi_call("vggjax_onednn_winograd_fwd", out)(
        x, jnp.zeros((36, 64, 64)), b, relu=False)
    for out, b in ((jax.ShapeDtypeStruct((3, 16, 16, 32), jnp.float32), jnp.zeros(64)),
                   (jax.ShapeDtypeStruct((3, 16, 16, 64), jnp.float32), jnp.zeros(())),):
        with pytest.raises(Exception, match=r"expects x \(N,H,W,Cin\), u \(36,Cin,Cout\)"):
            jax.block_until_ready(call(out, b))


def test_vgg16_features_and_logits_parity(make_variables):
    """Whole VGG16 with the torch head (any size), seeded random weights at ImageNet scale:
    oneDNN fp32 within 1e-4 (relative) of the direct conv for the conv features and the logits;
    bf16 within 2e-2 of them, top-1 unchanged."""
    size = 48
    variables = make_variables("vgg16", include_top=True, input_rms=70.0, logit_scale=8.0)
    x = preprocess_input(jnp.asarray(_photos(4, size)), "caffe")
    taps = ("block5_pool", "predictions")

    def run(**kw):
        model = vggjax.create("vgg16", top_input="torch", classifier_activation=None, **kw)
        return jax.jit(lambda v, x: model.apply(v, x, outputs=taps))(variables, x)

    want = run()
    fp32 = run(conv_impl="onednn")
    for tap in taps:
        assert _rel_err(fp32[tap], want[tap]) <= 1e-4, tap
    if not BF16:
        with pytest.raises(ValueError, match=REFUSAL):
            run(conv_impl="onednn", dtype=jnp.bfloat16)
        return
    bf16 = run(conv_impl="onednn", dtype=jnp.bfloat16)
    direct16 = run(dtype=jnp.bfloat16)
    for tap in taps:
        assert bf16[tap].dtype == jnp.bfloat16
        assert _rel_err(bf16[tap], want[tap]) <= 2e-2, tap
        # No worse than XLA's own bf16 conv (the same bf16 roundings, fewer or more).
        assert _rel_err(bf16[tap], want[tap]) <= 2 * _rel_err(direct16[tap], want[tap]) + 1e-3, tap
    top1 = lambda logits: np.asarray(jnp.argmax(logits.astype(jnp.float32), -1))
    np.testing.assert_array_equal(top1(bf16["predictions"]), top1(want["predictions"]))


def test_auto_picks_onednn_where_it_suits_the_cpu(monkeypatch):
    x, kernel, bias = _data(1, 16, 16, 64, 128)
    isa = cpu.effective_isa()
    native_bf16 = isa in ("avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16")
    for dtype, fast in ((jnp.bfloat16, native_bf16), (jnp.float32, isa.startswith("avx"))):
        jaxpr = str(jax.make_jaxpr(lambda x, k: conv.conv(x, k, impl="auto"))(x.astype(dtype), kernel))
        assert ("vggjax_onednn_" in jaxpr) == fast, (dtype, isa)  # direct conv or Winograd
        assert onednn.suits(dtype) == fast
    assert not onednn.suits(jnp.float16) and not onednn.supports(jnp.float16)
    # What each kind of CPU gets, read from oneDNN's effective ISA (not /proc/cpuinfo: a VM or
    # $ONEDNN_MAX_CPU_ISA may offer less than the flags say).
    kinds = {"sse41": ("direct", "winograd", False), "avx2": ("direct", "onednn", False),
             "avx512_core": ("direct", "onednn", True),
             "avx512_core_bf16": ("onednn", "onednn", True), "avx512_core_amx": ("onednn", "onednn", True)}
    for kind, (bf16_impl, fp32_impl, bf16_runs) in kinds.items():
        monkeypatch.setattr(cpu, "effective_isa", lambda: kind)
        assert conv.choose_impl(x.shape, 128, jnp.bfloat16) == bf16_impl, kind
        assert conv.choose_impl(x.shape, 128, jnp.float32) == fp32_impl, kind
        assert onednn.supports(jnp.bfloat16) == bf16_runs and onednn.supports(jnp.float32), kind
    # An AVX2-only CPU: XLA's bf16 conv (oneDNN has none there), oneDNN's fp32 one.
    monkeypatch.setattr(cpu, "effective_isa", lambda: "avx2")
    with pytest.raises(ValueError, match="bfloat16 conv needs AVX512_CORE.*oneDNN ISA avx2"):
        onednn.conv3x3(x.astype(jnp.bfloat16), kernel)


def test_an_isa_capped_process_reads_the_cap_and_names_refusals(subprocess_env):
    """ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU, emulated): oneDNN reports avx2, "auto" keeps
    XLA's conv for bf16, fp32 oneDNN still runs, bf16 is refused in one line, and a primitive
    oneDNN itself refuses (the custom call reached directly) names the shape, dtype and ISA."""
    code = """
import jax.numpy as jnp
from vggjax.model import conv, cpu, onednn
assert cpu.effective_isa() == "avx2", cpu.effective_isa()
assert "capped by ONEDNN_MAX_CPU_ISA=AVX2" in cpu.describe_cpu()
x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
assert conv.choose_impl((1, 32, 32, 64), 64, jnp.bfloat16) == "direct"
assert float(onednn.conv3x3(x, k)[0, 4, 4, 0]) == 36.0
try:
    onednn.conv3x3(x.astype(jnp.bfloat16), k)
except ValueError as e:
    print("REFUSED", e)
try:
    onednn._conv(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), jnp.zeros(8, jnp.bfloat16), False)
except Exception as e:
    print("ONEDNN", str(e).splitlines()[0])
"""
    env = dict(subprocess_env, ONEDNN_MAX_CPU_ISA="AVX2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED the oneDNN bfloat16 conv needs AVX512_CORE, which this CPU lacks" in proc.stdout
    assert ("oneDNN refused the forward conv of NHWC (1, 8, 8, 4) -> 8 channels in bfloat16 on "
            "oneDNN ISA 0x7") in proc.stdout, proc.stdout


@pytest.mark.parametrize("cap", ["AVX2", "SSE41"])
def test_winograd_transforms_for_each_isa_match_direct_conv(cap, subprocess_env):
    """The Winograd transforms run the variant compiled for oneDNN's effective ISA (AVX-512,
    AVX2 or baseline x86-64): capped to AVX2 and to SSE4.1, the values are still the direct conv's."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from vggjax.model import conv, cpu, onednn
assert cpu.effective_isa() == "%s".lower(), cpu.effective_isa()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(2, 13, 10, 40)), jnp.float32)
k = jnp.asarray(rng.normal(size=(3, 3, 40, 24)) * 0.1, jnp.float32)
b = jnp.asarray(rng.normal(size=24), jnp.float32)
got = onednn.conv3x3(x, k, b, relu=True, algorithm="winograd")
want = jax.nn.relu(conv.direct_conv3x3(x, k, b))
print("ERR", float(jnp.abs(got - want).max() / jnp.abs(want).max()))
""" % cap
    env = dict(subprocess_env, ONEDNN_MAX_CPU_ISA=cap, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split("ERR")[1]) < 2e-5, proc.stdout


def test_fallback_when_the_native_part_cannot_be_built(tmp_path):
    """No compiler (CXX=false) and an empty cache: import works, "auto" keeps XLA's conv and says
    why once, "onednn" asked for explicitly is a clear error."""
    code = """
import warnings, jax.numpy as jnp, vggjax
from vggjax.model import conv, onednn
x, k = jnp.ones((1, 8, 8, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 8), jnp.bfloat16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = conv.conv(x, k, impl="auto"); conv.conv(x, k, impl="auto")
assert float(y[0, 4, 4, 0]) == 36.0, y[0, 4, 4, 0]
msgs = [str(w.message) for w in caught if "oneDNN" in str(w.message)]
assert len(msgs) == (1 if onednn.suits(jnp.bfloat16) else 0), msgs
print("REASON", onednn.unavailable())
try:
    onednn.conv3x3(x, k)
except RuntimeError as e:
    print("ERROR", e)
"""
    env = script_env(tmp_path, onednn_built=False, CXX="false", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REASON building the oneDNN conv failed (false)" in proc.stdout
    assert "ERROR the oneDNN conv is unavailable: building the oneDNN conv failed" in proc.stdout


def test_runs_under_a_data_parallel_mesh(subprocess_env):
    """Batch sharded over 2 CPU devices: forward and gradients equal the one-device ones. (XLA
    cannot partition a custom call: each device runs it on the gathered batch; see onednn.py.)"""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vggjax.model import onednn
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32)
k = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) * 0.1, jnp.float32)
loss = lambda x, k: jnp.sum(jnp.sin(onednn.conv3x3(x, k, relu=True)))
step = jax.jit(jax.value_and_grad(loss, (0, 1)))
want = step(x, k)
got = step(jax.device_put(x, NamedSharding(mesh, P("data"))), k)
assert len(got[1][0].sharding.device_set) == 2
# With two devices "auto" keeps the partitionable XLA convs.
from vggjax.model import conv
assert conv.choose_impl((4, 16, 16, 64), 128, jnp.float32) == "winograd"
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("OK")
"""
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_processes_starting_together_build_once_and_both_load_it(tmp_path):
    """Two processes (pytest workers, data-parallel hosts) with one empty cache: the second waits
    for the first's build instead of refusing its half-recorded library."""
    builds = tmp_path / "builds.log"
    cxx = tmp_path / "slow-g++"
    cxx.write_text(f'#!/bin/sh\necho build >> {builds}\nsleep 2\nexec g++ "$@"\n')
    cxx.chmod(0o755)
    env = script_env(tmp_path, onednn_built=False, CXX=str(cxx), JAX_PLATFORMS="cpu")
    code = "from vggjax.model import onednn; print('REASON', onednn.unavailable())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "REASON None" in out, out + err[-2000:]
    assert builds.read_text().splitlines() == ["build"]
