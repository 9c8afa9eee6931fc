"""Uses of a trained VGG as a loss: LPIPS, feature and style (Gram) losses (`perceptual`), and the book's neural style transfer (`style_transfer`).

    vggjax.losses.LPIPS(), vggjax.losses.feature_loss(...), vggjax.losses.style_loss(...)
"""
from vggjax.losses.perceptual import (LPIPS, feature_loss, gram, style_loss, style_transfer_loss,
                                      style_transfer_targets, taps, total_variation)
