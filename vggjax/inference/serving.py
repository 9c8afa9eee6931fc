"""What an export ships: one pure function from uint8 RGB images to its outputs, and its weights."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import vggjax
from vggjax.model.compute_dtype import with_compute_dtype
from vggjax.model.summary import min_forward_bytes
from vggjax.model.vgg import MIN_SIZE, VGG, arch_name
from vggjax.inference.classifier import CLASSIFIER
from vggjax.weights import METADATA
from vggjax.utils.memory import memory_bytes, shortfall
from vggjax.utils.trees import digest
from vggjax.inference.predictor import IMAGENET_SIZE, load_predictor
from vggjax.weights.preprocessing import imagenet_classes

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# Exports always run XLA's own convolution: oneDNN's is a custom call no other runtime has.
PORTABLE_CONV = "direct"
CLASSES = {"probabilities": "(N, K) float32 class probabilities (softmax; a binary head gives "
                            "(1 - p, p))",
           "class_ids": "(N,) int32 index of the most probable class"}


@dataclasses.dataclass(frozen=True, eq=False)
class Serving:
    """fn(params, images) -> tuple of arrays in `outputs` order; images uint8 (N, S, S, 3)."""

    fn: Callable
    params: dict
    image_size: int
    outputs: dict  # name -> meaning, in the order fn returns them
    info: dict  # for the manifest: kind, arch, preprocessing, class_names, source_sha256


def from_source(src: str | os.PathLike, precision: str = "fp32", image_size: int | None = None) -> Serving:
    """The `Serving` of a classifier directory or of a converted weights directory:
    with top, class probabilities and ids; without, the conv features (N, h, w, 512).

    `image_size`: the input size (a classifier: its trained size, the only one allowed; weights
    with top: 224; without top: default 224). ValueError (one line) for anything else.
    """
    src = Path(src).expanduser()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, found {precision!r}")
    if not ((src / CLASSIFIER).is_file() or (src / METADATA).is_file()):
        raise ValueError(f"{src} is neither a classifier directory ({CLASSIFIER}) nor converted "
                         f"weights ({METADATA}): nothing to export")
    if (src / CLASSIFIER).is_file() or vggjax.load(src, verify=False).meta["include_top"]:
        return _classes(src, precision, image_size)
    return _features(src, precision, image_size)


def _classes(src: Path, precision: str, image_size: int | None) -> Serving:
    predictor = load_predictor(src, conv_impl=PORTABLE_CONV)
    if image_size not in (None, predictor.image_size):
        raise ValueError(f"{src} classifies {predictor.image_size}x{predictor.image_size} images "
                         f"(its top fixes the size); found --image-size {image_size}")
    model, params = _in_precision(predictor.model, predictor.variables, precision)
    serving_predictor = dataclasses.replace(predictor, model=model)

    def fn(params, images):
        p = serving_predictor.serve(params, images)
        return p, jnp.argmax(p, axis=-1).astype(jnp.int32)

    names = (list(predictor.class_names) if predictor.class_names is not None
             else [name for _, name in imagenet_classes()])
    kind = "classifier" if (src / CLASSIFIER).is_file() else "imagenet"
    return Serving(fn, params, predictor.image_size, dict(CLASSES), dict(
        kind=kind, arch=arch_name(_vgg(predictor.model)), preprocessing=predictor.preprocessing,
        class_names=names, source_sha256=digest(predictor.variables)))


def _features(src: Path, precision: str, image_size: int | None) -> Serving:
    pretrained = vggjax.load(src)
    size = IMAGENET_SIZE if image_size is None else image_size  # 0 is refused, never the default
    if type(size) is not int or size < MIN_SIZE:
        raise ValueError(f"--image-size must be an integer >= {MIN_SIZE}, found {image_size!r}")
    need = min_forward_bytes(size, jnp.dtype(PRECISIONS[precision]).itemsize)
    if gap := shortfall(need, memory_bytes()):
        raise ValueError(f"one {size}x{size} image {gap}")
    model, params = _in_precision(pretrained.model.clone(conv_impl=PORTABLE_CONV),
                                  pretrained.variables, precision)
    mode = pretrained.meta["preprocessing"]

    def fn(params, images):
        return (model.apply(params, vggjax.preprocess_input(images, mode)).astype(jnp.float32),)

    h = size // 32
    return Serving(fn, params, size, {"features": f"(N, {h}, {h}, 512) float32 conv-base features "
                                                  "(block5_pool)"},
                   dict(kind="features", arch=pretrained.meta["arch"], preprocessing=mode,
                        class_names=None, source_sha256=digest(pretrained.variables)))


def _vgg(model):
    return model if isinstance(model, VGG) else model.base


def _in_precision(model, variables, precision: str):
    """(model computing in `precision`, variables stored in it): bf16 halves the artifact."""
    if precision == "fp32":
        return model, variables

    dtype = PRECISIONS[precision]
    cast = jax.tree.map(lambda a: np.asarray(a).astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, variables)
    return with_compute_dtype(model, dtype), cast
