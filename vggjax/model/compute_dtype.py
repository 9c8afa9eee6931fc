"""Running a Flax module in another compute dtype (bf16 with fp32 parameters) for training and serving."""
from __future__ import annotations

import dataclasses

import flax.linen as nn


def with_compute_dtype(module: nn.Module, dtype) -> nn.Module:
    """Copy of `module` (and of its submodules, e.g. a Classifier's base and head) computing in
    `dtype`; parameters keep their own param_dtype (float32), so bf16 compute keeps fp32 masters.
    dtype None: `module` itself."""
    if dtype is None:
        return module
    changes = {f.name: with_compute_dtype(getattr(module, f.name), dtype)
               for f in dataclasses.fields(module)
               if f.name != "parent" and isinstance(getattr(module, f.name), nn.Module)}
    if hasattr(module, "dtype"):
        changes["dtype"] = dtype
    return module.clone(**changes)
