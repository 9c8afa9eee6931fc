"""Preprocessing modes match the published contracts; class names come from an installed package."""
import numpy as np
import pytest

import vggjax


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)


def test_caffe_is_bgr_minus_mean(images):
    out = np.asarray(vggjax.preprocess_input(images, "caffe"))
    expected = images[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_torch_is_unit_scale_mean_std(images):
    out = np.asarray(vggjax.preprocess_input(images, "torch"))
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rescale_and_float_input(images):
    out = np.asarray(vggjax.preprocess_input(images.astype(np.float32), "rescale"))
    np.testing.assert_allclose(out, images / 255.0, rtol=1e-6)


def test_unknown_mode_and_bad_shape(images):
    with pytest.raises(ValueError, match="unknown preprocessing mode 'tf'"):
        vggjax.preprocess_input(images, "tf")
    with pytest.raises(ValueError, match="3 channels"):
        vggjax.preprocess_input(images[..., :2], "caffe")


def test_decode_predictions_keras_style():
    preds = np.zeros((2, 1000), np.float32)
    preds[0, [0, 281, 5]] = [0.2, 0.7, 0.1]
    preds[1, 999] = 1.0
    decoded = vggjax.decode_predictions(preds, top=2)
    assert decoded[0] == [("n02123045", "tabby cat", pytest.approx(0.7)), ("n01440764", "tench", pytest.approx(0.2))]
    assert decoded[1][0][0] == "n15075141" and decoded[1][0][2] == 1.0
    with pytest.raises(ValueError, match=r"\(N, 1000\)"):
        vggjax.decode_predictions(preds[:, :10])


@pytest.mark.parametrize("mode", ["caffe", "torch", "rescale"])
def test_deprocess_inverts_preprocess(images, mode):
    from vggjax.weights.preprocessing import deprocess_input
    x = vggjax.preprocess_input(images, mode)
    back = deprocess_input(x, mode)
    assert back.dtype == np.uint8 and back.shape == images.shape
    # float32 round trip, then truncation to uint8 as the book's deprocess_image does
    assert np.abs(back.astype(np.int16) - images.astype(np.int16)).max() <= 1
    assert (deprocess_input(x + 1e4, mode) == 255).all()  # clipped, not wrapped
