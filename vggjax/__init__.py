"""vggjax: the VGG family in JAX/Flax with ImageNet weights ported from Keras and torchvision.

Importing vggjax never imports TensorFlow or torch: only `vggjax.train.data` (tf.data, the
`train` extra) imports TensorFlow, on first use; `.pth` files are read without torch
(`vggjax.weights.torch_pickle`).
"""
from vggjax.model.vgg import (ARCHS, VGG, VGG11, VGG11_BN, VGG13, VGG13_BN, VGG16, VGG16_BN, VGG19,
                          VGG19_BN, create)
from vggjax.model.summary import summary
from vggjax.weights.preprocessing import decode_predictions, preprocess_input
from vggjax.weights import Pretrained, convert_file, load

__version__ = "0.1.0"
