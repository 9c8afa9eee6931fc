"""A VGG16 with top and seeded random weights in the published Keras file, converted, plus JPEGs:
the shared set-up of the Grad-CAM and predict parity tests."""
from pathlib import Path

import numpy as np
from PIL import Image

import vggjax
from vggjax.keras_weights import write_legacy_h5

INPUT_RMS = 70.0  # caffe-preprocessed 0..255 images: keeps random-weight activations O(1)


def write_vgg16(directory: Path, random_variables, seed: int = 0,
                logit_scale: float = 1.0) -> tuple[dict, Path, Path]:
    """(params, legacy h5 path, converted weights dir) of a VGG16 with top (553 MB of h5)."""
    params = random_variables("vgg16", include_top=True, seed=seed, input_rms=INPUT_RMS,
                              logit_scale=logit_scale)["params"]
    h5 = directory / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    write_legacy_h5(params, h5, names="keras1")
    converted = directory / "converted"
    vggjax.convert_file("keras", "vgg16", h5, converted, include_top=True)
    return params, h5, converted


def write_jpegs(directory: Path, sizes, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields with a few bright discs) of (height, width) `sizes`."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([128 + 100 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(1, 7) * yy
                                           + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
        for _ in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * max(h, w)
            img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = \
                rng.integers(0, 256, 3)
        path = directory / f"photo{k}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths
