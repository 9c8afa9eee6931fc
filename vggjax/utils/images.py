"""Image files in and out: Keras `load_img`-exact reading and resizing, atomic PNG writing (Pillow)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vggjax.utils import atomic
from vggjax.utils.extras import require

# keras.utils.load_img's names for Pillow's resampling filters; its default is "nearest".
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "hamming", "box", "lanczos")


def _pil():
    """Pillow's Image module, or an ImportError naming the extra that installs it."""
    return require("PIL.Image", "reading, resizing and writing image files")


def load_image(path: str | os.PathLike | BinaryIO, target_size: tuple[int, int] | None = None,
               interpolation: str = "nearest") -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file (a path or an open binary file), as
    `keras.utils.load_img(path, target_size)`.

    Like Keras: any mode is converted to RGB, and the image is resized to `target_size`
    (height, width) with Pillow's `interpolation` filter only when its size differs. Raises
    ValueError naming the file when it cannot be decoded.
    """
    Image = _pil()
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, found {interpolation!r}")
    if isinstance(path, (str, os.PathLike)):
        path = os.path.expanduser(path)
    try:
        with Image.open(path) as img:
            img = _rgb8(img)
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path}: too large to decode safely ({err})") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    if target_size is not None:
        width_height = (int(target_size[1]), int(target_size[0]))
        if img.size != width_height:
            img = img.resize(width_height, getattr(Image.Resampling, interpolation.upper()))
    return np.asarray(img, np.uint8)


def _rgb8(img):
    """An 8-bit RGB Pillow image of `img`, as the training pipeline's decoder sees it: 16-bit
    grayscale scaled to 8 bits by its high byte (Pillow's own convert clips it to 255 instead)."""
    Image = _pil()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        high = (np.asarray(img, np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    img = img.convert("RGB") if img.mode != "RGB" else img
    img.load()
    return img


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """`image` (H, W) float or (H, W, 3) uint8 resized to `size` (height, width) with Pillow."""
    Image = _pil()
    image = np.asarray(image)
    pil = Image.fromarray(image.astype(np.float32) if image.ndim == 2 else image.astype(np.uint8))
    out = pil.resize((int(size[1]), int(size[0])), getattr(Image.Resampling, interpolation.upper()))
    return np.asarray(out)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 image to `path` as PNG, atomically; return the path."""
    Image = _pil()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"save_png expects (H, W) or (H, W, 3) uint8, found {image.shape} {image.dtype}")
    with atomic.writing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)
