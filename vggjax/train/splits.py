"""What a split is, whatever decodes it: the `Batches` protocol the training loop, the feature
cache and predict consume, its padded batches (`pad_batch`) and epoch order (`epoch_order`);
`Split` (image files or tfds records: order, sharding, padded static-shape batches) and
`ArraySplit` (arrays in memory); the book's splits and the check of an image folder's (its
listing: `vggjax.train.image_folder`). No
TensorFlow here: `vggjax.train.data` (tf.data) and `vggjax.train.grain_data` (Grain) decode a
`Split`'s batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import itertools
import math
import os
import re
import tempfile
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from vggjax.train.image_folder import SkippedFilesWarning, named, walk_split
from vggjax.utils.batches import pad_batch
from vggjax.utils.deprecation import moved_names

# The module that loads and decodes the splits of each pipeline (Config.pipeline, --pipeline).
PIPELINES = {"tfdata": "vggjax.train.data", "grain": "vggjax.train.grain_data"}
# The revision of the pixels each pipeline decodes: bump it when they change (a decoder or a
# resize rule), so feature caches and resumed runs made with the old pixels are not reused.
# grain 2: JPEGs through simplejpeg's fast IDCT (tf.data's pixels) instead of Pillow's.
PIXELS = {"tfdata": 1, "grain": 2}
# Moved to `vggjax.train.image_folder`.
__getattr__ = moved_names(__name__, dict.fromkeys(
    ("list_folder", "walk_split", "decodable", "IMAGE_EXTENSIONS"), "vggjax.train.image_folder"))
# Images per class in each split, in slicing order (the book's protocol: 2000/1000/1000).
BOOK_SPLITS = {"train": 1000, "validation": 500, "test": 500}
SPLITS = tuple(BOOK_SPLITS)  # the split names, a folder's DIR/<split>/ too
# The folders tfds' `tempfile.mkdtemp("tfds")` makes (tempfile's names: "tmp" + 8 of [a-z0-9_]).
_TFDS_TEMP = re.compile(r"tmp[a-z0-9_]{8}tfds")


class Batches(Protocol):
    """A split as `fit`, `evaluate` and the feature cache consume it: `steps_per_epoch` batches
    per epoch, each a dict of (batch_size, ...) arrays with "label" int32 and "mask" bool (False
    on the padding rows of the last batch), in an order fixed by the epoch."""

    name: str
    class_names: tuple[str, ...]
    batch_size: int
    steps_per_epoch: int

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The batches of `epoch` from batch `skip` on."""


