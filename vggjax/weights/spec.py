"""What a complete set of VGG weights looks like, and the check every reader and loader runs on it.

Converters produce plain nested dicts of NumPy arrays, `{"params": {...}}` plus
`{"batch_stats": {...}}` for BatchNorm variants, keyed by Keras layer names. Nothing reaches a
checkpoint unless `check_variables` accepted it.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from vggjax.model.vgg import create, variable_shapes
from vggjax.utils.trees import diff, non_finite


def check_floats(arrays: Mapping[str, object], source: str) -> None:
    """Raise ValueError naming `source` and each array whose dtype is not floating point: an
    integer or boolean tensor in a weights file cannot be weights (a relabelled or wrong file),
    and casting it to float would hide that."""
    bad = [f"{name} ({getattr(a, 'dtype', type(a).__name__)})" for name, a in arrays.items()
           if not jnp.issubdtype(getattr(a, "dtype", None) or jnp.asarray(a).dtype, jnp.floating)]
    if bad:
        raise ValueError(f"{source} holds non-float weights, expected floats: " + ", ".join(bad[:4])
                         + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


def expected_shapes(arch: str, include_top: bool, num_classes: int = 1000) -> dict[str, tuple]:
    """{"params/block1_conv1/kernel": (3, 3, 3, 64), ...} for an arch, computed without any FLOPs."""
    return variable_shapes(create(arch, include_top=include_top, num_classes=num_classes))


def check_variables(variables: Mapping, arch: str, include_top: bool, source: str,
                    num_classes: int = 1000) -> None:
    """Raise ValueError unless `variables` is exactly `arch`'s set of finite float arrays.

    The message names `source` (the file), every missing / unexpected layer and every shape
    that differs (expected vs found), so a VGG19 file read as VGG16 says so.
    """
    problems = diff(variables, expected_shapes(arch, include_top, num_classes))
    problems += [f"{path}: contains NaN or Inf" for path in ([] if problems else non_finite(variables))]
    if problems:
        top = "with" if include_top else "without"
        raise ValueError(f"{source} does not hold {arch} weights {top} top: " + "; ".join(problems))
