"""DLwP 1st ed. 8.3's neural-style-transfer loss as the book writes it, on a Keras VGG19: the
reference for vggjax.losses.perceptual' style-transfer presets (Keras 3 ops in place of the removed
`keras.backend` functions, one-for-one)."""
from __future__ import annotations

import numpy as np

CONTENT_LAYER = "block5_conv2"
STYLE_LAYERS = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]


def book_loss(keras, model, content, style, combination, content_weight, style_weight,
              tv_weight) -> dict[str, float]:
    """The book's loss of `combination` given caffe-preprocessed (1, H, W, 3) images and a Keras
    VGG19 `model` (include_top=False); returns its content, style, tv terms (weighted) and total."""
    ops = keras.ops
    img_height, img_width = content.shape[1:3]

    def content_loss(base, combination):
        return ops.sum(ops.square(combination - base))

    def gram_matrix(x):
        features = ops.reshape(ops.transpose(x, (2, 0, 1)), (x.shape[-1], -1))  # K.batch_flatten
        return ops.matmul(features, ops.transpose(features))

    def style_loss(style, combination):
        S = gram_matrix(style)
        C = gram_matrix(combination)
        channels = 3
        size = img_height * img_width
        return ops.sum(ops.square(S - C)) / (4. * (channels ** 2) * (size ** 2))

    def total_variation_loss(x):
        a = ops.square(x[:, :img_height - 1, :img_width - 1, :] - x[:, 1:, :img_width - 1, :])
        b = ops.square(x[:, :img_height - 1, :img_width - 1, :] - x[:, :img_height - 1, 1:, :])
        return ops.sum(ops.power(a + b, 1.25))

    input_tensor = ops.concatenate([ops.convert_to_tensor(a) for a in (content, style, combination)], 0)
    outputs_dict = {layer.name: layer.output for layer in model.layers[1:]}
    features = keras.Model(model.inputs, outputs_dict)(input_tensor)
    layer_features = features[CONTENT_LAYER]
    c = content_weight * content_loss(layer_features[0], layer_features[2])
    s = 0.
    for layer_name in STYLE_LAYERS:
        layer_features = features[layer_name]
        sl = style_loss(layer_features[1], layer_features[2])
        s += (style_weight / len(STYLE_LAYERS)) * sl
    tv = tv_weight * total_variation_loss(ops.convert_to_tensor(combination))
    out = {"content": c, "style": s, "tv": tv}
    out = {k: float(np.asarray(v)) for k, v in out.items()}
    out["total"] = out["content"] + out["style"] + out["tv"]
    return out


def keras_vgg19(keras, params, height, width, path):
    """Keras' own VGG19 (no top) holding `params` via a legacy h5 file at `path`, which
    vggjax converts too."""
    from vggjax.weights.keras import write_legacy_h5

    write_legacy_h5(params, path)
    model = keras.applications.VGG19(weights=None, include_top=False, input_shape=(height, width, 3))
    model.load_weights(path)
    return model
