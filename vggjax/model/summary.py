"""Keras-style `model.summary()` table for a VGG module: layer, output shape, parameter count."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.model.vgg import VGG, WIDTHS


def _layer_type(name: str) -> str:
    if "_conv" in name:
        return "Conv2D"
    if name.endswith("_pool") and name.startswith("block"):
        return "MaxPooling2D"
    if name.startswith("global_"):
        return "GlobalAveragePooling2D" if "avg" in name else "GlobalMaxPooling2D"
    return "Flatten" if name == "flatten" else "Dense"


def summary_rows(model: VGG, input_shape: Sequence[int]) -> list[tuple[str, str, tuple, int]]:
    """[(layer name, Keras layer type, output shape without batch, parameter count)], no compute.

    `input_shape` is (H, W, 3). BatchNorm variants count each conv's BN (4 numbers a channel,
    like Keras) in its conv row.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    model.check_input(x.shape)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    # Pre-activation taps are views inside a conv layer, not Keras layers of their own.
    names = [n for n in model.layer_names() if not n.endswith("_preact")]
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, outputs=names), variables, x)

    def count(name):
        return sum(int(np.prod(leaf.shape))
                   for coll in variables.values()
                   for key in (name, f"{name}_bn") if key in coll
                   for leaf in jax.tree_util.tree_leaves(coll[key]))

    return [(name, _layer_type(name), tuple(shapes[name].shape[1:]), count(name)) for name in names]


def summary(model: VGG, input_shape: Sequence[int], print_fn: Callable[[str], None] | None = print) -> str:
    """Print (and return) the Keras-style summary table of `model` at `input_shape` (H, W, 3).
    `model`: a VGG, or an NNX `vggjax.nnx.VGG` (the table of its Linen twin, `model.config`:
    the same layers, shapes and counts)."""
    rows = summary_rows(getattr(model, "config", model), input_shape)
    fmt = "{:<32}{:<28}{:>14}"
    rule = "=" * 74
    lines = [rule, fmt.format("Layer (type)", "Output Shape", "Param #"), rule,
             fmt.format("input_layer (InputLayer)", str((None, *input_shape)), "0")]
    lines += [fmt.format(f"{name} ({kind})", str((None, *shape)), f"{n:,}") for name, kind, shape, n in rows]
    total = sum(r[3] for r in rows)
    lines += [rule, f"Total params: {total:,}", rule]
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text



def min_forward_bytes(image_size: int, itemsize: int = 4) -> int:
    """The least memory one image's forward pass through any VGG needs at image_size x
    image_size: its input and block1_conv1's 64-channel output, which exist at once. A lower
    bound, so a batch refused by it can never run."""
    return image_size * image_size * (3 + WIDTHS[0]) * itemsize
