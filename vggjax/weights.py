"""What a complete set of VGG weights looks like, and the check every converter runs on its result.

Converters produce plain nested dicts of NumPy arrays, `{"params": {...}}` plus
`{"batch_stats": {...}}` for BatchNorm variants, keyed by Keras layer names. Nothing reaches a
checkpoint unless `check_variables` accepted it.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.model import create


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": x}} -> {"a/b": x}: the '/'-joined names used in errors, masks and logs."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    """Inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def expected_shapes(arch: str, include_top: bool, num_classes: int = 1000) -> dict[str, tuple]:
    """{"params/block1_conv1/kernel": (3, 3, 3, 64), ...} for an arch, computed without any FLOPs."""
    model = create(arch, include_top=include_top, num_classes=num_classes, head="torch")
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    return {path: tuple(leaf.shape) for path, leaf in flatten(variables).items()}


def check_variables(variables: Mapping, arch: str, include_top: bool, source: str,
                    num_classes: int = 1000) -> None:
    """Raise ValueError unless `variables` is exactly `arch`'s set of finite float arrays.

    The message names `source` (the file), every missing / unexpected layer and every shape
    that differs (expected vs found), so a VGG19 file read as VGG16 says so.
    """
    want = expected_shapes(arch, include_top, num_classes)
    have = flatten(variables)
    problems = []
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for path in sorted(set(want) & set(have)):
        shape = tuple(np.shape(have[path]))
        if shape != want[path]:
            problems.append(f"{path}: expected shape {want[path]}, found {shape}")
        elif not np.all(np.isfinite(have[path])):
            problems.append(f"{path}: contains NaN or Inf")
    if problems:
        top = "with" if include_top else "without"
        raise ValueError(f"{source} does not hold {arch} weights {top} top: " + "; ".join(problems))
