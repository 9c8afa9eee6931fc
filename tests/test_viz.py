"""vggjax.viz.convnet against the book's own TF/Keras code (DLwP 1st ed. 5.4), on the same random weights."""
import warnings

import numpy as np
import pytest

import vggjax
from vggjax.utils import images
from vggjax.viz import convnet
from helpers import CAFFE_INPUT_RMS, write_jpegs

TOL = 1e-4  # Grad-CAM maps (in [0, 1] after the division by the max)


@pytest.fixture(scope="module")
def book_vgg16(keras, vgg16_with_top, tmp_path_factory):
    """Keras VGG16 with top reading the legacy h5, the same file converted, and two JPEGs
    loaded by Keras (224x224, nearest) and by vggjax."""
    tmp = tmp_path_factory.mktemp("book")
    h5, converted = vgg16_with_top
    model = keras.applications.VGG16(weights=None)
    model.load_weights(h5)
    paths = write_jpegs(tmp, [(300, 260), (180, 240)], seed=1)
    keras_pixels = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(224, 224)))
                             for p in paths])
    pixels = np.stack([images.load_image(p, (224, 224)) for p in paths])
    np.testing.assert_array_equal(pixels, keras_pixels)  # load_img-exact reading and resizing
    return model, vggjax.load(converted), keras_pixels


def keras_grad_cam(keras, model, pixels, paper: bool):
    """The book's Grad-CAM in TF2 (GradientTape instead of K.gradients), image by image: the
    top class's score, gradient w.r.t. block5_conv3's output, mean over (batch, h, w), weighted
    maps averaged over channels (the paper: summed, on the pre-softmax score), ReLU, / max."""
    import tensorflow as tf

    grad_model = keras.Model(model.inputs, [model.get_layer("block5_conv3").output, model.output])
    model.get_layer("predictions").activation = (keras.activations.linear if paper
                                                 else keras.activations.softmax)
    maps = []
    for img in keras.applications.vgg16.preprocess_input(pixels.copy()):
        with tf.GradientTape() as tape:
            conv, preds = grad_model(img[None], training=False)
            score = preds[:, int(np.argmax(preds[0]))]
        grads = tape.gradient(score, conv)
        pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
        weighted = (conv[0] * pooled).numpy()
        heat = np.maximum(weighted.sum(-1) if paper else weighted.mean(-1), 0)
        maps.append(heat / np.max(heat))
    model.get_layer("predictions").activation = keras.activations.softmax
    return np.stack(maps)


def assert_close(what, ours, theirs, tol):
    err = float(np.max(np.abs(np.asarray(ours) - theirs)))
    print(f"\nparity {what}: max abs error {err:.2e}")
    assert err <= tol, f"{what}: max abs error {err} > {tol}"


def test_grad_cam_book_and_paper_match_tf(keras, book_vgg16):
    model, pt, pixels = book_vgg16
    x = pt.preprocess(pixels)
    book = convnet.grad_cam(pt.model, pt.variables, x, book=True)
    paper = convnet.grad_cam(pt.model, pt.variables, x)  # pre-softmax score, sum over channels
    assert book.shape == paper.shape == (2, 14, 14) and book.dtype == np.float32
    want_book = keras_grad_cam(keras, model, pixels, paper=False)
    want_paper = keras_grad_cam(keras, model, pixels, paper=True)
    assert_close("grad-cam book (softmax, mean)", book, want_book, TOL)
    assert_close("grad-cam paper (logits, sum)", paper, want_paper, TOL)
    # The test can fail: maps with structure, and the two scores give different maps.
    for m in (want_book, want_paper):
        assert np.all(np.max(m, axis=(1, 2)) == 1) and np.min(np.std(m, axis=(1, 2))) > 0.05
    assert np.max(np.abs(want_book - want_paper)) > 100 * TOL
    # The same maps in a batch and one by one; an explicit target equal to the top class.
    top = np.asarray(pt.model.apply(pt.variables, x)).argmax(-1)
    np.testing.assert_allclose(convnet.grad_cam(pt.model, pt.variables, x[1:], target=top[1:]),
                               paper[1:], atol=1e-5)


