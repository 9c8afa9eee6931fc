"""Small real inputs for `--smoke` runs: a learnable two-class JPEG folder and random VGG16 weights
that go through the same Keras-h5 conversion path as the published files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vggjax.utils import atomic
from vggjax.utils.extras import require

# Two classes, a disc on a warm background or stripes on a cool one, each drawn with random
# position, size, brightness, contrast and pixel noise, and with the other class's colours now and
# then: a random-weights conv base separates them, but not at once, and training and validation
# curves differ as the book's do. Sorted names give labels 0 (discs) and 1 (stripes).
CLASSES = ("discs", "stripes")
COLOURS = {"discs": (0.75, 0.45, 0.25), "stripes": (0.25, 0.45, 0.75)}
COLOUR_AGREEMENT = 0.85  # the share of images in their class's colours
CONTRAST, NOISE = (0.3, 0.6), 0.1  # the shape's contrast range, the pixel noise's sd (of 0..1)
SPLIT_SIZES = {"train": 80, "validation": 40, "test": 40}  # per class
JPEG_SIZE = 64  # written larger than the smoke image size so the pipeline's resizing runs too
# What marks these inputs as made here, so a run's figure can say so (`notes`): a file in the
# image folder's root (beside the split folders, where no image is looked for), and the name of
# the h5 file the random weights were converted from (their metadata's source_file).
MARKER = "generated_by_vggjax.txt"
RANDOM_H5 = "random_{arch}_notop_seed{seed}.h5"

# Config settings of a smoke run: 48x48 images (VGG16 features 1x1x512) and few epochs,
# so that all three phases finish quickly on 2 CPU cores. Not 32x32: XLA's CPU convolutions
# are slower on block5's 2x2 maps (inputs of 32..47 px) than on its 3x3 maps at 48 px
# (benchmarks/results_library.md). With so few steps the heads need larger learning rates than the book's.
SETTINGS = dict(image_size=48, batch_size=20, epochs={"features": 10, "frozen": 2, "finetune": 2},
                learning_rates={"features": 1e-4, "frozen": 1e-4, "finetune": 2e-5})


def _draw(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 RGB image of class `kind`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # The class's own colour only COLOUR_AGREEMENT of the time: colour alone gets that far,
    # the rest is the faint shape under the noise, learnt over epochs.
    other = CLASSES[1 - CLASSES.index(kind)]
    base = np.array(COLOURS[kind if rng.uniform() < COLOUR_AGREEMENT else other]) * rng.uniform(0.7, 1.0)
    if kind == "discs":
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
    else:  # stripes at a random angle and frequency
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 6)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        shape = (np.sin(2 * np.pi * freq * phase + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
    contrast = rng.uniform(*CONTRAST)
    img = base[None, None, :] * (1 - contrast + contrast * shape[..., None])
    img = img + rng.normal(0, NOISE, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_image_folder(root: str | os.PathLike, *, seed: int = 0, sizes: dict | None = None,
                      jpeg_size: int = JPEG_SIZE) -> Path:
    """Write `root/{train,validation,test}/{discs,stripes}/*.jpg` (the book's folder layout).

    `sizes` maps split -> images per class (default `SPLIT_SIZES`). Deterministic in `seed`.
    Written under a temporary name and renamed, so `root` is either complete or absent; an
    existing `root` is reused as is.
    """
    Image = require("PIL.Image", "writing smoke-test images")
    root = Path(root)
    if root.exists():
        return root
    sizes = SPLIT_SIZES if sizes is None else sizes
    with atomic.writing(root, directory=True) as tmp:
        tmp.mkdir()
        (tmp / MARKER).write_text(f"images drawn by vggjax.train.synthetic (seed {seed}), not photos\n")
        rng = np.random.default_rng(seed)
        for split, n in sizes.items():
            for kind in CLASSES:
                folder = tmp / split / kind
                folder.mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(_draw(kind, jpeg_size, rng)).save(folder / f"{kind}.{i}.jpg",
                                                                      quality=90)
    return root


def make_random_weights(directory: str | os.PathLike, arch: str = "vgg16", seed: int = 0) -> Path:
    """A converted no-top checkpoint of randomly initialised `arch`, made the way real weights are.

    Random parameters are written as a legacy Keras h5 file (`weights.keras.write_legacy_h5`,
    the published layout) next to `directory`, then converted by `weights.convert_file`, so
    a smoke run exercises the real reading, checking and saving path; the h5 file is deleted
    afterwards (the metadata's source_file and source_sha256 still name it). Reused when present.
    """
    import jax

    from vggjax import weights
    from vggjax.model.vgg import create, init_random
    from vggjax.weights.keras import write_legacy_h5

    directory = Path(directory)
    if (directory / weights.METADATA).is_file():
        return directory
    model = create(arch, include_top=False)
    params = jax.device_get(init_random(model, seed)["params"])
    h5 = directory.parent / RANDOM_H5.format(arch=arch, seed=seed)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_legacy_h5(params, h5)
        weights.convert_file("keras", arch, h5, directory, include_top=False, overwrite=True)
    finally:
        h5.unlink(missing_ok=True)
    return directory


def notes(data: str, weights_meta: dict) -> list[str]:
    """What a figure of a run on `data` with these weights must say: "random weights" when they
    are `make_random_weights`', "synthetic data" when `data` is `make_image_folder`'s."""
    source = Path(str(weights_meta.get("source_file", ""))).name
    arch = weights_meta.get("arch", "")
    random = source.startswith(RANDOM_H5.format(arch=arch, seed="").removesuffix(".h5"))
    return ((["random weights"] if random else [])
            + (["synthetic data"] if (Path(data) / MARKER).is_file() else []))


def inputs(directory: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
    """(image folder, weights directory) for a smoke run, made under `directory` (or reused)."""
    directory = Path(directory)
    data = make_image_folder(directory / "data", seed=seed)
    weights = make_random_weights(directory / "random_vgg16_notop", seed=seed)
    return str(data), str(weights)
