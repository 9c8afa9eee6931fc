"""Keras weight files -> vggjax: parity with Keras itself in both file layouts, and clear errors."""
import h5py
import numpy as np
import pytest

import vggjax
from helpers import CAFFE_INPUT_RMS, TOL, assert_parity, block_images as images
from vggjax.weights.keras import read_keras_h5, write_legacy_h5
from vggjax.model.vgg import BLOCK_SIZES, conv_names
from vggjax.weights import convert_file



def set_keras_weights(model, params):
    """Give a Keras model the weights of `params` by layer name (never by file order)."""
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([params[layer.name]["kernel"], params[layer.name]["bias"]])


def assert_keras_holds(model, params):
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            np.testing.assert_array_equal(kernel, params[layer.name]["kernel"], err_msg=layer.name)
            np.testing.assert_array_equal(bias, params[layer.name]["bias"], err_msg=layer.name)


def keras_input(keras, x):
    return keras.applications.vgg16.preprocess_input(x.astype(np.float32))  # copies: it edits in place


def assert_informative(probs, logits):
    """The random weights must make a test that can fail: peaked softmax, spread logits that
    depend on the image."""
    assert np.min(np.std(logits, axis=1)) > 1.0
    assert np.min(np.max(probs, axis=1)) > 0.05  # 50x the uniform 1/1000
    assert np.max(np.abs(logits[0] - logits[1])) > 1000 * TOL


def keras_probs_and_logits(keras, model, x):
    """Keras' softmax output, then its logits from the same model: `predictions` with a linear
    activation is exactly the layer VGG16(classifier_activation=None) builds, and reusing the
    model spares building a second 138M-parameter one. Eager calls: predict() would reuse a
    function traced with the softmax."""
    kx = keras_input(keras, x)
    probs = np.asarray(model(kx, training=False))
    model.get_layer("predictions").activation = keras.activations.linear
    logits = np.asarray(model(kx, training=False))
    assert_informative(probs, logits)
    return probs, logits


def jax_probs_and_logits(pt, x):
    """The documented contract, pt.model.apply({"params": ...}, pt.preprocess(images)), and the
    same weights through a logits model."""
    probs = pt.model.apply({"params": pt.params}, pt.preprocess(x))
    logits = vggjax.create(pt.meta["arch"], classifier_activation=None).apply(
        pt.variables, pt.preprocess(x))
    return probs, logits


def converted(tmp_path, arch, path, include_top):
    convert_file("keras", arch, path, tmp_path / "converted", include_top=include_top)
    return vggjax.load(tmp_path / "converted")


@pytest.fixture(scope="module")
def vgg16_full_h5(make_variables, vgg16_with_top):
    """The published full VGG16 layout (Keras-1 names, `helpers.write_vgg16`), its weights and
    its conversion with top: 553 MB of random weights, written once per run for every file."""
    params = make_variables("vgg16", include_top=True, seed=5, input_rms=CAFFE_INPUT_RMS,
                            logit_scale=3.0)["params"]
    return params, *vgg16_with_top


def test_vgg16_legacy_h5_with_top_matches_keras(keras, vgg16_full_h5):
    params, path, converted_with_top = vgg16_full_h5
    x = images(2, 224, seed=1)
    model = keras.applications.VGG16(weights=None)
    model.load_weights(path)  # Keras itself reads what write_legacy_h5 wrote...
    assert_keras_holds(model, params)  # ...and finds every layer where it belongs
    want_probs, want_logits = keras_probs_and_logits(keras, model, x)
    del model

    pt = vggjax.load(converted_with_top)  # convert_file(path, include_top=True): write_vgg16
    assert pt.meta["preprocessing"] == "caffe" and pt.meta["classifier_activation"] == "softmax"
    probs, logits = jax_probs_and_logits(pt, x)
    assert_parity("vgg16 legacy h5 softmax", probs, want_probs)
    assert_parity("vgg16 legacy h5 logits", logits, want_logits)


