# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Using a pretrained convnet, with vggjax
#
# *Deep Learning with Python*, chapter 5.3 (1st edition; chapter 8.3 in the 2nd), cell by cell in
# JAX: the VGG16 convolutional base trained on ImageNet, then the book's three ways to reuse it on
# 2000 pictures of cats and dogs:
#
# 1. **feature extraction**: run the conv base once, train a small densely connected classifier
#    on the stored 4x4x512 features;
# 2. **a frozen conv base with data augmentation**: the classifier on top of the base, the base
#    frozen, every picture augmented at every epoch;
# 3. **fine-tuning**: unfreeze block5 and train it with the classifier at a low learning rate.
#
# This file is a [jupytext](https://jupytext.readthedocs.io) notebook: `pretrained_convnet.py` is
# the source, `pretrained_convnet.ipynb` its paired notebook (outputs stripped in git).
# With `VGGJAX_NOTEBOOK_SMOKE=1` it runs on generated pictures with random weights and tiny
# settings in a minute or two (what the tests run); otherwise on the book's `cats_and_dogs_small`
# with the Keras ImageNet weights, for hours on a CPU.

# %%
import json
import os
from pathlib import Path

from IPython.display import Image, display

import vggjax
from vggjax.train import inputs, report, synthetic, workflow
from vggjax.train.config import Config

SMOKE = os.environ.get("VGGJAX_NOTEBOOK_SMOKE") == "1"
if SMOKE:  # two classes of generated pictures, random VGG16 weights, tiny settings
    WORKDIR = Path("runs/notebook_smoke")
    DATA = synthetic.make_image_folder(WORKDIR.parent / "notebook_smoke_data",
                                       sizes={"train": 10, "validation": 4, "test": 4})
    WEIGHTS = synthetic.make_random_weights(WORKDIR.parent / "notebook_smoke_vgg16_notop")
    SETTINGS = dict(image_size=48, epochs={"features": 4, "frozen": 2, "finetune": 4},
                    learning_rates=synthetic.SETTINGS["learning_rates"])
else:  # the book's 2000 / 1000 / 1000 pictures and the Keras VGG16 ImageNet weights (no top)
    WORKDIR = Path("runs/notebook_catsdogs")
    DATA = Path("../../shared/data/cats_and_dogs_small")  # where your copy is
    WEIGHTS = inputs.resolve_weights(None)  # downloaded and converted once, or say how offline
    SETTINGS = {}  # the book's: 150x150, batch 20, 30 / 30 / 100 epochs, RMSprop 2e-5 / 1e-5
PLOTS = WORKDIR.parent / f"{WORKDIR.name}_plots"
PLOTS.mkdir(parents=True, exist_ok=True)


def run(phase):
    """One phase of the book in WORKDIR (a finished one is restored, not retrained): its results."""
    config = Config(weights=str(WEIGHTS), workdir=str(WORKDIR), data=str(DATA), phases=(phase,),
                    **SETTINGS)
    return workflow.run(config)[phase]


def history(phase):
    """[{"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}, ...] of a phase."""
    return json.loads((WORKDIR / report.HISTORY).read_text())[phase]


def show_curves(histories, name):
    """The book's two plots (accuracy, loss; training dots, validation line) per phase."""
    display(Image(filename=str(report.plot_curves(histories, PLOTS / f"{name}.png"))))


# %% [markdown]
# ## The VGG16 convolutional base
#
# Keras' `VGG16(weights='imagenet', include_top=False, input_shape=(150, 150, 3))` is
# `vggjax.VGG16(include_top=False)` plus a converted weights directory; the layers keep Keras'
# names. The final feature map is 4x4x512 at 150x150 (1x1x512 at the smoke run's 48x48).

# %%
size = SETTINGS.get("image_size", 150)
conv_base = vggjax.VGG16(include_top=False)
vggjax.summary(conv_base, (size, size, 3));

# %% [markdown]
# ## 1. Fast feature extraction without data augmentation
#
# The conv base runs once over every picture (the features are cached in the workdir), then a
# `Dense(256, relu)`, `Dropout(0.5)`, `Dense(1, sigmoid)` classifier trains on them with
# RMSprop(2e-5), 30 epochs in the book.

# %%
features = run("features")
show_curves({"features": history("features")}, "features")

# %% [markdown]
# About 90% validation accuracy in the book, and overfitting from the start: no augmentation.
#
# ## 2. Feature extraction with data augmentation
#
# The classifier now sits on the conv base, which is frozen (its parameters get no update and no
# optimizer state), and the training pictures are augmented on the device every epoch (the
# book's rotation, shifts, shear, zoom and flips).

# %%
frozen = run("frozen")
show_curves({"frozen": history("frozen")}, "frozen")

# %% [markdown]
# ## 3. Fine-tuning
#
# Continuing from phase 2, block5 of the conv base trains together with the classifier, with
# RMSprop(1e-5), 100 epochs in the book.

# %%
finetune = run("finetune")
show_curves({"finetune": history("finetune")}, "finetune")

# %% [markdown]
# The curves are noisy; the book smooths them with an exponential moving average of each point
# and the previous smoothed one (factor 0.8) to see the trend. The two lower rows of each figure
# above are those smoothed curves (`report.smooth_curve`, the book's last figure); the same
# function on the validation accuracy:

# %%
val_accuracy = [r["val_accuracy"] for r in history("finetune")]
for epoch, (raw, smooth) in enumerate(zip(val_accuracy, report.smooth_curve(val_accuracy)), 1):
    print(f"epoch {epoch}: validation accuracy {raw:.3f}, smoothed {smooth:.3f}")

# %% [markdown]
# ## Test accuracy
#
# Every phase ends with an evaluation on the test split, which its training never saw. The book
# reaches 97% after fine-tuning.

# %%
for phase, results in (("features", features), ("frozen", frozen), ("finetune", finetune)):
    print(f"{phase:>8}: test accuracy {results['test_accuracy']:.3f}")