def epoch_order(num_examples: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The example indices of `epoch`, int64 (num_examples,): a permutation seeded by
    (seed, epoch) when shuffling, else 0..N-1. Every split's order, so cached features
    shuffle exactly as the images they came from."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def check_skip(split: Batches, skip: int) -> None:
    """ValueError unless 0 <= skip <= split.steps_per_epoch."""
    if not 0 <= skip <= split.steps_per_epoch:
        raise ValueError(f"skip={skip} is outside 0..{split.steps_per_epoch} "
                         f"(the batches per epoch of split {split.name!r})")


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ArraySplit:
    """Arrays in memory (or memory-mapped) as `Batches`: `arrays` {key: (N, ...)} with a
    "label" int32 (N,) entry, e.g. {"image": uint8 (N, S, S, 3), "label"} or cached
    {"features", "label"}; batches in `epoch_order`, the last one padded (`pad_batch`)."""

    name: str
    arrays: Mapping[str, np.ndarray]
    batch_size: int
    class_names: tuple[str, ...] = ()
    shuffle: bool = False
    seed: int = 0

    @property
    def num_examples(self) -> int:
        return len(self.arrays["label"])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield {key: (batch_size, ...), "mask": bool (batch_size,)} for `epoch` from batch `skip` on."""
        check_skip(self, skip)
        order = epoch_order(self.num_examples, self.shuffle, self.seed, epoch)
        b = self.batch_size
        for start in range(skip * b, self.num_examples, b):
            idx = order[start:start + b]
            # Sorted reads touch a memmap in file order; `rank` puts them back in epoch order.
            rank = np.argsort(idx)
            rows = {}
            for key, value in self.arrays.items():
                rows[key] = np.empty((len(idx), *value.shape[1:]), value.dtype)
                rows[key][rank] = value[idx[rank]]
            yield pad_batch(rows, b)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of an image-classification dataset, ready to batch; see the module docstring."""

    name: str
    class_names: tuple[str, ...]
    image_size: int
    batch_size: int
    shuffle: bool
    seed: int
    labels: np.ndarray  # int32 (num_examples,)
    names: tuple[str, ...]  # file path (folder) or image/filename (tfds) of each example
    skipped: tuple[str, ...]  # files left out because they could not be decoded
    # Per example: a file path (from_files) or the encoded image bytes.
    encoded: tuple = dataclasses.field(repr=False)
    from_files: bool = True
    # Multi-host: this process reads rows [index*B/count, (index+1)*B/count) of every global batch.
    shard_index: int = 0
    shard_count: int = 1
    # The pipeline's decoder (data.decode, grain_data.decode): (split, example indices) -> batches.
    decode: Callable[["Split", np.ndarray], Iterator[dict[str, np.ndarray]]] | None = None
    interpolation: str = "bilinear"  # resizing filter ("nearest": grain only)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one padded: ceil(num_examples / batch_size)."""
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def local_batch_size(self) -> int:
        """Rows this process yields per batch: batch_size / shard_count."""
        return self.batch_size // self.shard_count

    def shard(self, index: int, count: int) -> "Split":
        """This split as process `index` of `count` reads it (one input pipeline per process).

        Every process walks the same global order and yields its own `batch_size / count` rows
        of each global batch, so all processes take the same number of steps and each example
        is seen by exactly one of them. ValueError unless `count` divides `batch_size`.
        """
        if count < 1 or not 0 <= index < count or self.batch_size % count:
            raise ValueError(f"cannot shard split {self.name!r} (batch size {self.batch_size}) "
                             f"as part {index} of {count}: the batch size must divide by the "
                             "process count")
        return dataclasses.replace(self, shard_index=index, shard_count=count)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch` (`epoch_order`)."""
        return epoch_order(self.num_examples, self.shuffle, self.seed, epoch)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield the batches of `epoch` from batch `skip` on (skipped images are never decoded).

        Each batch: {"image": uint8 (L, S, S, 3), "label": int32 (L,), "mask": bool (L,)} with
        L = `local_batch_size` (= batch_size unless sharded).
        """
        check_skip(self, skip)
        order = self.order(epoch)
        rows = [order[b * self.batch_size:(b + 1) * self.batch_size]
                [self.shard_index * self.local_batch_size:][:self.local_batch_size]
                for b in range(skip, self.steps_per_epoch)]
        idx = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
        if idx.size == 0:
            # Every process must take the same steps: a shard with no rows left pads them all.
            return iter([self._empty_batch()] * len(rows))
        # Only the epoch's last global batch can be short; a shard may then own none of its rows.
        missing = len(rows) - math.ceil(idx.size / self.local_batch_size)
        return itertools.chain(self.decode(self, idx), [self._empty_batch()] * missing)

    def _empty_batch(self) -> dict[str, np.ndarray]:
        """A batch of padding only (mask all False), for a shard with no rows left."""
        s = self.image_size
        return pad_batch({"image": np.zeros((0, s, s, 3), np.uint8),
                          "label": np.zeros((0,), np.int32)}, self.local_batch_size)


def loader(pipeline: str, tfds_data_dir: str | None = None):
    """`load_split(source, split, image_size, batch_size, *, shuffle, seed)` of `pipeline`
    ("tfdata" or "grain"); TensorFlow is imported only for tfdata."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(PIPELINES)}, found {pipeline!r}")
    load_split = importlib.import_module(PIPELINES[pipeline]).load_split
    return functools.partial(load_split, data_dir=tfds_data_dir)


def load_book_splits(data: str, image_size: int, batch_size: int, *, pipeline: str = "tfdata",
                     seed: int = 0, tfds_data_dir: str | None = None, check: bool = True) -> dict[str, Split]:
    """{"train" (shuffled), "validation", "test"}: the book's splits of an image folder
    (DIR/<split>/<class>/*.jpg, checked first unless the caller did: `check=False`) or of
    "tfds", decoded by `pipeline`."""
    if data != "tfds" and check:
        check_image_folder(data)
    load_split = loader(pipeline, tfds_data_dir)
    return {name: load_split(data, name, image_size, batch_size, shuffle=name == "train", seed=seed)
            for name in SPLITS}


def check_image_folder(root: str, splits=SPLITS) -> dict[str, dict[str, int]]:
    """{split: {class: number of images}} of `root/<split>/<class>/*`, checked before any decoding.

    ValueError naming the folder when a split is missing or empty, has fewer than 2 classes, a
    class folder holds no image, or the class names differ between splits (`Cats` vs `cats`
    would otherwise become extra classes). Files ImageFolder ignores (formats other than
    .jpg/.jpeg/.png, nested folders, files beside the class folders) are counted in one
    `SkippedFilesWarning`.
    """
    counts, ignored = {}, []
    for split in splits:
        split_dir, listed, others = walk_split(root, split)
        ignored += others
        classes = {}
        for name, paths in listed.items():
            # A folder named like an image is listed (ImageFolder's rule) but holds no pixels.
            images = [p for p in paths if os.path.isfile(p)]
            ignored += [p for p in paths if not os.path.isfile(p)]
            classes[name] = len(images)
        if len(classes) < 2:
            raise ValueError(f"{split_dir} has one class folder ({next(iter(classes))}); a classifier "
                             "needs at least 2")
        if empty := [c for c, n in classes.items() if n == 0]:
            raise ValueError(f"{split_dir}: class folder(s) {empty} hold no .jpg/.jpeg/.png image")
        counts[split] = classes
    first = splits[0]
    for split in splits[1:]:
        if sorted(counts[split]) != sorted(counts[first]):
            raise ValueError(f"the splits have different classes: {os.path.join(root, first)} has "
                             f"{sorted(counts[first])}, {os.path.join(root, split)} has "
                             f"{sorted(counts[split])}; every split needs the same class folders")
    if ignored:
        warnings.warn(f"{root}: ignored {len(ignored)} file(s) or folder(s) that are not .jpg/.jpeg/"
                      f".png images directly inside a class folder: {named(ignored)}",
                      SkippedFilesWarning, stacklevel=2)
    return counts


def check_tfds_split(split: str, per_class: Mapping[str, int] = BOOK_SPLITS) -> None:
    """ValueError unless `split` is one of the tfds slicing's splits (before anything is read)."""
    if split not in per_class:
        raise ValueError(f"unknown split {split!r} for source 'tfds'; expected one of {list(per_class)}")


def tfds_slice(examples: Iterable[tuple[int, Any]], split: str, class_names: Sequence[str],
               per_class: Mapping[str, int] = BOOK_SPLITS) -> list[tuple[int, Any]]:
    """The (label, item) pairs of the `split` slice of tfds cats_vs_dogs' one `train` split, the
    book's protocol: per class, ranks [start, start + per_class[split]) in record order, where
    start sums the earlier splits' counts. `examples` yields (label, item) in record order and is
    read only as far as needed. ValueError for an unknown split or too few examples."""
    check_tfds_split(split, per_class)
    names = list(per_class)
    start = sum(per_class[s] for s in names[:names.index(split)])
    stop = start + per_class[split]
    seen = np.zeros(len(class_names), np.int64)
    chosen = []
    for label, item in examples:
        if start <= seen[label] < stop:
            chosen.append((int(label), item))
        seen[label] += 1
        if seen.min() >= stop:
            return chosen
    raise ValueError(f"tfds cats_vs_dogs 'train' has {dict(zip(class_names, seen.tolist()))} "
                     f"images per class; split {split!r} needs {stop} of each")


@contextlib.contextmanager
def tfds_temp_cleanup():
    """Yields nothing; afterwards removes the empty `tmp*tfds` folders made in the meantime."""
    # tfds' DatasetInfo.initialize_from_bucket makes tempfile.mkdtemp("tfds") for any builder
    # whose data_dir has no dataset_info.json (a dataset not prepared yet) and never removes it.
    # tfds takes no folder for it, and pointing `tempfile.tempdir` elsewhere would move every
    # thread's temp files for the duration, so the leftovers are removed instead. Only empty
    # ones: tfds fills one only when its GCS access is on (4.9: never outside its own tests).
    temp = tempfile.gettempdir()
    before = _tfds_temp_dirs(temp)
    try:
        yield
    finally:
        for name in _tfds_temp_dirs(temp) - before:
            with contextlib.suppress(OSError):  # filled or removed meanwhile: not a leftover
                os.rmdir(os.path.join(temp, name))


def _tfds_temp_dirs(temp: str) -> set[str]:
    """The names in `temp` that `tempfile.mkdtemp("tfds")` makes: tmp + 8 random characters + tfds."""
    try:
        return {n for n in os.listdir(temp) if _TFDS_TEMP.fullmatch(n)}
    except OSError:
        return set()
