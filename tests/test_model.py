"""The VGG module: architecture, Keras names, summary table, intermediate outputs, input checks."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from vggjax.model.pooling import adaptive_pool_matrix, max_pool2x2
from vggjax.model.vgg import ARCHS, arch_name, find_arch, init_random
from vggjax.model.summary import summary_rows


def test_vgg16_notop_summary_matches_keras_rows():
    rows = {name: (shape, n) for name, _, shape, n in
            summary_rows(vggjax.VGG16(include_top=False), (150, 150, 3))}
    expected = {
        "block1_conv1": ((150, 150, 64), 1792), "block1_conv2": ((150, 150, 64), 36928),
        "block1_pool": ((75, 75, 64), 0),
        "block2_conv1": ((75, 75, 128), 73856), "block2_conv2": ((75, 75, 128), 147584),
        "block2_pool": ((37, 37, 128), 0),
        "block3_conv1": ((37, 37, 256), 295168), "block3_conv2": ((37, 37, 256), 590080),
        "block3_conv3": ((37, 37, 256), 590080), "block3_pool": ((18, 18, 256), 0),
        "block4_conv1": ((18, 18, 512), 1180160), "block4_conv2": ((18, 18, 512), 2359808),
        "block4_conv3": ((18, 18, 512), 2359808), "block4_pool": ((9, 9, 512), 0),
        "block5_conv1": ((9, 9, 512), 2359808), "block5_conv2": ((9, 9, 512), 2359808),
        "block5_conv3": ((9, 9, 512), 2359808), "block5_pool": ((4, 4, 512), 0),
    }
    assert rows == expected
    text = vggjax.summary(vggjax.VGG16(include_top=False), (150, 150, 3), print_fn=None)
    assert "Total params: 14,714,688" in text
    assert "block5_pool (MaxPooling2D)" in text and "(None, 4, 4, 512)" in text


@pytest.mark.parametrize("arch,total", [("vgg11", 132_863_336), ("vgg13", 133_047_848),
                                        ("vgg16", 138_357_544), ("vgg19", 143_667_240),
                                        ("vgg16_bn", 138_365_992)])
def test_parameter_counts_match_published_models(arch, total):
    model = vggjax.create(arch)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    # torchvision counts BN running stats as buffers, not parameters: compare params alone.
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == total


def test_keras_layer_names_are_the_parameter_names():
    model = vggjax.VGG19(include_top=True)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
    assert list(params) == vggjax.model.vgg.conv_names((2, 2, 4, 4, 4)) + ["fc1", "fc2", "predictions"]
    assert params["block3_conv4"]["kernel"].shape == (3, 3, 256, 256)
    assert params["fc1"]["kernel"].shape == (25088, 4096)


@pytest.fixture(scope="module")
def tiny():
    model = vggjax.VGG11(include_top=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    return model, model.init(jax.random.PRNGKey(0), x), x


def test_intermediate_outputs_in_one_pass(tiny):
    model, variables, x = tiny
    out = model.apply(variables, x, outputs=("block3_conv2", "block5_pool"))
    assert set(out) == {"block3_conv2", "block5_pool"}
    assert out["block3_conv2"].shape == (2, 8, 8, 256)
    np.testing.assert_array_equal(out["block5_pool"], model.apply(variables, x))
    # A prefix model computes the same tap: the early exit does not change what is computed.
    early = model.apply(variables, x, outputs=("block3_conv2",))["block3_conv2"]
    np.testing.assert_array_equal(early, out["block3_conv2"])


def test_preactivation_taps_are_the_conv_outputs_before_relu(tiny):
    model, variables, x = tiny
    out = model.apply(variables, x, outputs=("block2_conv1_preact", "block2_conv1"))
    pre = out["block2_conv1_preact"]
    assert pre.shape == (2, 16, 16, 128) and float(pre.min()) < 0  # really before the ReLU
    np.testing.assert_array_equal(np.maximum(pre, 0), out["block2_conv1"])
    # The default forward pass and the parameter names do not change.
    assert "block2_conv1_preact" not in variables["params"]
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x, outputs=None))


def test_unknown_output_name_is_refused(tiny):
    model, variables, x = tiny
    with pytest.raises(ValueError, match="block9_conv1"):
        model.apply(variables, x, outputs=("block9_conv1",))


def test_global_pooling(tiny):
    model, variables, x = tiny
    fmap = model.apply(variables, x)
    avg = model.clone(pooling="avg").apply(variables, x)
    mx = model.clone(pooling="max").apply(variables, x)
    np.testing.assert_allclose(avg, fmap.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(mx, fmap.max(axis=(1, 2)))


@pytest.mark.parametrize("shape,message", [
    ((1, 31, 64, 3), "at least 32x32, found 31x64"),
    ((1, 64, 64, 1), "3 channels"),
    ((64, 64, 3), "4 dims"),
])
def test_bad_inputs_name_expected_and_found(tiny, shape, message):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.apply(variables, jnp.zeros(shape))


def test_keras_head_needs_224():
    with pytest.raises(ValueError, match="expects 224x224 inputs, found 150x150"):
        vggjax.VGG16().init(jax.random.PRNGKey(0), jnp.zeros((1, 150, 150, 3)))


def test_torch_head_runs_at_any_size():
    model = vggjax.VGG11(top_input="torch", num_classes=10, classifier_activation=None)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    out = jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 96, 3)))
    assert out.shape == (1, 10)


def test_softmax_head_outputs_probabilities():
    model = vggjax.VGG11(top_input="torch", num_classes=7)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    probs = model.apply(variables, x)
    logits = model.clone(classifier_activation=None).apply(variables, x)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("n_in", [1, 5, 7, 8, 14, 23])
def test_adaptive_pool_bins_follow_torch(n_in):
    m = adaptive_pool_matrix(n_in, 7)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
    for i in range(7):  # torch: start=floor(i*n/7), end=ceil((i+1)*n/7)
        start, end = int(np.floor(i * n_in / 7)), int(np.ceil((i + 1) * n_in / 7))
        assert np.flatnonzero(m[i]).tolist() == list(range(start, end))


def test_bf16_compute_keeps_fp32_params(tiny):
    model, variables, x = tiny
    out = model.clone(dtype=jnp.bfloat16).apply(variables, x)
    assert out.dtype == jnp.bfloat16
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    ref = model.apply(variables, x)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-3


def test_find_arch_names_each_vgg_by_its_block_sizes_or_conv_count():
    for name, cfg in ARCHS.items():
        sizes, bn = cfg["block_sizes"], cfg.get("batch_norm", False)
        assert find_arch(sizes, bn) == find_arch(sum(sizes), bn) == arch_name(vggjax.create(name)) == name
    # VGG16's 13 convs in another order are no VGG; nor is a count no VGG has.
    assert find_arch((3, 3, 3, 2, 2)) is None and find_arch(14) is None
    with pytest.raises(ValueError, match=r"block sizes \(3, 3, 3, 2, 2\) are not a known VGG"):
        arch_name(vggjax.VGG(block_sizes=(3, 3, 3, 2, 2)))


def test_init_random_is_the_model_s_own_seeded_init_at_any_input_size():
    # A one-conv-a-block VGG with BatchNorm: the smallest to initialise, batch_stats included.
    model = vggjax.VGG(block_sizes=(1, 1, 1, 1, 1), batch_norm=True, include_top=False)
    got = init_random(model, seed=5)
    # The input size does not change the values: the model's init at 64x64 gives the same.
    want = jax.jit(model.init)(jax.random.PRNGKey(5), jnp.zeros((1, 64, 64, 3)))
    assert set(got) == {"params", "batch_stats"}
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got, want))
    other = init_random(model, seed=6)["params"]["block1_conv1"]["kernel"]
    assert not (other == got["params"]["block1_conv1"]["kernel"]).all()


def test_unknown_arch():
    with pytest.raises(ValueError, match="vgg17"):
        vggjax.create("vgg17")


@pytest.mark.parametrize("shape,dtype,ties", [
    ((2, 8, 8, 3), jnp.float32, False), ((2, 7, 9, 3), jnp.float32, True),
    ((1, 11, 6, 5), jnp.bfloat16, True), ((1, 6, 5, 4), jnp.bfloat16, False)])
def test_max_pool2x2_equals_nn_max_pool_in_values_and_gradients(shape, dtype, ties):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if ties:  # integers, and whole windows of zeros as after a ReLU: most windows tie
        x = np.maximum(np.round(x), 0)
    x = jnp.asarray(x, dtype)
    ref = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    g = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape), dtype)

    @jax.jit
    def both(x, g):  # one compile, not one per eager op
        (y_ref, vjp_ref), (y, vjp) = jax.vjp(ref, x), jax.vjp(max_pool2x2, x)
        return y_ref, vjp_ref(g)[0], y, vjp(g)[0]

    y_ref, dx_ref, y, dx = both(x, g)
    assert y.dtype == dx.dtype == dtype and y.shape == y_ref.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))
    if ties:  # each window's gradient lands on one element, whole (not shared among ties)
        assert int((dx != 0).sum()) == int((g != 0).sum())