def test_full_file_converted_without_top_keeps_only_the_conv_base(vgg16_full_h5, tmp_path):
    params, path, _ = vgg16_full_h5
    pt = converted(tmp_path, "vgg16", path, include_top=False)
    assert not pt.meta["include_top"]
    assert sorted(pt.params) == sorted(conv_names(BLOCK_SIZES["vgg16"]))
    for name, layer in pt.params.items():
        np.testing.assert_array_equal(layer["kernel"], params[name]["kernel"])


@pytest.mark.slow  # Keras 3's layout: test_vgg19_notop_matches_keras[keras3]; the top: the legacy test above
def test_vgg19_keras3_weights_h5_with_top_matches_keras(keras, make_variables, tmp_path):
    model = keras.applications.VGG19(weights=None)
    set_keras_weights(model, make_variables("vgg19", include_top=True, seed=2,
                                            input_rms=CAFFE_INPUT_RMS)["params"])
    path = tmp_path / "vgg19.weights.h5"
    model.save_weights(path)  # Keras 3's own layout: layers/conv2d_N/vars/0
    x = images(2, 224, seed=3)
    want_probs, want_logits = keras_probs_and_logits(keras, model, x)
    del model

    pt = converted(tmp_path, "vgg19", path, include_top=True)
    probs, logits = jax_probs_and_logits(pt, x)
    assert_parity("vgg19 keras3 .weights.h5 softmax", probs, want_probs)
    assert_parity("vgg19 keras3 .weights.h5 logits", logits, want_logits)


def test_vgg16_notop_keras2_names_chunked_gives_keras_4x4x512_features(keras, make_variables,
                                                                       tmp_path):
    """The book's conv base: 150x150 in, 4x4x512 out."""
    params = make_variables("vgg16", include_top=False, seed=4, input_rms=CAFFE_INPUT_RMS)["params"]
    path = tmp_path / "vgg16_notop.h5"
    write_legacy_h5(params, path, names="keras2", chunk_layer_names=True)
    with h5py.File(path, "r") as f:
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs
        assert "kernel:0" in f["block1_conv1/block1_conv1"]
    conv_base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(150, 150, 3))
    conv_base.load_weights(path)
    assert_keras_holds(conv_base, params)
    x = images(1, 150, seed=5)
    want = conv_base.predict(keras_input(keras, x), verbose=0)

    pt = converted(tmp_path, "vgg16", path, include_top=False)
    got = pt.model.apply({"params": pt.params}, pt.preprocess(x))
    assert got.shape == (1, 4, 4, 512)
    assert_parity("vgg16 notop keras2-named chunked h5 features 150x150", got, want, top1=False)


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_vgg19_notop_matches_keras(keras, make_variables, tmp_path, layout):
    params = make_variables("vgg19", include_top=False, seed=6, input_rms=CAFFE_INPUT_RMS)["params"]
    conv_base = keras.applications.VGG19(weights=None, include_top=False, input_shape=(64, 64, 3))
    set_keras_weights(conv_base, params)
    if layout == "legacy":
        path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
        write_legacy_h5(params, path)
    else:
        path = tmp_path / "vgg19_notop.weights.h5"
        conv_base.save_weights(path)
    x = images(2, 64, seed=7)
    want = conv_base.predict(keras_input(keras, x), verbose=0)

    pt = converted(tmp_path, "vgg19", path, include_top=False)
    got = pt.model.apply({"params": pt.params}, pt.preprocess(x))
    assert_parity(f"vgg19 notop {layout} features 64x64", got, want, top1=False)
    with pytest.raises(ValueError, match=r"16 conv layers, as vgg19 has"):
        read_keras_h5(path, "vgg16")


def test_full_model_h5_reads_from_its_model_weights_group(keras, make_variables, tmp_path):
    params = make_variables("vgg16", include_top=False, seed=8)["params"]
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    set_keras_weights(model, params)
    path = tmp_path / "vgg16_model.h5"
    model.save(path)  # legacy whole-model h5: weights under /model_weights
    with h5py.File(path, "r") as f:
        assert "model_weights" in f and "layer_names" not in f.attrs
    variables, include_top = read_keras_h5(path, "vgg16")
    assert not include_top
    assert_keras_holds(model, variables["params"])


