"""Shared test set-up: Keras on TensorFlow's CPU backend, and seeded random VGG weights."""
import os

# Before anything imports keras: the reference framework for the Keras parity tests.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from vggjax.weights import expected_shapes, unflatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_variables(arch: str, include_top: bool = True, seed: int = 0, input_rms: float = 1.0,
                     logit_scale: float = 1.0) -> dict:
    """Seeded float32 NumPy {"params", ["batch_stats"]} for `arch`, keyed like vggjax's.

    Kernels are He-normal so activations keep their scale through the ReLUs; the first conv
    is divided by `input_rms` (the inputs' RMS: ~70 for caffe-preprocessed images, ~1 for
    torch-preprocessed ones) so activations are O(1), and the classifier is scaled by
    `logit_scale`, so logits are spread enough that softmax is far from uniform and top-1 is
    stable. Biases and BatchNorm statistics are small random numbers, never all zeros/ones,
    so a converter that drops or swaps them is caught.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in sorted(expected_shapes(arch, include_top).items()):
        layer, name = path.split("/")[-2:]
        if name == "kernel":
            std = np.sqrt((1.0 if layer == "predictions" else 2.0) / np.prod(shape[:-1]))
            std *= logit_scale if layer == "predictions" else 1.0
            std /= input_rms if layer == "block1_conv1" else 1.0
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # bias, BN bias, BN mean
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        out[path] = value
    return unflatten(out)


@pytest.fixture(scope="session")
def make_variables():
    """`random_variables` as a fixture: make_variables("vgg16", include_top=False, seed=1)."""
    return random_variables


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on TensorFlow, GPUs hidden (imported only by the tests that compare against it)."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import keras

    assert keras.backend.backend() == "tensorflow"
    return keras


@pytest.fixture
def subprocess_env(tmp_path):
    """Environment for running repo scripts in a subprocess: the checkout importable even when
    vggjax is not installed, and an empty $VGGJAX_CACHE."""
    env = dict(os.environ, VGGJAX_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env
