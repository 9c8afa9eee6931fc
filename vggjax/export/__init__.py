"""Shipping a model: one function from uint8 images to outputs (`serving`), written as a jax.export
artifact (`stablehlo`), a TF SavedModel (`savedmodel`) or ONNX (`onnx_model`), with a manifest
(`artifact`: `export`, `load`)."""
