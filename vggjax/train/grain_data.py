"""The input pipeline without TensorFlow: Grain over an image folder or tfds' ArrayRecord
cats_vs_dogs (`tfds.data_source`), decoding with simplejpeg/Pillow.

Same contract as `vggjax.train.data` (a `splits.Split`: static-shape uint8 batches, the last one
padded and masked, order a function of (seed, epoch), `batches(epoch, skip=k)` resuming
bit-exactly, `shard` for multi-host): only the decoding differs. Files are listed by
ImageFolder's rule (`image_folder.list_folder`), decoded once up front (by the decoder the epochs use)
to skip unreadable ones (one `SkippedFilesWarning`), and at each epoch decoded, resized and
batched by Grain worker threads, one batch per thread at a time, written straight into its
array; only file paths (or tfds record numbers) are kept in memory, plus Grain's prefetch buffer
(2 batches per thread).

"bilinear" (the default) gives the pixels of Keras' `image_dataset_from_directory` and of
vggjax's tf.data pipeline: JPEGs decode with simplejpeg, libjpeg-turbo with the fast integer IDCT
and fancy upsampling, as `tf.io.decode_image` does (the same pixels), and the resize computes
what `tf.image.resize(method="bilinear")` computes, in float32, then rounds half to even like
`tf.round`. TurboJPEG cannot turn CMYK/YCCK JPEGs into RGB: those, damaged JPEGs (which Pillow
then accepts or refuses) and the other formats decode with Pillow (PNGs identical to TF, CMYK
within a uint8 step). "nearest" is the book's 1st edition (`flow_from_directory`, `load_img`):
Pillow's decoding (libjpeg's accurate IDCT) and nearest filter, as `load_img`.
"""
from __future__ import annotations

import collections.abc
import concurrent.futures
import functools
import io
import os
from typing import Mapping

import numpy as np

from vggjax.train.image_folder import decodable, list_folder
from vggjax.train.splits import BOOK_SPLITS, Split, check_tfds_split, tfds_slice, tfds_temp_cleanup
from vggjax.utils.batches import pad_batch
from vggjax.utils.extras import require

INTERPOLATIONS = ("bilinear", "nearest")
THREADS = min(8, os.cpu_count() or 1)


def load_split(source: str, split: str, image_size: int, batch_size: int, *, shuffle: bool,
               seed: int = 0, interpolation: str = "bilinear", data_dir: str | None = None,
               per_class: Mapping[str, int] = BOOK_SPLITS) -> Split:
    """One split of the image folder `source` (DIR/<split>/<class>/*.jpg), or of tfds
    cats_vs_dogs (`source="tfds"`, sliced as `splits.tfds_slice`, read with `tfds.data_source`
    from `data_dir` where it is prepared in ArrayRecord), as a Grain-decoded `Split`.
    ValueError for an unknown interpolation, a missing folder or dataset, or a split with no
    decodable image."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, found {interpolation!r}")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, found {image_size}, {batch_size}")
    if interpolation == "bilinear":
        require("simplejpeg", "the grain input pipeline")  # before any work
    if source == "tfds":
        class_names, encoded, labels, names = _tfds_records(split, data_dir, per_class)
        where, from_files = f"tfds cats_vs_dogs[{split}]", False
    else:
        class_names, encoded, labels = list_folder(source, split)
        names, where, from_files = encoded, os.path.join(source, split), True
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        ok = np.array(list(pool.map(functools.partial(_decodable, interpolation=interpolation), encoded)),
                      bool)
    keep, skipped = decodable(where, names, ok, labels, class_names)
    encoded = encoded.take(keep) if isinstance(encoded, Records) else tuple(encoded[i] for i in keep)
    return Split(name=split, class_names=tuple(class_names), image_size=image_size,
                 batch_size=batch_size, shuffle=shuffle, seed=seed,
                 labels=np.asarray(labels, np.int32)[keep], names=tuple(names[i] for i in keep),
                 skipped=skipped, encoded=encoded, from_files=from_files, decode=decode,
                 interpolation=interpolation)


class Records(collections.abc.Sequence):
    """The encoded images of records `rows` of a tfds data source, read when indexed: a split
    holds record numbers, never the images (ArrayRecord reads are random access)."""

    def __init__(self, source, rows):
        self.source, self.rows = source, np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> bytes:
        return self.source[int(self.rows[i])]["image"]

    def take(self, keep) -> "Records":
        return Records(self.source, self.rows[keep])


def tfds_source(data_dir: str | None = None):
    """tfds cats_vs_dogs' `train` split as a random-access source of {"image": JPEG bytes,
    "label", "image/filename"} records (`tfds.data_source`, never downloading). One-line
    ValueError when it is not prepared in ArrayRecord under `data_dir` (tfds' default if None)."""
    tfds = require("tensorflow_datasets", "the grain pipeline's tfds source")
    try:
        with tfds_temp_cleanup():
            source = tfds.data_source("cats_vs_dogs", split="train", data_dir=data_dir, download=False,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    except ImportError:
        raise
    except Exception as err:  # tfds raises AssertionError, DatasetNotFoundError, ... when unprepared
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"tfds cats_vs_dogs is not prepared in ArrayRecord under "
                         f"{data_dir or tfds.core.constants.DATA_DIR} ({type(err).__name__}: {first}); prepare "
                         "it with `tfds build cats_vs_dogs --file_format=array_record`") from None
    return source


def _tfds_records(split: str, data_dir: str | None, per_class: Mapping[str, int]):
    """(class_names, `Records`, labels, image/filenames) of the `split` slice of cats_vs_dogs."""
    check_tfds_split(split, per_class)  # before opening anything
    source = tfds_source(data_dir)
    class_names = source.dataset_info.features["label"].names

    def examples():  # one read per record: its label decides the slice, its name is kept if chosen
        for i in range(len(source)):
            record = source[i]
            yield int(record["label"]), (i, record["image/filename"])

    chosen = tfds_slice(examples(), split, class_names, per_class)
    rows = [i for _, (i, _) in chosen]
    names = [n.decode() if isinstance(n, bytes) else str(n) for _, (_, n) in chosen]
    return class_names, Records(source, rows), [label for label, _ in chosen], names


def decode(split: Split, idx: np.ndarray):
    """The local batches of examples `idx` (in order), padded to `split.local_batch_size`."""
    grain = require("grain", "the grain input pipeline")
    size, local = split.image_size, split.local_batch_size

    def batch(rows):
        image = np.empty((len(rows), size, size, 3), np.uint8)
        for k, i in enumerate(rows):
            _load(split.encoded[i], size, split.interpolation, image[k])
        return pad_batch({"image": image, "label": split.labels[rows]}, local)

    # One Grain element per batch, each decoded straight into its array by one worker thread;
    # the prefetch buffer (2 batches per thread) is all that is held.
    chunks = [idx[k:k + local] for k in range(0, len(idx), local)]
    ds = grain.MapDataset.source(chunks).map(batch)
    options = grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=2 * THREADS)
    return iter(ds.to_iter_dataset(options))


