"""Test support, not public API: a torchvision-layout PyTorch VGG and the torchvision stand-in for lpips and pytorch-grad-cam."""
