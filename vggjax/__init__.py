"""vggjax: the VGG family in JAX/Flax with ImageNet weights ported from Keras and torchvision.

Importing vggjax never imports TensorFlow or torch: only `vggjax.train.data` (tf.data, the
`train` extra) imports TensorFlow, on first use; `.pth` files are read without torch
(`vggjax.weights.torch_pickle`). The names below load JAX on first use, so that a command can
take over Ctrl-C (`vggjax.utils.interrupts`) before the seconds JAX takes to import.
"""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("ARCHS", "VGG", "VGG11", "VGG11_BN", "VGG13", "VGG13_BN", "VGG16", "VGG16_BN",
                     "VGG19", "VGG19_BN", "create"), "vggjax.model.vgg"),
    "summary": "vggjax.model.summary",
    "decode_predictions": "vggjax.weights.preprocessing",
    "preprocess_input": "vggjax.weights.preprocessing",
    **dict.fromkeys(("Pretrained", "convert_file", "load"), "vggjax.weights"),
}
__all__ = sorted(_EXPORTS)
_PACKAGES = ("model", "weights", "inference", "losses", "viz", "train", "export", "nnx", "testing",
             "utils")


def __getattr__(name: str):
    if name in _PACKAGES:  # `import vggjax; vggjax.weights.load(...)` as before
        return importlib.import_module(f"vggjax.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vggjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
