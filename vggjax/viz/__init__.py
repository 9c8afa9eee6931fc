"""Seeing inside a convnet: Grad-CAM family, filter patterns, activation grids (`convnet`)."""