@pytest.mark.slow  # the book's TF gradient-ascent loop (~40 s); the sheet's own tests are default
def test_filter_patterns_match_the_books_tf_loop(keras, make_variables):
    """40 free-running steps agree in float64 on both sides. In float32 they cannot: the
    ascent is piecewise linear, and every few steps a max-pool or ReLU near-tie resolves
    differently in oneDNN and XLA, after which the paths part (each step alone agrees to ~1e-5)."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf

    params = make_variables("vgg16", include_top=False, seed=3, input_rms=CAFFE_INPUT_RMS)["params"]
    # Both: floatx for the Input, the dtype policy for the layers (once any Keras model was
    # built, the global policy no longer follows floatx).
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        conv_base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)
    assert conv_base.get_layer("block3_conv1").kernel.dtype == "float64"
    for layer in conv_base.layers:
        if layer.weights:
            layer.set_weights([params[layer.name]["kernel"], params[layer.name]["bias"]])
    layer, filters = "block3_conv1", [0, 200]
    init = np.random.default_rng(0).random((2, 64, 64, 3)) * 20 + 128
    with jax.enable_x64(True):
        model = vggjax.VGG16(include_top=False, dtype=jnp.float64, param_dtype=jnp.float64)
        ours = convnet.filter_pattern(model, {"params": jax.tree.map(np.float64, params)}, layer,
                                  filters, size=64, init=init, deprocess=False)
    assert ours.dtype == np.float64
    features = keras.Model(conv_base.inputs, conv_base.get_layer(layer).output)
    for k, f in enumerate(filters):
        x = tf.constant(init[k:k + 1])
        for _ in range(40):  # the book's loop, GradientTape for K.gradients
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_mean(features(x)[:, :, :, f])
            g = tape.gradient(loss, x)
            x = x + g / (tf.sqrt(tf.reduce_mean(tf.square(g))) + 1e-5) * 1.0
        theirs = x.numpy()[0]
        rel = float(np.max(np.abs(ours[k] - theirs)) / np.max(np.abs(theirs)))
        print(f"\nparity filter pattern {layer}[{f}] (float64): max abs error / max |x| = {rel:.1e}")
        assert rel <= 1e-3
        assert np.max(np.abs(theirs - init[k])) > 10  # 40 steps really moved the image
        np.testing.assert_array_equal(convnet.deprocess_image(ours[k]), convnet.deprocess_image(theirs))


def test_filter_pattern_default_is_the_book_start_and_many_filters_equal_one_by_one(make_variables):
    variables = make_variables("vgg11", include_top=False, seed=2, input_rms=CAFFE_INPUT_RMS)
    model = vggjax.VGG11(include_top=False)
    many = convnet.filter_pattern(model, variables, "block2_conv1", [3, 5], size=32, steps=3, seed=1)
    start = np.random.default_rng(1).random((2, 32, 32, 3), np.float32) * 20 + 128
    one = convnet.filter_pattern(model, variables, "block2_conv1", 5, size=32, steps=3, init=start[1])
    assert many.shape == (2, 32, 32, 3) and many.dtype == np.uint8 and one.shape == (32, 32, 3)
    np.testing.assert_array_equal(many[1], one)
    assert not np.array_equal(many[0], many[1])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(filter_index=64), r"\[0, 64\)"),
    (dict(filter_index=[1, -1]), r"\[0, 64\)"),
    (dict(size=16), "size must be an integer >= 32"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(step=0.0), "step must be a positive"),
    (dict(init=np.zeros((2, 40, 40, 3))), r"init must have shape \(40, 40, 3\)"),
    (dict(layer="block9_conv1"), "unknown layer"),
])
def test_filter_pattern_refuses_bad_arguments(make_variables, kwargs, pattern):
    args = dict(layer="block1_conv1", filter_index=0, size=40, steps=1) | kwargs
    with pytest.raises(ValueError, match=pattern):
        convnet.filter_pattern(vggjax.VGG11(include_top=False),
                           make_variables("vgg11", include_top=False), **args)


@pytest.fixture(scope="module")
def small():
    """VGG11 with torchvision's head (any size), Flax-initialised, and 2 images at 32x32."""
    import jax

    model = vggjax.VGG11(top_input="torch", classifier_activation=None)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    return model, model.init(jax.random.key(1), x), x


@pytest.mark.parametrize("method", convnet.METHODS)
def test_every_method_gives_maps_in_0_1_at_the_layer_resolution(small, method):
    model, variables, x = small
    cams = np.asarray(convnet.grad_cam(model, variables, x, layer="block4_conv1", method=method))
    assert cams.shape == (2, 4, 4) and cams.dtype == np.float32
    assert np.all(np.isfinite(cams)) and cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1)