def test_keras_has_no_vgg11():
    with pytest.raises(ValueError, match=r"only for vgg16 and vgg19.*torchvision"):
        read_keras_h5("unused.h5", "vgg11")


# --- malformed files: each must fail with a clear message and leave no output behind ---------

@pytest.fixture(scope="module")
def notop16(make_variables):
    return make_variables("vgg16", include_top=False, seed=9)["params"]


def _without(params, layer):
    return {k: v for k, v in params.items() if k != layer}


def _edited(params, layer, **arrays):
    return {**params, layer: {**params[layer], **arrays}}


def _poisoned(params, layer, key, value):
    array = params[layer][key].copy()
    array.flat[7] = value
    return _edited(params, layer, **{key: array})


def _drop_bias(path):
    with h5py.File(path, "r+") as f:
        del f["block2_conv1/block2_conv1_b_1:0"]
        f["block2_conv1"].attrs["weight_names"] = np.array([b"block2_conv1_W_1:0"])


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


MALFORMED = {
    # name: (params -> params written, edit of the written file, include_top, message pattern)
    "empty file": (None, lambda p: p.write_bytes(b""), False, r"is empty \(0 bytes\)"),
    "truncated h5": (lambda p: p, _truncate, False, r"truncated"),
    "html instead of h5": (None, lambda p: p.write_bytes(b"<html><body>404 Not Found</body></html>"),
                           False, r"is not a readable HDF5 file"),
    "missing layer": (lambda p: _without(p, "block5_conv3"), None, False,
                      r"missing \['params/block5_conv3/bias', 'params/block5_conv3/kernel'\]"),
    "extra layer": (lambda p: {**p, "block5_conv4": p["block5_conv3"]}, None, False,
                    r"unexpected \['params/block5_conv4/bias', 'params/block5_conv4/kernel'\]"),
    "wrong shape": (lambda p: _edited(p, "block1_conv1", kernel=p["block1_conv1"]["kernel"][..., :32],
                                      bias=p["block1_conv1"]["bias"][:32]), None, False,
                    r"params/block1_conv1/kernel: expected shape \(3, 3, 3, 64\), found \(3, 3, 3, 32\)"),
    "nan kernel": (lambda p: _poisoned(p, "block3_conv2", "kernel", np.nan), None, False,
                   r"params/block3_conv2/kernel: contains NaN or Inf"),
    "inf bias": (lambda p: _poisoned(p, "block4_conv1", "bias", np.inf), None, False,
                 r"params/block4_conv1/bias: contains NaN or Inf"),
    "int kernel": (lambda p: _edited(p, "block2_conv2", kernel=p["block2_conv2"]["kernel"].astype(np.int32)),
                   None, False, r"holds non-float weights, expected floats: layer 'block2_conv2' weight 0 \(int32\)"),
    "layer without bias": (lambda p: p, _drop_bias, False,
                           r"layer 'block2_conv1' holds 1 weight\(s\) of shapes \[\(3, 3, 64, 128\)\]; "
                           r"expected one kernel and one bias"),
    "notop file with include_top": (lambda p: p, None, True,
                                    r"holds no classifier \(fc1, fc2, predictions\).*--include-top"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_fails_clearly_and_writes_nothing(notop16, tmp_path, case):
    make_params, edit, include_top, pattern = MALFORMED[case]
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    if make_params is not None:
        write_legacy_h5(make_params(notop16), path)
    if edit is not None:
        edit(path)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern) as err:
        convert_file("keras", "vgg16", path, out, include_top=include_top)
    assert str(path) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no temp dir


def test_vgg19_file_converted_as_vgg16_names_the_real_arch(make_variables, tmp_path):
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_legacy_h5(make_variables("vgg19", include_top=False, seed=10)["params"], path)
    with pytest.raises(ValueError, match=r"unexpected \['params/block3_conv4/bias'.*"
                                         r"16 conv layers, as vgg19 has: convert it as vgg19"):
        convert_file("keras", "vgg16", path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hdf5_that_is_not_a_keras_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"not a Keras weights file.*top level: \['data'\]"):
        read_keras_h5(path, "vgg16")
