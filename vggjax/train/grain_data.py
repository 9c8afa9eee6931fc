"""The input pipeline without TensorFlow: Grain over an image folder, decoding with Pillow.

Same contract as `vggjax.train.data` (a `splits.Split`: static-shape uint8 batches, the last one
padded and masked, order a function of (seed, epoch), `batches(epoch, skip=k)` resuming
bit-exactly, `shard` for multi-host): only the decoding differs. Files are listed by
ImageFolder's rule (`splits.list_folder`), decoded once up front to skip unreadable ones (one
`SkippedFilesWarning`), and at each epoch decoded, resized and batched by Grain worker threads;
only file paths are kept in memory, plus Grain's bounded prefetch buffer.

Resizing: "bilinear" computes what `tf.image.resize(method="bilinear")` (Keras'
`image_dataset_from_directory`, and vggjax's tf.data pipeline) computes, in float32, then
rounds half to even like `tf.round`; "nearest" is Pillow's nearest filter, what the book's 1st
edition (`flow_from_directory`, `load_img`) used. JPEG decoding is Pillow's (libjpeg's accurate
integer IDCT, as Keras' `load_img`); TensorFlow's `decode_image` uses the fast integer IDCT, so
JPEG pixels differ from the tf.data pipeline's by up to a few uint8 steps (4 in the tests, about
two thirds of the values by one or more); PNGs are identical.
"""
from __future__ import annotations

import concurrent.futures
import os
import warnings

import numpy as np

from vggjax.train.splits import SkippedFilesWarning, Split, list_folder, named, pad_batch
from vggjax.utils.extras import require

INTERPOLATIONS = ("bilinear", "nearest")
THREADS = min(8, os.cpu_count() or 1)


def load_split(source: str, split: str, image_size: int, batch_size: int, *, shuffle: bool,
               seed: int = 0, interpolation: str = "bilinear") -> Split:
    """One split of the image folder `source` (DIR/<split>/<class>/*.jpg) as a Grain-decoded
    `Split`. ValueError for tfds (prepare an image folder instead), an unknown interpolation, a
    missing folder or a split with no decodable image."""
    if source == "tfds":
        raise ValueError("the grain pipeline reads image folders (DIR/<split>/<class>/*.jpg); for "
                         "tfds cats_vs_dogs use the tfdata pipeline")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, found {interpolation!r}")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, found {image_size}, {batch_size}")
    class_names, paths, labels = list_folder(source, split)
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        ok = np.array(list(pool.map(_decodable, paths)), bool)
    where = os.path.join(source, split)
    skipped = tuple(p for p, good in zip(paths, ok) if not good)
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} of {len(paths)} files that could not be "
                      f"read or decoded as images: {named(skipped)}", SkippedFilesWarning, stacklevel=2)
    if not ok.any():
        raise ValueError(f"{where}: none of its {len(paths)} files could be decoded as an image")
    keep = np.flatnonzero(ok)
    kept = tuple(paths[i] for i in keep)
    return Split(name=split, class_names=tuple(class_names), image_size=image_size,
                 batch_size=batch_size, shuffle=shuffle, seed=seed,
                 labels=np.asarray(labels, np.int32)[keep], names=kept, skipped=skipped,
                 encoded=kept, from_files=True, pipeline="grain", interpolation=interpolation)


def decode(split: Split, idx: np.ndarray):
    """The local batches of examples `idx` (in order), padded to `split.local_batch_size`."""
    grain = require("grain", "the grain input pipeline")
    size, local = split.image_size, split.local_batch_size

    def example(i):
        return _load(split.encoded[i], size, split.interpolation), split.labels[i]

    def pad(rows):
        return pad_batch({"image": np.stack([r[0] for r in rows]),
                          "label": np.asarray([r[1] for r in rows], np.int32)}, local)

    ds = grain.MapDataset.source(list(idx)).map(example).batch(local, batch_fn=pad)
    options = grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=2 * local)
    return iter(ds.to_iter_dataset(options))


def _decodable(path: str) -> bool:
    from vggjax.utils.images import load_image

    try:
        load_image(path)
    except ValueError:
        return False
    return True


def _load(path: str, size: int, interpolation: str) -> np.ndarray:
    """uint8 (size, size, 3) of the image file at `path`, resized as the module docstring says."""
    from vggjax.utils.images import load_image

    if interpolation == "nearest":
        return load_image(path, (size, size), "nearest")
    resized = resize_bilinear(load_image(path), size, size)
    return np.clip(np.rint(resized, out=resized), 0, 255, out=resized).astype(np.uint8)  # tf.round: half to even


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (height, width, C) of an (H, W, C) image as TensorFlow's bilinear resize computes
    it (half-pixel centers, no antialiasing, edges clamped), in its order of float32 operations."""
    image = np.asarray(image)

    def taps(n_out: int, n_in: int):
        scale = np.float32(n_in / n_out)
        x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        low = np.floor(x)
        lerp = (x - low).astype(np.float32)
        lo = np.clip(low, 0, n_in - 1).astype(np.int64)
        hi = np.clip(np.ceil(x), 0, n_in - 1).astype(np.int64)
        return lo, hi, lerp

    y0, y1, ly = taps(height, image.shape[0])
    x0, x1, lx = taps(width, image.shape[1])
    lx = lx[None, :, None]
    # Only the rows and columns the output reads are converted to float32 (the same values).
    r0, r1 = image[y0].astype(np.float32), image[y1].astype(np.float32)
    top, bottom = np.take(r0, x0, axis=1), np.take(r1, x0, axis=1)  # the left taps, then
    right = np.take(r0, x1, axis=1)                                 # a + (b - a) * t in place
    top += np.multiply(np.subtract(right, top, out=right), lx, out=right)
    right = np.take(r1, x1, axis=1)
    bottom += np.multiply(np.subtract(right, bottom, out=right), lx, out=right)
    bottom -= top
    bottom *= ly[:, None, None]
    top += bottom
    return top