def test_a_map_with_no_positive_evidence_is_zeros_and_warns(small):
    model, variables, x = small
    dead = {"params": dict(variables["params"], block5_conv2={
        "kernel": variables["params"]["block5_conv2"]["kernel"],
        "bias": np.full(512, -1e6, np.float32)})}  # every activation of block5_conv2 is 0
    with pytest.warns(RuntimeWarning, match=r"image\(s\) \[0, 1\] are all zero"):
        cams = convnet.grad_cam(model, dead, x, layer="block5_conv2")
    assert np.array_equal(np.asarray(cams), np.zeros((2, 2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convnet.grad_cam(model, variables, x, layer="block5_conv2")  # a live map: no warning


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(method="gradcam+"), "method must be one of"),
    (dict(score="probability"), "score must be one of"),
    (dict(book=True, score="logits"), "book=True is Grad-CAM of the softmax score"),
    (dict(book=True, method="hirescam"), "book=True"),
    (dict(layer="block5_pool"), "not a conv layer"),
    (dict(layer="block5_conv3"), "not a conv layer of this"),
    (dict(target=1000), r"target must lie in \[0, 1000\)"),
    (dict(target=[0.5, 1.0]), "class indices"),
])
def test_grad_cam_refuses_bad_arguments(small, kwargs, pattern):
    model, variables, x = small
    with pytest.raises(ValueError, match=pattern):
        convnet.grad_cam(model, variables, x, **({"layer": "block5_conv2"} | kwargs))


def test_grad_cam_refuses_nan_and_warns_on_raw_pixels(small):
    model, variables, x = small
    nan = np.array(x)
    nan[1, 5, 6, 2] = np.nan
    with pytest.raises(ValueError, match=r"^grad_cam holds NaN or Inf$"):
        convnet.grad_cam(model, variables, nan, layer="block5_conv2")
    raw = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"grad_cam got uint8 images: it expects preprocessed floats"):
        convnet.grad_cam(model, variables, raw, layer="block5_conv2")


def test_grad_cam_needs_a_classifier(small):
    _, variables, x = small
    with pytest.raises(ValueError, match="include_top=False"):
        convnet.grad_cam(vggjax.VGG11(include_top=False), variables, x, layer="block5_conv2")


def test_jet_is_matplotlibs():
    import matplotlib

    np.testing.assert_allclose(convnet.jet(), matplotlib.colormaps["jet"](np.arange(256))[:, :3],
                               atol=1e-12)


def test_overlay_is_image_plus_alpha_times_jet_rescaled():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (40, 60, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 199
    out = convnet.overlay(image, np.zeros((4, 6), np.float32), alpha=0.4)  # jet(0) = (0, 0, 0.5)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    want = image + 0.4 * convnet.jet()[0] * 255
    want = ((want - want.min()) * 255 / (want.max() - want.min())).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    cam = np.zeros((4, 6), np.float32)
    cam[:2, :3] = 1.0  # evidence in the top-left quarter: red there, blue elsewhere
    hot = convnet.overlay(np.zeros((40, 60, 3), np.uint8), cam, alpha=1.0).astype(int)
    assert hot[2, 2, 0] > 100 and hot[2, 2, 2] == 0 and hot[37, 57, 0] == 0 and hot[37, 57, 2] > 100
    with pytest.raises(ValueError, match="alpha"):
        convnet.overlay(image, cam, alpha=2)
    with pytest.raises(ValueError, match=r"one \(h, w\) map"):
        convnet.overlay(image, cam[None])


def test_grid_puts_filter_i_plus_8j_at_row_i_column_j():
    tiles = np.arange(64, dtype=np.uint8)[:, None, None, None] * np.ones((64, 3, 4, 3), np.uint8)
    sheet = convnet.grid(tiles)
    assert sheet.shape == (8 * 3 + 7 * 5, 8 * 4 + 7 * 5, 3)
    for i, j in ((0, 0), (2, 5), (7, 7)):
        assert np.all(sheet[i * 8:i * 8 + 3, j * 9:j * 9 + 4] == i + 8 * j)
    assert np.all(sheet[3:8] == 0) and np.all(sheet[:, 4:9] == 0)  # black 5-px margins


def test_activation_grid_standardises_each_channel_like_the_book():
    rng = np.random.default_rng(0)
    fmap = rng.gamma(2.0, size=(1, 6, 5, 20)).astype(np.float32)
    fmap[..., 3] = 0.0  # a dead channel: black, not NaN
    sheet = convnet.activation_grid(fmap, cols=16)
    assert sheet.shape == (2 * 6, 16 * 5) and sheet.dtype == np.uint8
    c = fmap[0, :, :, 17].copy()
    c -= c.mean()
    c /= c.std()
    want = np.clip(c * 64 + 128, 0, 255).astype("uint8")
    np.testing.assert_array_equal(sheet[6:12, 5:10], want)  # channel 17: row 1, column 1
    assert np.all(sheet[:6, 15:20] == 0) and np.all(sheet[6:, 20:] == 0)


@pytest.fixture(scope="module")
def torch_vgg11(tmp_path_factory):
    """A seeded torchvision-layout VGG11 (10 classes) and the same weights converted."""
    from vggjax.testing.reference import install_torchvision_standin, randomize, vgg

    install_torchvision_standin()  # before pytorch_grad_cam imports torchvision
    pytest.importorskip("pytorch_grad_cam", reason="pip install --no-deps grad-cam ttach "
                        "opencv-python-headless scikit-learn")
    import torch

    net = randomize(vgg("vgg11", num_classes=10), seed=1).eval()
    tmp = tmp_path_factory.mktemp("torch")
    torch.save(net.state_dict(), tmp / "vgg11.pth")
    vggjax.convert_file("torchvision", "vgg11", tmp / "vgg11.pth", tmp / "converted", include_top=True)
    return net, vggjax.load(tmp / "converted")


@pytest.mark.parametrize("method", convnet.METHODS)
def test_methods_match_pytorch_grad_cam(torch_vgg11, method):
    """All three methods at a block's last conv and at a middle one, 64x64 inputs through
    torchvision's adaptive-pool head, against pytorch-grad-cam (its min-max scaling on ours)."""
    import pytorch_grad_cam
    import torch

    net, pt = torch_vgg11
    pixels = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = pt.preprocess(pixels)
    cls = {"gradcam": pytorch_grad_cam.GradCAM, "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
           "hirescam": pytorch_grad_cam.HiResCAM}[method]
    for layer, index in (("block5_conv2", 19), ("block4_conv1", 12)):  # features[i]: its ReLU
        with cls(model=net, target_layers=[net.features[index]]) as cam:
            cam.get_target_width_height = lambda _: None  # its maps at the layer's size
            theirs = cam(input_tensor=torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()),
                         targets=None)
        ours = np.asarray(convnet.grad_cam(pt.model, pt.variables, x, layer=layer, method=method))
        ours = ours - ours.min(axis=(1, 2), keepdims=True)
        ours = ours / (1e-7 + ours.max(axis=(1, 2), keepdims=True))
        assert np.min(np.std(theirs, axis=(1, 2))) > 0.05
        assert_close(f"{method} at {layer} vs pytorch-grad-cam", ours, theirs, TOL)


