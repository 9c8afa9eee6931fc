"""Input pipelines: the book's cats-vs-dogs splits, from tfds or from a folder, as padded uint8 batches.

`load_split` returns a `Split` whose `batches(epoch, skip=k)` yields NumPy dicts of one static
shape, so a jitted step never recompiles:

    {"image": uint8 (B, S, S, 3), "label": int32 (B,), "mask": bool (B,)}

The last batch of an epoch is padded (zeros, label 0) and `mask` marks the real examples, so an
evaluation sees every example exactly once. With `shuffle=True` the order is a NumPy permutation
seeded by `(seed, epoch)`: reproducible, different each epoch, and `skip=k` starts the epoch at
batch k without decoding the skipped images (a resumed run continues bit-exactly).

Sources:

- `"tfds"`: tfds `cats_vs_dogs` has one `train` split of 23,262 images. It is read in its
  deterministic record order (`shuffle_files=False`) and sliced like the book's copy script
  (cat.0-999 train, cat.1000-1499 validation, cat.1500-1999 test): per class, the first 1000
  images go to `train`, the next 500 to `validation`, the next 500 to `test` (`BOOK_SPLITS`), so
  each split is balanced and disjoint from the others. Reading stops as soon as the requested
  split is complete; its encoded JPEGs are kept in memory (about 35 MB per 1000 images).
- a directory `DIR/{train,validation,test}/<class>/*.jpg`: listed by `image_folder.list_folder`, the
  rule of `tfds.folder_dataset.ImageFolder` (class names the sorted class directories, labels
  their index, `.jpg/.jpeg/.png` in any case, other files ignored), as the Grain pipeline lists
  it. ImageFolder itself is not used: it walks every split at each call, and its `as_dataset`
  decodes inside the pipeline, so one bad file kills an epoch, and its shuffle is unseeded.

Every image is decoded once up front, in parallel, with the very decoder the epochs use
(`tf.io.decode_image(channels=3)`, which turns grayscale, palette, 16-bit, RGBA (alpha dropped,
as Keras' loaders do) and CMYK JPEGs into RGB). Files it cannot read or decode (zero-byte,
truncated, not an image) are skipped and reported in ONE `SkippedFilesWarning` naming them;
`Split.skipped` lists them all. Each epoch then decodes, resizes to (S, S) with bilinear
interpolation (as Keras' `image_dataset_from_directory`, no aspect-preserving crop), rounds to
uint8 and prefetches. Images stay uint8 until the device does the float work.

This is the training side's only module that imports TensorFlow (`vggjax.export.savedmodel`, the
SavedModel writer, is the other). Importing it changes nothing global;
`load_split`, the first TF work, hides the GPUs from TF so that TF never claims memory JAX needs.
"""
from __future__ import annotations

import functools
import os
from typing import Iterator, Mapping

import numpy as np

from vggjax.utils.extras import require
from vggjax.train.image_folder import IMAGE_EXTENSIONS, SkippedFilesWarning, decodable, list_folder  # noqa: F401
from vggjax.train.splits import (BOOK_SPLITS, Split, check_image_folder, check_tfds_split,  # noqa: F401
                                 tfds_slice, tfds_temp_cleanup)

tf = require("tensorflow", "vggjax.train.data (tf.data input pipelines)")
tfds = require("tensorflow_datasets", "vggjax.train.data")


