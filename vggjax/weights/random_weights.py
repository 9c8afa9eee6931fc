"""Seeded random VGG weights in NumPy, for tests, references, smoke runs and benchmarks: one
generator, so the Keras, torchvision and vggjax copies of a random VGG hold the same numbers.

Not `vggjax.model.vgg.init_random` (Flax's own initialisers, zero biases: training from scratch).
These are drawn to keep activations O(1) from the input to the logits and to make every tensor
matter, so a conversion or parity test that drops, swaps or mis-transposes one fails.
"""
from __future__ import annotations

import numpy as np

from vggjax.utils.trees import unflatten
from vggjax.weights.spec import expected_shapes

CAFFE_INPUT_RMS = 70.0  # caffe-preprocessed 0..255 images' RMS: `input_rms` that keeps activations O(1)


def random_variables(arch: str, include_top: bool = True, seed: int = 0, input_rms: float = 1.0,
                     logit_scale: float = 1.0, num_classes: int = 1000) -> dict:
    """Seeded {"params": ..., ["batch_stats": ...]} for `arch`, keyed like vggjax's variables.

    Every array is float32 NumPy in vggjax's layout (`weights.spec.expected_shapes`): conv kernels
    (3, 3, in, out) HWIO, fc1 (25088, 4096) with rows in H, W, C order, fc2 (4096, 4096),
    predictions (4096, num_classes), biases (out,); BatchNorm variants add `<conv>_bn` scale and
    bias in "params" and mean and var in "batch_stats", each (out,).

    Kernels are He-normal so activations keep their scale through the ReLUs; the first conv
    is divided by `input_rms` (the inputs' RMS: ~70 for caffe-preprocessed images, ~1 for
    torch-preprocessed ones) so activations are O(1), and the classifier is scaled by
    `logit_scale`, so logits are spread enough that softmax is far from uniform and top-1 is
    stable. Biases and BatchNorm statistics are small random numbers, never all zeros/ones,
    so a converter that drops or swaps them is caught. One seed, one set of numbers: NumPy's
    PCG64 stream, drawn in sorted variable order.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in sorted(expected_shapes(arch, include_top, num_classes).items()):
        layer, name = path.split("/")[-2:]
        if name == "kernel":
            std = np.sqrt((1.0 if layer == "predictions" else 2.0) / np.prod(shape[:-1]))
            std *= logit_scale if layer == "predictions" else 1.0
            std /= input_rms if layer == "block1_conv1" else 1.0
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= np.float32(std)  # in place: fc1 alone is 400 MB
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name == "var":  # E[scale^2 / var] ~ 1: BatchNorm keeps the He scale, layer after layer
            value = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:  # bias, BN bias, BN mean
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        out[path] = value
    return unflatten(out)
