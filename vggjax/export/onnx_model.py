"""The `onnx` format: model.onnx by jax2onnx, run by onnxruntime (and through it TensorRT, the web)."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from vggjax.utils import console
from vggjax.utils.extras import require

FILE = "model.onnx"
OPSET = 23  # jax2onnx's default; onnxruntime >= 1.24 runs it
# onnxruntime's CPU provider has no bfloat16 convolution: an fp16/bf16 ONNX would not run there.
PRECISIONS = ("fp32",)
REQUIRES = ("jax2onnx", "onnx")  # checked by artifact.export before any work


def write(serving, directory: Path) -> dict:
    """`serving` with its weights as initializers, batch dimension dynamic ("batch"), checked by
    onnx.checker; returns the manifest's format fields."""
    # jax2onnx logs a traceback for each optional plugin whose library is absent (dm_pix, ...);
    # onnx_ir warns for each metadata field it does not serialise ("Skipping serialization ..."):
    # nothing the user can act on, the model is complete.
    console.quiet_by_default("jax2onnx", "onnx_ir")
    to_onnx = require("jax2onnx", "the onnx export").to_onnx
    onnx = require("onnx", "the onnx export")
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, serving.image_size, serving.image_size, 3), jnp.uint8)
    model = to_onnx(functools.partial(serving.fn, serving.params), inputs=[spec], opset=OPSET,
                    model_name="vggjax", input_names=["images"], output_names=list(serving.outputs))
    onnx.save(model, str(directory / FILE))
    onnx.checker.check_model(str(directory / FILE))
    return {"file": FILE, "opset": OPSET, "input_name": "images",
            "run_with": "onnxruntime.InferenceSession(file).run(None, {'images': images})"}
