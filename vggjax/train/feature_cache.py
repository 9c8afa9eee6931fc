"""Fast feature extraction: the conv base run once per split, its outputs cached on disk as .npy.

The book's first transfer-learning recipe: run the pretrained conv base over every image once,
keep the (N, h, w, 512) outputs, and train only a small head on them, with no augmentation.

    feats = extract(base_model, base_variables, {"train": train_split, ...}, cache_dir,
                    preprocess_mode="caffe")
    for batch in feats["train"].batches(epoch):   # {"features", "label", "mask"}: a splits.Batches
        ...

Cache layout: `cache_dir/<split name>-<key>/{features.npy, labels.npy, info.json}`, where the
key hashes everything the features depend on: the base's architecture, a digest of its
variables' bytes, the weights' metadata, the split's files (path, size, mtime) or tfds names,
the image size and the preprocessing mode. A second extraction with the same inputs opens the
cache (memory-mapped) without any forward pass. Features stream to a `.npy` memmap batch by
batch, so host memory does not grow with the dataset, and the directory is written under a
temporary name and renamed when complete: a killed run leaves no half cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.utils import atomic, disk
from vggjax.model.vgg import VGG, arch_name
from vggjax.train.splits import PIXELS, ArraySplit
from vggjax.weights.preprocessing import preprocess_input
from vggjax.utils.progress import progress_bar
from vggjax.utils.trees import digest

logger = logging.getLogger(__name__)

FEATURES, LABELS, INFO = "features.npy", "labels.npy", "info.json"
CACHE_VERSION = 4  # bump when the stored format or what goes into the key change (pixels: splits.PIXELS)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class FeatureSplit(ArraySplit):
    """Cached conv features of a split as `Batches`: arrays {"features": float32 (N, h, w, c),
    "label": int32 (N,)}, memory-mapped, in the split's unshuffled order; batches visit them in
    the split's own `epoch_order` (same shuffle and seed), so a FeatureSplit made from a shuffled
    train split shuffles the same way. Its batches: {"features", "label", "mask"}."""

    directory: Path
    reused: bool  # True when the cache already existed and no forward pass ran

    @property
    def features(self) -> np.ndarray:
        return self.arrays["features"]

    @property
    def labels(self) -> np.ndarray:
        return self.arrays["label"]


def make_extract_step(model: VGG, preprocess_mode: str) -> Callable:
    """Jitted `step(variables, images uint8 (B, S, S, 3)) -> float32 (B, h, w, c)` conv features,
    preprocessing inside the jit (so only uint8 crosses to the device)."""
    if model.include_top:
        raise ValueError("feature extraction needs a headless conv base: create it with include_top=False")

    def step(variables, images):
        return model.apply(variables, preprocess_input(images, preprocess_mode)).astype(jnp.float32)

    return jax.jit(step)


def cache_key(model: VGG, weights_id: str, split, preprocess_mode: str,
              weights_meta: Mapping | None = None) -> tuple[str, dict]:
    """(hex key, the JSON description it hashes) for the features of `split` computed by `model`
    with the weights whose `trees.digest` is `weights_id`."""
    if split.from_files:
        files = [[name, *_stat(name)] for name in split.names]
    else:
        files = list(split.names)
    pipeline = getattr(split, "pipeline", "tfdata")
    description = {
        "version": CACHE_VERSION,
        "arch": arch_name(model),
        # Every field of the module (pooling, dtype, conv algorithm, ...): each can change the output.
        "model": {f.name: str(getattr(model, f.name)) for f in dataclasses.fields(model)
                  if f.name not in ("parent", "name")},
        "variables_sha256": weights_id,
        "weights_meta": dict(weights_meta or {}),
        "split": split.name,
        "class_names": list(split.class_names),
        "files": files,
        "labels_blake2b": hashlib.blake2b(np.asarray(split.labels, np.int32).tobytes(),
                                          digest_size=16).hexdigest(),
        "image_size": split.image_size,
        "preprocessing": preprocess_mode,
        # Which decoder and filter made the pixels (tf.data and Grain may differ by a step).
        "pipeline": [pipeline, getattr(split, "interpolation", "bilinear"), PIXELS[pipeline]],
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], description


def extract(model: VGG, variables: Mapping, splits: Mapping[str, Any], cache_dir: str | os.PathLike,
            *, preprocess_mode: str, weights_meta: Mapping | None = None,
            progress: bool = True) -> dict[str, FeatureSplit]:
    """{name: FeatureSplit} with the conv features of every example of each `data.Split` in
    `splits`, cached under `cache_dir`.

    `model` is a headless VGG (include_top=False) and `variables` its {"params"[, "batch_stats"]}.
    Images are preprocessed with `preprocess_mode` inside the jitted forward pass (compiled
    once for all splits). Only real (unmasked) examples are stored, in each split's unshuffled
    file order. A split whose cache key is already on disk is opened memory-mapped without
    running the model (`FeatureSplit.reused`). `progress`: a bar per split extracted.
    """
    cache_dir = Path(cache_dir).absolute()
    weights_id = digest(variables)
    step = None
    out = {}
    for name, split in splits.items():
        key, description = cache_key(model, weights_id, split, preprocess_mode, weights_meta)
        final = cache_dir / f"{split.name}-{key}"
        if (final / INFO).is_file():
            logger.info(f"features of {split.name!r}: reusing {final}")
            out[name] = _open(final, split, reused=True)
            continue
        step = step or make_extract_step(model, preprocess_mode)
        logger.info(f"features of {split.name!r}: extracting {split.num_examples} examples to {final}")
        _write(final, step, variables, split, {"key": key, "inputs": description}, progress)
        out[name] = _open(final, split, reused=False)
    return out


def _write(final: Path, step: Callable, variables: Mapping, split, info: dict, progress: bool) -> None:
    """Run `step` over `split` in file order into `final`, via a temp dir renamed at the end."""
    with (atomic.writing(final, directory=True, overwrite=True) as tmp,
          progress_bar(total=split.num_examples, desc=f"features of {split.name!r}", unit="img",
                       enabled=progress) as bar):
        tmp.mkdir()
        n = split.num_examples
        features, labels, done = None, np.empty((n,), np.int32), 0
        for batch in dataclasses.replace(split, shuffle=False).batches(0):
            real = batch["mask"]
            count = int(real.sum())
            out = np.asarray(step(variables, batch["image"]))
            if features is None:
                features = np.lib.format.open_memmap(tmp / FEATURES, mode="w+", dtype=np.float32,
                                                     shape=(n, *out.shape[1:]))
                disk.reserve(tmp / FEATURES)  # a full disk: one OSError, not a SIGBUS
            features[done:done + count] = out[real]
            labels[done:done + count] = batch["label"][real]
            done += count
            bar.update(count)
        if done != n:
            raise RuntimeError(f"split {split.name!r} gave {done} examples, expected {n}")
        features_shape = features.shape
        features.flush()
        del features
        np.save(tmp / LABELS, labels)
        info = dict(info, shape=list(features_shape))
        (tmp / INFO).write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")


def _open(directory: Path, split, reused: bool) -> FeatureSplit:
    features = np.load(directory / FEATURES, mmap_mode="r")
    labels = np.load(directory / LABELS)
    if len(labels) != split.num_examples or not np.array_equal(labels, split.labels):
        raise ValueError(f"{directory}: cached labels do not match split {split.name!r} "
                         f"({len(labels)} cached, {split.num_examples} in the split)")
    return FeatureSplit(name=split.name, arrays={"features": features, "label": labels},
                        batch_size=split.batch_size, class_names=split.class_names,
                        shuffle=split.shuffle, seed=split.seed, directory=directory, reused=reused)


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
