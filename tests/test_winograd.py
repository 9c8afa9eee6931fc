"""Winograd conv3x3 against XLA's direct conv: values, gradients, and the whole VGG16 conv base."""
import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from vggjax.model import conv, onednn_build, winograd
from vggjax.weights.preprocessing import preprocess_input

# (N, H, W, Cin, Cout): VGG's odd sizes (37, 9, 75 -> partial tiles), sizes below one tile,
# non-square images and channel counts that are not multiples of anything.
SHAPES = [(2, 9, 9, 5, 7), (1, 37, 18, 8, 4), (2, 1, 3, 3, 2), (1, 6, 11, 16, 16), (1, 75, 10, 4, 6)]


def _data(n, h, w, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * np.sqrt(2 / (9 * cin)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
    return x, kernel, bias


def _rel_err(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv3x3_matches_direct_conv(shape, tile):
    x, kernel, bias = _data(*shape)
    got = jax.jit(winograd.conv3x3, static_argnames="tile")(x, kernel, bias, tile=tile)
    want = conv.direct_conv3x3(x, kernel, bias)
    assert got.shape == want.shape and got.dtype == jnp.float32
    # fp32 rounding only: F(4,3)'s transforms (coefficients up to 8) lose a few more bits.
    assert _rel_err(got, want) < (2e-6 if tile == 2 else 1e-5)


def test_conv3x3_without_bias_and_in_bfloat16():
    x, kernel, _ = _data(2, 12, 12, 8, 8)
    want = conv.direct_conv3x3(x, kernel)
    assert _rel_err(winograd.conv3x3(x, kernel), want) < 1e-5
    got = winograd.conv3x3(x.astype(jnp.bfloat16), kernel)
    # Widened to float32 inside: only the bfloat16 input and output roundings remain.
    assert got.dtype == jnp.bfloat16 and _rel_err(got.astype(jnp.float32), want) < 1e-2


@pytest.mark.parametrize("tile", winograd.TILES)
def test_gradients_match_direct_conv(tile):
    x, kernel, bias = _data(2, 11, 9, 6, 5)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 9, 5)), jnp.float32)

    def loss(conv):
        return lambda x, k, b: jnp.sum(conv(x, k, b) * probe)

    got = jax.jit(jax.grad(loss(lambda x, k, b: winograd.conv3x3(x, k, b, tile=tile)),
                           argnums=(0, 1, 2)))(x, kernel, bias)
    want = jax.grad(loss(conv.direct_conv3x3), argnums=(0, 1, 2))(x, kernel, bias)
    for name, g, w in zip(("input", "kernel", "bias"), got, want):
        assert g.shape == w.shape, name
        assert _rel_err(g, w) < 1e-5, name


def test_rejects_bad_tile_and_kernel():
    x, kernel, _ = _data(1, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd.conv3x3(x, kernel, tile=3)
    with pytest.raises(ValueError, match=r"\(3, 3, Cin, Cout\).*found input \(1, 8, 8, 4\), kernel \(3, 3, 5, 4\)"):
        winograd.conv3x3(x, jnp.zeros((3, 3, 5, 4)))
    with pytest.raises(ValueError, match="conv impl must be one of"):
        conv.conv(x, kernel, impl="fft")


def test_auto_policy_keeps_block1_direct_and_picks_tiles():
    assert winograd.choose_tile((1, 150, 150, 3), 64) is None     # block1_conv1
    assert winograd.choose_tile((1, 150, 150, 64), 64) is None    # block1_conv2
    assert winograd.choose_tile((1, 75, 75, 64), 128) == 4        # block2 on
    assert winograd.choose_tile((1, 18, 18, 256), 512) == 2
    assert winograd.choose_tile((1, 9, 9, 512), 512) == 2
    assert winograd.choose_tile((1, 75, 75, 64), 128, jnp.bfloat16) is None  # see conv3x3


def _photos(batch, size, seed=0):
    """Smooth 0..255 images (low-frequency noise), so VGG's activations look like a photo's."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (batch, size // 8 + 1, size // 8 + 1, 3))
    return np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :size, :size].astype(np.float32)


@pytest.mark.parametrize("impl", ["winograd", "auto"])
def test_vgg16_conv_base_parity(impl):
    """Whole VGG16 conv base, He-initialised like ImageNet-trained VGG's scale (features up to
    ~50 at 64x64 from caffe-preprocessed images): within 1e-5 (relative to the largest feature)
    of the direct conv. "auto" on a CPU with oneDNN runs F(4,3) in every block from 16 pixels
    up (2.5e-6 here), XLA-side Winograd F(4,3) then F(2,3) (1.0e-6)."""
    size = 64  # 64 -> 32 -> 16 -> 8 -> 4: F(4,3) in blocks 1-2, F(2,3) after
    direct = vggjax.create("vgg16", include_top=False)
    variables = direct.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    x = preprocess_input(jnp.asarray(_photos(2, size)), "caffe")
    want = jax.jit(direct.apply)(variables, x)
    fast = vggjax.create("vgg16", include_top=False, conv_impl=impl)
    got = jax.jit(fast.apply)(variables, x)
    assert float(jnp.abs(want).max()) > 10  # a realistic scale, not vanishing activations
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) <= 1e-5


def test_conv_impl_keeps_parameter_names_and_shapes():
    """Weights converted for one implementation load into the other unchanged."""
    shapes = {}
    for impl in conv.IMPLS:
        model = vggjax.create("vgg11", include_top=False, conv_impl=impl)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
        shapes[impl] = jax.tree.map(lambda a: a.shape, params)
    assert shapes["direct"] == shapes["winograd"] == shapes["auto"]
    assert shapes["direct"]["block1_conv1"] == {"kernel": (3, 3, 3, 64), "bias": (64,)}


def _cc_transform(name: str, rows_in: int) -> np.ndarray:
    """The matrix that onednn_conv.cc's hand-expanded transform `name` (bt6, at6) applies,
    evaluated from its C++ statements on each unit vector: (rows_out, rows_in)."""
    source = onednn_build.SOURCE.read_text()
    body = source[source.index(f"void {name}("):]
    body = body[body.index("for (int k"):body.index("\n}\n")]
    statements = [s.strip() for s in body.replace("const float", ";").split(";")]
    columns = []
    for unit in np.eye(rows_in):
        scope = {f"in{i}": v for i, v in enumerate(unit)} | {f"d{i}": v for i, v in enumerate(unit)}
        out = {}
        for statement in statements:
            for part in re.split(r",\s*(?=[a-z]\w* =)", statement):  # "a = ..., b = ..."
                if m := re.fullmatch(r"(out\[(\d)\]\[k\]|[a-z]\w*) = (.+)", part.strip(), re.S):
                    value = eval(re.sub(r"in\[(\d)\]\[k\]", r"in\1", m[3]), {}, scope)
                    if m[2] is None:
                        scope[m[1]] = value
                    else:
                        out[int(m[2])] = value
        columns.append([out[i] for i in range(len(out))])
    return np.array(columns).T


def test_the_cc_transforms_are_the_python_f43_matrices():
    """onednn_conv.cc expands B^T and A^T of F(4,3) by hand for speed; both must be the
    matrices of `winograd.MATRICES` (G is applied in Python: `transform_kernel`)."""
    bt, _, at = (np.array(m, np.float64) for m in winograd.MATRICES[4])
    np.testing.assert_array_equal(_cc_transform("bt6", 6), bt)
    np.testing.assert_array_equal(_cc_transform("at6", 6), at)
