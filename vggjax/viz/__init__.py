"""Seeing inside a convnet: Grad-CAM family, filter patterns, activation grids (`convnet`).

    vggjax.viz.grad_cam(model, variables, x), vggjax.viz.overlay(image, cam), vggjax.viz.filter_pattern(...)
"""
from vggjax.viz.convnet import (activation_grid, cam_overlay, deprocess_image, filter_pattern,
                                grad_cam, grid, layer_gradient, overlay)
