"""The `savedmodel` format: a TF SavedModel with a `serving_default` signature (jax2tf)."""
from __future__ import annotations

from pathlib import Path

import jax

from vggjax.utils.extras import require

PRECISIONS = ("fp32", "bf16")
REQUIRES = ("tensorflow",)  # checked by artifact.export before any work
SIGNATURE = "serving_default"


def write(serving, directory: Path) -> dict:
    """`serving` as a SavedModel in `directory`: weights as tf.Variables, images uint8 (None, S,
    S, 3) named "images", outputs a dict named as `serving.outputs`."""
    tf = require("tensorflow", "the savedmodel export")
    from jax.experimental import jax2tf

    s = serving.image_size
    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, jax.device_get(serving.params))
    converted = jax2tf.convert(serving.fn, polymorphic_shapes=[None, f"(batch, {s}, {s}, 3)"],
                               with_gradient=False)
    names = list(serving.outputs)

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="images")],
                 autograph=False)
    def serve(images):
        return dict(zip(names, converted(module.params, images)))

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={SIGNATURE: serve})
    return {"signature": SIGNATURE, "input_name": "images",
            "run_with": f"tf.saved_model.load(dir).signatures['{SIGNATURE}'](images=images)"}