@pytest.mark.parametrize("arch, layer, conv_impl", [
    ("vgg11", "block3_conv1", "direct"), ("vgg11", "block4_conv2_preact", "direct"),
    ("vgg11_bn", "block5_conv2", "direct"), ("vgg11_bn", "block2_conv1_preact", "direct"),
    ("vgg11", "block4_conv2_preact", "onednn"), ("vgg11", "block3_conv1", "onednn")])
def test_layer_gradient_is_the_chain_rule_factor(make_variables, arch, layer, conv_impl):
    """dS/dx = (dA/dx)^T dS/dA: the gradient found at the layer, pulled back to the input,
    equals plain autodiff of the score w.r.t. the input (BatchNorm and pre-ReLU taps too, and
    oneDNN's conv with its ReLU fused, which the model unfuses for a pre-ReLU tap), and A is
    the layer's output. (Where a ReLU output is 0 the pull-back cannot see dS/dA; the parity
    tests against TF and pytorch-grad-cam cover those places.)"""
    import jax
    import jax.numpy as jnp

    from vggjax.model import onednn

    if conv_impl == "onednn" and onednn.unavailable():
        pytest.skip(f"oneDNN conv unavailable: {onednn.unavailable()}")
    model = vggjax.create(arch, top_input="torch", classifier_activation=None, num_classes=10,
                          conv_impl=conv_impl)
    variables = dict(make_variables(arch, include_top=True, seed=7))
    variables["params"] = dict(variables["params"], predictions={
        "kernel": variables["params"]["predictions"]["kernel"][:, :10],
        "bias": variables["params"]["predictions"]["bias"][:10]})
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    score = lambda logits: jnp.sum(logits[:, 4] - 0.5 * logits[:, 1])  # noqa: E731
    acts, grads = convnet.layer_gradient(model, variables, x, layer, score)
    want_acts, pull_back = jax.vjp(lambda x: model.apply(variables, x, outputs=(layer,))[layer], x)
    np.testing.assert_array_equal(acts, want_acts)
    want = jax.grad(lambda x: score(model.apply(variables, x)))(x)
    got = pull_back(grads)[0]
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))


def test_image_files_without_pillow_name_the_extra(subprocess_env):
    """Pillow is an extra: vggjax.viz imports without it, and the image-file functions say what to install."""
    import subprocess
    import sys

    script = ("import sys\nsys.modules['PIL'] = None  # as if Pillow were not installed\n"
              "import numpy as np\nfrom vggjax.viz import convnet\n"
              "try:\n    convnet.overlay(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2), np.float32))\n"
              "except ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("reading, resizing and writing image files needs PIL, which is not "
                                  "installed: pip install 'vggjax[train]'")