def _decodable(item, interpolation: str) -> bool:
    try:
        _decode(item, interpolation)
    except ValueError:
        return False
    return True


def _decode(item: str | bytes, interpolation: str) -> np.ndarray:
    """uint8 (H, W, 3) of an image file's path or encoded bytes (`item`) as the epochs decode it
    (module docstring): JPEGs with libjpeg-turbo's fast IDCT for "bilinear", everything else
    (and "nearest") with Pillow. ValueError naming the file when it cannot be decoded."""
    from vggjax.utils.images import load_image

    if isinstance(item, bytes):
        item = io.BytesIO(item)
    if interpolation == "bilinear":
        simplejpeg = require("simplejpeg", "the grain input pipeline")
        try:
            if isinstance(item, io.BytesIO):
                data = item.getvalue()
            else:
                with open(item, "rb") as f:
                    data = f.read()
        except OSError as err:
            raise ValueError(f"{item}: not a readable image ({err})") from None
        if data[:2] == b"\xff\xd8":
            try:
                return simplejpeg.decode_jpeg(data, "RGB", fastdct=True, fastupsample=False)
            except ValueError:
                pass  # CMYK/YCCK, which TurboJPEG cannot turn into RGB, or damaged: Pillow decides
    return load_image(item)


def _load(item: str | bytes, size: int, interpolation: str, out: np.ndarray) -> None:
    """Write the uint8 (size, size, 3) image of a file's path or encoded bytes, resized as the
    module docstring says, into `out`."""
    from vggjax.utils.images import load_image

    if interpolation == "nearest":
        out[...] = load_image(io.BytesIO(item) if isinstance(item, bytes) else item, (size, size), "nearest")
        return
    resized = resize_bilinear(_decode(item, interpolation), size, size)
    # tf.round (half to even); a lerp of uint8 values stays within 0..255, so no clipping.
    np.copyto(out, np.rint(resized, out=resized), casting="unsafe")


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (height, width, C) of an (H, W, C) image as TensorFlow's bilinear resize computes
    it (half-pixel centers, no antialiasing, edges clamped), in its order of float32 operations:
    top = tl + (tr - tl) * x_lerp, bottom likewise, out = top + (bottom - top) * y_lerp."""
    image = np.asarray(image)
    in_h, in_w, channels = image.shape
    rows, top_row, bottom_row, y_lerp = _row_taps(height, in_h)
    left, right, x_lerp = _column_taps(width, in_w, channels)
    # top and bottom depend only on the input row: lerp each row the output reads once, along
    # byte columns of the (rows, W * C) image (fancy indexing: numpy's fastest gather here).
    src = image.reshape(in_h, in_w * channels)[rows]
    lerped = src[:, left].astype(np.float32)
    delta = src[:, right].astype(np.float32)
    delta -= lerped
    delta *= x_lerp
    lerped += delta
    top, bottom = lerped[top_row], lerped[bottom_row]
    bottom -= top
    bottom *= y_lerp[:, None]
    top += bottom
    return top.reshape(height, width, channels)


@functools.lru_cache(maxsize=1024)
def _taps(n_out: int, n_in: int):
    """(low, high, lerp) source taps of TF's half-pixel bilinear resize from n_in to n_out."""
    scale = np.float32(n_in / n_out)
    x = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    low = np.floor(x)
    lerp = (x - low).astype(np.float32)
    return (np.clip(low, 0, n_in - 1).astype(np.intp), np.clip(np.ceil(x), 0, n_in - 1).astype(np.intp),
            lerp)


@functools.lru_cache(maxsize=1024)
def _row_taps(n_out: int, n_in: int):
    """(rows read, position of each output row's top and bottom row among them, lerp)."""
    low, high, lerp = _taps(n_out, n_in)
    rows, where = np.unique(np.concatenate([low, high]), return_inverse=True)
    return rows, where[:n_out], where[n_out:], lerp


@functools.lru_cache(maxsize=1024)
def _column_taps(n_out: int, n_in: int, channels: int):
    """(left, right, lerp) per byte of an output row: the taps of `_taps` repeated per channel."""
    low, high, lerp = _taps(n_out, n_in)
    offsets = np.arange(channels)
    return ((low[:, None] * channels + offsets).ravel(), (high[:, None] * channels + offsets).ravel(),
            np.repeat(lerp, channels))
