"""A new classification head on a pretrained VGG conv base: the book's transfer-learning model."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vggjax.model import VGG
from vggjax.weights import flatten


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
    _check_fits(base_variables, want)

    features = jax.eval_shape(base_model.apply, want, images)
    head_vars = head.init(key, jnp.zeros(features.shape, features.dtype))
    variables = {"params": {"base": dict(base_variables["params"]), "head": head_vars["params"]}}
    if "batch_stats" in base_variables:
        variables["batch_stats"] = {"base": dict(base_variables["batch_stats"])}
    return Classifier(base=base_model, head=head), jax.tree.map(jnp.asarray, variables)


def _check_fits(have: Mapping, want: Mapping) -> None:
    """ValueError naming missing / unexpected / mis-shaped base variables."""
    have_flat = {k: tuple(np.shape(v)) for k, v in flatten(have).items()}
    want_flat = {k: tuple(v.shape) for k, v in flatten(want).items()}
    problems = []
    if missing := sorted(set(want_flat) - set(have_flat)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(have_flat) - set(want_flat)):
        problems.append(f"unexpected {unexpected}")
    problems += [f"{k}: expected shape {want_flat[k]}, found {have_flat[k]}"
                 for k in sorted(set(want_flat) & set(have_flat)) if want_flat[k] != have_flat[k]]
    if problems:
        raise ValueError("base variables do not fit the base model: " + "; ".join(problems))
