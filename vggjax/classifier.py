"""A new classification head on a pretrained VGG conv base (the book's transfer-learning model),
and the exported classifier: written once, loaded and run on raw images without the training code.

Exported classifier layout (`export`):

    <export_dir>/
      base/              the conv base as a vggjax weights directory: `vggjax.load(export_dir/"base")`
                         gives the fine-tuned base with the input weights' Keras layer names and
                         metadata, its `preprocessing` set to the mode the classifier was trained with
      head.safetensors   the head's parameters, '/'-joined names ("hidden/kernel", "logits/bias", ...)
      classifier.json    head shape, image size, preprocessing, class names, phase

    clf = load_classifier(export_dir)
    probabilities = predict(clf, images)   # images uint8 (N, S, S, 3) RGB at clf.image_size
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vggjax import atomic, weights
from vggjax.model import VGG
from vggjax.preprocessing import preprocess_input
from vggjax.trees import diff, flatten, unflatten

BASE, HEAD, CLASSIFIER = "base", "head.safetensors", "classifier.json"


class Head(nn.Module):
    """flatten -> Dense(units) relu -> Dropout -> Dense(num_outputs): the book's densely connected head.

    Input: (N, ...) features, e.g. (N, 4, 4, 512) VGG16 features of 150x150 images.
    Output: (N, num_outputs) logits. With num_outputs=1 they are binary logits (the sigmoid
    lives in the loss); with more, class logits for softmax cross-entropy.
    Param names: "hidden" {kernel (D, units), bias} and "logits" {kernel (units, num_outputs), bias}.
    """

    units: int = 256
    dropout_rate: float = 0.5
    num_outputs: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        # Keras Dense defaults (glorot_uniform kernel, zero bias), so the head starts as the book's.
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.glorot_uniform())
        x = nn.relu(nn.Dense(self.units, name="hidden", **dense)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_outputs, name="logits", **dense)(x)


class Classifier(nn.Module):
    """`head` on top of a headless VGG `base` (include_top=False).

    `__call__(x, train=False)`: x (N, H, W, 3) float images already preprocessed for the base's
    weights (see `preprocess_input`); returns (N, num_outputs) logits.
    Variables: {"params": {"base": <VGG params, Keras names>, "head": {...}}} plus
    {"batch_stats": {"base": ...}} for BatchNorm bases.
    `train` switches the head's dropout. The base's BatchNorm layers use their running statistics
    unless `train_base_batch_norm` is set, which is Keras' behaviour for a pretrained base
    (frozen or fine-tuned): a small new dataset would otherwise overwrite ImageNet statistics.
    """

    base: VGG
    head: Head
    train_base_batch_norm: bool = False

    def __call__(self, x, train: bool = False):
        features = self.base(x, train=train and self.train_base_batch_norm)
        return self.head(features, train=train)


def init_classifier(base_variables: Mapping, base_model: VGG, head: Head,
                    image_size: int | Sequence[int], key: jax.Array) -> tuple[Classifier, dict]:
    """(Classifier(base=base_model, head=head), its variables) with the pretrained base dropped in.

    base_variables: {"params": {...}[, "batch_stats": {...}]} of `base_model` (NumPy or JAX
    arrays, e.g. from the converters), not re-initialised. Only the head is initialised, from
    `key`, for the feature shape that `image_size` (int or (H, W)) gives. The variables are
    {"params": {"base", "head"}[, "batch_stats": {"base"}]} of JAX arrays. Raises ValueError
    when the base is not headless or `base_variables` does not fit `base_model`, naming the layers.
    """
    if base_model.include_top:
        raise ValueError("the classifier's base must be headless: create it with include_top=False")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    base_model.check_input((1, h, w, 3))
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    want = jax.eval_shape(base_model.init, key, images)
    if problems := diff(base_variables, want):
        raise ValueError("base variables do not fit the base model: " + "; ".join(problems))

    features = jax.eval_shape(base_model.apply, want, images)
    head_vars = head.init(key, jnp.zeros(features.shape, features.dtype))
    variables = {"params": {"base": dict(base_variables["params"]), "head": head_vars["params"]}}
    if "batch_stats" in base_variables:
        variables["batch_stats"] = {"base": dict(base_variables["batch_stats"])}
    return Classifier(base=base_model, head=head), jax.tree.map(jnp.asarray, variables)


@dataclasses.dataclass(eq=False)
class TrainedClassifier:
    """A headless VGG base plus a head, ready to classify raw images (see `predict`)."""

    model: Classifier
    variables: dict  # {"params": {"base", "head"}[, "batch_stats": {"base"}]}
    preprocessing: str  # the preprocess_input mode the classifier was trained with
    image_size: int
    class_names: tuple[str, ...]
    meta: dict = dataclasses.field(default_factory=dict)  # classifier.json when loaded

    def __post_init__(self):
        model, mode = self.model, self.preprocessing

        def probabilities(variables, images):
            logits = model.apply(variables, preprocess_input(images, mode)).astype(jnp.float32)
            return jax.nn.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else jax.nn.softmax(logits)

        # One jitted function per classifier: every `predict` call after the first reuses it.
        self.probabilities = jax.jit(probabilities)


def export(directory: str | os.PathLike, classifier: TrainedClassifier, base_meta: Mapping,
           info: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write `classifier` to `directory` in the layout of the module docstring; return the path.

    `base_meta`: the metadata of the weights the base started from (`Pretrained.meta`); the
    exported base keeps it, with include_top False and `preprocessing` set to the
    classifier's. `info`: extra JSON for classifier.json (e.g. phase, test accuracy). The
    directory is written under a temporary name and renamed: it is complete or absent.
    `overwrite` replaces a previous export (a directory holding classifier.json), nothing else.
    """
    from safetensors.numpy import save_file

    head = classifier.model.head
    params = classifier.variables["params"]
    base_variables = {"params": params["base"]}
    if "batch_stats" in classifier.variables:
        base_variables["batch_stats"] = classifier.variables["batch_stats"]["base"]
    meta = dict(base_meta, include_top=False, preprocessing=classifier.preprocessing)
    config = {"head": {"units": head.units, "dropout_rate": head.dropout_rate,
                       "num_outputs": head.num_outputs},
              "image_size": classifier.image_size, "preprocessing": classifier.preprocessing,
              "class_names": list(classifier.class_names), "base": BASE, **dict(info or {})}

    with atomic.writing(directory, directory=True, marker=CLASSIFIER, overwrite=overwrite) as tmp:
        tmp.mkdir()
        weights.save(tmp / BASE, jax.device_get(base_variables), meta)
        save_file({k: np.asarray(v) for k, v in flatten(params["head"]).items()}, str(tmp / HEAD))
        (tmp / CLASSIFIER).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def load_classifier(directory: str | os.PathLike) -> TrainedClassifier:
    """Load an `export`ed classifier: the base via `vggjax.load`, the head from head.safetensors."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not (directory / CLASSIFIER).is_file():
        raise FileNotFoundError(f"{directory} is not an exported classifier: {CLASSIFIER} is missing")
    config = json.loads((directory / CLASSIFIER).read_text())
    base = weights.load(directory / config["base"])
    head = Head(**config["head"])
    head_params = jax.tree.map(jnp.asarray, unflatten(load_file(str(directory / HEAD))))
    variables = {"params": {"base": base.params, "head": head_params}}
    if base.batch_stats is not None:
        variables["batch_stats"] = {"base": base.batch_stats}
    return TrainedClassifier(model=Classifier(base=base.model, head=head), variables=variables,
                             preprocessing=config["preprocessing"], image_size=config["image_size"],
                             class_names=tuple(config["class_names"]), meta=config)


def predict(classifier: TrainedClassifier | str | os.PathLike, images, batch_size: int = 32) -> np.ndarray:
    """Class probabilities for RGB images (uint8 or float 0..255, (N, S, S, 3), S = image_size).

    `classifier`: a `TrainedClassifier` or an export directory. Returns float32 (N,), the
    probability of `class_names[1]`, for a binary head; (N, K) softmax probabilities otherwise.
    Images go through in batches of `batch_size` (the last one padded, so one compilation).
    """
    if not isinstance(classifier, TrainedClassifier):
        classifier = load_classifier(classifier)
    images = np.asarray(images)
    s = classifier.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"expected RGB images of shape (N, {s}, {s}, 3) (the size this classifier "
                         f"was trained at), found {images.shape}")
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
        padded[:len(chunk)] = chunk
        out.append(np.asarray(classifier.probabilities(classifier.variables, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
