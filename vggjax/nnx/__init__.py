"""vggjax for Flax NNX: the same VGG family, weights and freezing as NNX modules.

    model = vggjax.nnx.load("weights/keras_vgg16_notop")       # any converted directory
    features = model(model.preprocess(images))                   # (N, H/32, W/32, 512)
    nnx.Optimizer(model, optax.rmsprop(1e-5), wrt=vggjax.nnx.trainable("block5"))

The architecture lives once, in the Linen modules (`model.config` is the Linen twin);
`to_linen(model)` gives (module, variables) for LPIPS, the losses and Grad-CAM.
"""
from vggjax.nnx.model import (ARCHS, VGG, VGG11, VGG11_BN, VGG13, VGG13_BN, VGG16, VGG16_BN,
                              VGG19, VGG19_BN, Classifier, Conv3x3, Head, create, from_linen,
                              set_variables, to_linen, variables)
from vggjax.nnx.training import (book_classifier, book_splits, evaluate, fit, make_eval_step,
                                 make_train_step, trainable, trainable_report)
from vggjax.nnx.weights import load, restore, save
