"""Uses of a trained VGG as a loss: LPIPS, feature and style (Gram) losses (`perceptual`), and the book's neural style transfer."""
