"""The classification head of transfer learning (the book's densely connected classifier) and the
model it makes on a headless VGG conv base (`Classifier`), with the one rule that turns its logits
into class logits (`class_logits`) and the head's options as JSON."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vggjax.model.pooling import torch_pool
from vggjax.model.vgg import VGG
from vggjax.utils.trees import diff


POOLINGS = ("flatten", "avg", "max", "torch")  # how the head turns (N, H, W, C) features into vectors
ACTIVATIONS = ("relu", None)  # of the hidden layers: the book's relu, or none (its 2nd edition)


class Head(nn.Module):
    """pool -> [Dense(units) activation -> Dropout] ... -> Dense(num_outputs): the book's densely
    connected head, and the heads of Keras and torchvision models it imports.

    Input: (N, H, W, C) features, e.g. (N, 4, 4, 512) VGG16 features of 150x150 images.
    `pooling`: "flatten" (H, W, C order), global "avg" or "max", or "torch" (torchvision's
    adaptive average pool to 7x7, then flatten). `units`: one hidden layer's width, or a tuple
    of widths (() for none). Dropout sits in front of every Dense but the first hidden one.
    Output: (N, num_outputs) logits. With num_outputs=1 they are binary logits (the sigmoid
    lives in the loss); with more, class logits for softmax cross-entropy.
    Param names: "hidden", "hidden_1", ... {kernel (D, units), bias} and "logits" {kernel
    (units, num_outputs), bias}.
    """

    units: int | tuple[int, ...] = 256
    dropout_rate: float = 0.5
    num_outputs: int = 1
    pooling: str = "flatten"
    activation: str | None = "relu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return head_forward(self, _LinenHeadLayers(self, train), x)


# Keras Dense defaults (glorot_uniform kernel, zero bias), so the head starts as the book's.
HEAD_KERNEL_INIT = nn.initializers.glorot_uniform()


def hidden_layers(config: Head) -> list[tuple[str, int]]:
    """[(param name, width)] of the head's hidden Dense layers: "hidden", "hidden_1", ..."""
    widths = (config.units,) if isinstance(config.units, int) else tuple(config.units)
    return [("hidden" if i == 0 else f"hidden_{i}", w) for i, w in enumerate(widths)]


def check_head(config: Head) -> None:
    """ValueError (one line) for a pooling, activation or width the head does not have."""
    widths = [w for _, w in hidden_layers(config)]
    if config.pooling not in POOLINGS:
        raise ValueError(f"head pooling must be one of {POOLINGS}, found {config.pooling!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"head activation must be one of {ACTIVATIONS}, found {config.activation!r}")
    if not all(type(w) is int and w > 0 for w in [*widths, config.num_outputs]):
        raise ValueError(f"head widths must be positive integers, found units {config.units!r}, "
                         f"num_outputs {config.num_outputs!r}")


def pool_features(pooling: str, x):
    """(N, H, W, C) features -> (N, D) vectors, as `Head.pooling` says."""
    if pooling in ("avg", "max"):
        return jnp.mean(x, axis=(1, 2)) if pooling == "avg" else jnp.max(x, axis=(1, 2))
    if pooling == "torch":
        x = torch_pool(x)
    return x.reshape(x.shape[0], -1)


def head_forward(config: Head, layers, x):
    """The head's one forward pass, for both faces (Linen here, vggjax.nnx there): `layers`
    runs the Dense layers by name and the dropout. x: (N, ...) features -> (N, num_outputs) logits."""
    check_head(config)
    x = pool_features(config.pooling, jnp.asarray(x, config.dtype))
    for i, (name, width) in enumerate(hidden_layers(config)):
        x = layers.dense(name, width, layers.dropout(x) if i else x)
        x = nn.relu(x) if config.activation == "relu" else x
    return layers.dense("logits", config.num_outputs, layers.dropout(x))


class _LinenHeadLayers:
    def __init__(self, module: Head, train: bool):
        self.m, self.train = module, train

    def dense(self, name, units, x):
        return nn.Dense(units, name=name, dtype=self.m.dtype, param_dtype=self.m.param_dtype,
                        kernel_init=HEAD_KERNEL_INIT)(x)

    def dropout(self, x):
        return nn.Dropout(self.m.dropout_rate, deterministic=not self.train)(x)


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


def class_logits(logits: jax.Array) -> jax.Array:
    """float32 (N, K) logits of a classifier's output: a binary head's one logit l becomes
    (-l/2, l/2), whose softmax is (1 - sigmoid(l), sigmoid(l)). Predicting, exporting and
    Grad-CAM all go through this, so a binary head is two classes everywhere."""
    logits = logits.astype(jnp.float32)
    return jnp.concatenate([-logits / 2, logits / 2], axis=-1) if logits.shape[-1] == 1 else logits


def head_config(head: Head) -> dict:
    """The head's options as classifier.json stores them (widths as a list when several)."""
    units = head.units if isinstance(head.units, int) else list(head.units)
    return {"units": units, "dropout_rate": head.dropout_rate, "num_outputs": head.num_outputs,
            "pooling": head.pooling, "activation": head.activation}


def head_from_config(config: Mapping) -> Head:
    """`head_config`'s inverse; exports written before pooling and activation existed get the
    book's flatten and relu."""
    units = config["units"]
    return Head(units=units if isinstance(units, int) else tuple(units),
                dropout_rate=config["dropout_rate"], num_outputs=config["num_outputs"],
                pooling=config.get("pooling", "flatten"), activation=config.get("activation", "relu"))
