"""The `jax` format: serialized StableHLO (`jax.export`), runnable with jax alone."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

FILE = "model.jaxexport"
# Lowered for each, so one artifact serves CPU, NVIDIA GPU and TPU hosts.
PLATFORMS = ("cpu", "cuda", "tpu")
PRECISIONS = ("fp32", "bf16")
REQUIRES = ()  # jax itself


def write(serving, directory: Path) -> dict:
    """`serving` with its weights as constants, batch dimension symbolic, into directory/FILE;
    returns the manifest's format fields. jax.export refuses custom calls (e.g. oneDNN's)."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, serving.image_size, serving.image_size, 3), jnp.uint8)
    fn = jax.jit(functools.partial(serving.fn, serving.params))
    exported = jax.export.export(fn, platforms=PLATFORMS)(spec)
    (directory / FILE).write_bytes(exported.serialize())
    return {"file": FILE, "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "run_with": "jax.export.deserialize(open(file, 'rb').read()).call(images)"}