@functools.cache
def keep_tf_off_gpus() -> None:
    """Hide the GPUs from TensorFlow before its first op: tf.data decodes on the CPU, and TF
    would otherwise reserve most of each GPU's memory, which JAX needs. Once per process."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF's devices were already initialised by the caller's own TF code; their choice stands.

def decode(split: Split, idx: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """The local batches of examples `idx` (in order), decoded and resized by tf.data, padded to
    `split.local_batch_size` with their mask."""
    ds = tf.data.Dataset.from_tensor_slices(
        {"encoded": tf.constant([split.encoded[i] for i in idx]), "label": split.labels[idx]})
    size, from_files = split.image_size, split.from_files

    def load(example):
        image = _decode(_read(example["encoded"], from_files))
        image = tf.image.resize(image, (size, size), method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return {"image": image, "label": example["label"]}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    local = split.local_batch_size
    ds = ds.batch(local).map(_pad_to(local, size))
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def load_split(source: str, split: str, image_size: int, batch_size: int, *, shuffle: bool,
               seed: int = 0, data_dir: str | None = None,
               per_class: Mapping[str, int] = BOOK_SPLITS) -> Split:
    """Load one split of cats-vs-dogs (`source="tfds"`) or of an image folder (`source=DIR`).

    `data_dir` is tfds' data directory (tfds source only). `per_class` is the tfds slicing:
    images per class for each split, in order. Undecodable files are skipped with one
    `SkippedFilesWarning`. Raises ValueError for an unknown split, a missing folder, too few
    tfds examples or a split with no decodable image.
    """
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, found {image_size}, {batch_size}")
    keep_tf_off_gpus()
    if source == "tfds":
        class_names, encoded, labels, names = _tfds_examples(split, data_dir, per_class)
        from_files, where = False, f"tfds cats_vs_dogs[{split}]"
    else:
        class_names, encoded, labels, names = _folder_examples(source, split)
        from_files, where = True, os.path.join(source, split)
    keep, skipped = decodable(where, names, _decodable(encoded, from_files), labels, class_names)
    return Split(name=split, class_names=tuple(class_names), image_size=image_size,
                 batch_size=batch_size, shuffle=shuffle, seed=seed,
                 labels=np.asarray(labels, np.int32)[keep],
                 names=tuple(names[i] for i in keep), skipped=skipped,
                 encoded=tuple(encoded[i] for i in keep), from_files=from_files, decode=decode)


def _tfds_examples(split: str, data_dir: str | None, per_class: Mapping[str, int]):
    """(class_names, encoded images, labels, image/filenames) of the `split` slice
    (`splits.tfds_slice`) of cats_vs_dogs, read with tfds.load."""
    check_tfds_split(split, per_class)  # before any download
    with tfds_temp_cleanup():
        ds, info = tfds.load("cats_vs_dogs", split="train", shuffle_files=False, data_dir=data_dir,
                             with_info=True, decoders={"image": tfds.decode.SkipDecoding()})
    class_names = info.features["label"].names
    examples = ((int(e["label"]), (e["image"], e["image/filename"].decode())) for e in ds.as_numpy_iterator())
    chosen = tfds_slice(examples, split, class_names, per_class)
    return (class_names, [e for _, (e, _) in chosen], [label for label, _ in chosen],
            [name for _, (_, name) in chosen])


def _folder_examples(root: str, split: str):
    """(class_names, paths, labels, paths as names) of `root/split` (`image_folder.list_folder`)."""
    if not tf.io.gfile.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist (expected {root}/<split>/<class>/*.jpg)")
    if not os.path.isdir(os.path.join(root, split)):
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise ValueError(f"image folder {root!r} has no split {split!r}; found {found}")
    class_names, paths, labels = list_folder(root, split)
    return class_names, paths, labels, paths


def _read(encoded: tf.Tensor, from_files: bool) -> tf.Tensor:
    return tf.io.read_file(encoded) if from_files else encoded


def _decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP -> uint8 (H, W, 3); the one decoder both validation and epochs use."""
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _decodable(encoded, from_files: bool) -> np.ndarray:
    """bool (N,): which items read and decode. Decodes each once, in parallel; a failing item
    is dropped by `ignore_errors`, so the surviving indices are the good ones."""
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(encoded)), tf.constant(list(encoded))))
    ds = ds.map(lambda i, x: (i, tf.shape(_decode(_read(x, from_files)))),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    ok = np.zeros(len(encoded), bool)
    for i, _ in ds.as_numpy_iterator():
        ok[i] = True
    return ok


def _pad_to(batch_size: int, size: int):
    """Pad a (possibly short) batch to `batch_size` rows and add the mask of real rows."""
    def pad(batch):
        n = tf.shape(batch["label"])[0]
        missing = batch_size - n
        image = tf.pad(batch["image"], [[0, missing], [0, 0], [0, 0], [0, 0]])
        label = tf.pad(tf.cast(batch["label"], tf.int32), [[0, missing]])
        return {"image": tf.ensure_shape(image, (batch_size, size, size, 3)),
                "label": tf.ensure_shape(label, (batch_size,)),
                "mask": tf.ensure_shape(tf.range(batch_size) < n, (batch_size,))}
    return pad
