"""NNX VGGs from vggjax weights directories, and NNX state to and from Orbax checkpoints.

An NNX checkpoint is the Linen variables tree ({"params"[, "batch_stats"]}, Keras names), so
either face restores what the other saved.
"""
from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from vggjax.nnx.model import from_linen, set_variables, variables


def load(directory: str | os.PathLike, conv_impl: str | None = None, verify: bool = True):
    """The NNX VGG of a directory that `vggjax convert` (or `vggjax.weights.save`)
    wrote, digest-verified as `vggjax.load` does; `model.preprocessing` is the weights' mode,
    `model.preprocess(images)` applies it. `conv_impl` picks the conv algorithm (default "direct")."""
    from vggjax.weights import load as load_linen
    pretrained = load_linen(directory, verify=verify)
    module = pretrained.model if conv_impl is None else pretrained.model.clone(conv_impl=conv_impl)
    return from_linen(module, pretrained.variables, preprocessing=pretrained.meta["preprocessing"])


def save(path: str | os.PathLike, model: nnx.Module, overwrite: bool = False) -> Path:
    """Write the model's parameters and BatchNorm statistics as an Orbax checkpoint directory
    at `path`: complete or absent (`atomic.writing`); `overwrite` replaces only a checkpoint
    vggjax wrote there and nobody changed since. Returns the path."""
    from vggjax.utils import orbax_tree
    from vggjax.utils import atomic
    path = Path(path).expanduser().absolute()
    with atomic.writing(path, directory=True, overwrite=overwrite) as tmp:
        orbax_tree.save_tree(tmp, variables(model))
    return path


def restore(path: str | os.PathLike, model: nnx.Module) -> nnx.Module:
    """Fill `model` (e.g. `nnx.eval_shape(lambda: VGG16(rngs=nnx.Rngs(0)))`) with the checkpoint
    at `path`, in place; ValueError naming the layers when it does not fit. Returns `model`."""
    from vggjax.utils import orbax_tree
    set_variables(model, orbax_tree.restore_tree(Path(path).expanduser().absolute()))
    return model
