"""Shipping a model: the serving function (`vggjax.inference.serving`) written as a jax.export
artifact (`stablehlo`), a TF SavedModel (`savedmodel`) or ONNX (`onnx_model`), with a manifest
(`artifact`: `export`, `load`)."""
