"""The classifier directory: a trained `heads.Classifier` (a new head on a pretrained VGG conv base)
written once, loaded and run on raw images without the training code.

Classifier directory layout (`save`):

    <export_dir>/
      base/              the conv base as a vggjax weights directory: `vggjax.load(export_dir/"base")`
                         gives the fine-tuned base with the input weights' Keras layer names and
                         metadata, its `preprocessing` set to the mode the classifier was trained with
      head.safetensors   the head's parameters, '/'-joined names ("hidden/kernel", "logits/bias", ...)
      classifier.json    head shape, image size, preprocessing, class names, phase

    clf = load_classifier(directory)
    probabilities = predict(clf, images)   # uint8 (N, S, S, 3) RGB at clf.image_size -> (N, K)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import warnings
import os
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vggjax import weights

from vggjax.utils import atomic, digests
from vggjax.inference import heads
from vggjax.utils.batches import run_padded
from vggjax.utils.deprecation import moved_names
from vggjax.weights.preprocessing import MODES, check_images, preprocess_input
from vggjax.utils.trees import diff, digest, flatten, non_finite, unflatten

BASE, HEAD, CLASSIFIER = "base", "head.safetensors", "classifier.json"
# Moved to `vggjax.inference.heads`.
__getattr__ = moved_names(__name__, dict.fromkeys(
    ("Head", "Classifier", "init_classifier", "class_logits", "hidden_layers", "head_forward", "check_head",
     "pool_features", "head_config", "head_from_config", "HEAD_KERNEL_INIT", "POOLINGS", "ACTIVATIONS"),
    "vggjax.inference.heads"))


def class_probabilities(model: nn.Module, preprocessing: str, variables, pixels) -> jax.Array:
    """The one "classify pixels" runner: uint8 or 0..255 float RGB (N, S, S, 3) -> float32
    (N, K) probabilities: `preprocessing`, `model` (whose output is class logits), softmax of
    `class_logits` (a binary head: (1 - sigmoid(l), sigmoid(l))). Traceable; `predict`, the
    files tool's `Predictor` and the exported serving function all run it."""
    logits = model.apply(variables, preprocess_input(pixels, preprocessing))
    return jax.nn.softmax(heads.class_logits(logits))


@dataclasses.dataclass(eq=False)
class TrainedClassifier:
    """A headless VGG base plus a head, ready to classify raw images (see `predict`)."""

    model: heads.Classifier
    variables: dict  # {"params": {"base", "head"}[, "batch_stats": {"base"}]}
    preprocessing: str  # the preprocess_input mode the classifier was trained with
    image_size: int
    class_names: tuple[str, ...]
    meta: dict = dataclasses.field(default_factory=dict)  # classifier.json when loaded

    def __post_init__(self):
        # One jitted (variables, pixels) -> (N, K) per classifier: every `predict` call after
        # the first reuses it.
        self.probabilities = jax.jit(functools.partial(class_probabilities, self.model, self.preprocessing))


def save(directory: str | os.PathLike, classifier: TrainedClassifier, base_meta: Mapping,
           info: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write `classifier` to `directory` in the layout of the module docstring; return the path.

    `base_meta`: the metadata of the weights the base started from (`Pretrained.meta`); the
    exported base keeps it, with include_top False and `preprocessing` set to the
    classifier's. `info`: extra JSON for classifier.json (e.g. phase, test accuracy). The
    directory is written under a temporary name and renamed: it is complete or absent.
    `overwrite` replaces a previous export (a directory holding classifier.json), nothing else.
    """
    from safetensors.numpy import save_file

    head = classifier.model.head
    params = classifier.variables["params"]
    base_variables = {"params": params["base"]}
    if "batch_stats" in classifier.variables:
        base_variables["batch_stats"] = classifier.variables["batch_stats"]["base"]
    meta = dict(base_meta, include_top=False, preprocessing=classifier.preprocessing)
    config = {"head": heads.head_config(head),
              "image_size": classifier.image_size, "preprocessing": classifier.preprocessing,
              "class_names": list(classifier.class_names), "base": BASE, **dict(info or {})}

    config["head_sha256"] = digest(params["head"])
    with atomic.writing(directory, directory=True, overwrite=overwrite) as tmp:
        tmp.mkdir()
        weights.save(tmp / BASE, jax.device_get(base_variables), meta)
        save_file({k: np.asarray(v) for k, v in flatten(params["head"]).items()}, str(tmp / HEAD))
        config["files"] = digests.of_files(tmp)  # checked by load_classifier
        (tmp / CLASSIFIER).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def load_classifier(directory: str | os.PathLike, base: str | os.PathLike | None = None,
                    verify: bool = True) -> TrainedClassifier:
    """Load an `export`ed classifier: the base via `vggjax.load`, the head from head.safetensors.

    The base is the one classifier.json names, which must lie inside `directory`; pass `base`
    to use another weights directory explicitly. The head must be finite, fit the base and
    match the `head_sha256` recorded at export, and every file the sha256 classifier.json records
    (`verify=False` skips the digests). ValueError (one line, naming the file) otherwise.
    """
    from safetensors.numpy import load_file

    directory = Path(directory).expanduser().absolute()
    where = directory / CLASSIFIER
    if not where.is_file():
        raise FileNotFoundError(f"{directory} is not a classifier directory: {CLASSIFIER} is missing")
    try:
        config = json.loads(where.read_text())
        head = heads.head_from_config(config["head"])
        image_size, mode, names = config["image_size"], config["preprocessing"], config["class_names"]
        ok = (type(image_size) is int and isinstance(mode, str) and mode in MODES
              and isinstance(names, list) and all(isinstance(n, str) for n in names)
              and isinstance(config["base"], str))
        heads.check_head(head)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where} is corrupt: {type(err).__name__}: {err}") from None
    if not ok:
        raise ValueError(f"{where} is invalid: image_size, preprocessing, class_names, head or "
                         "base has the wrong type or value")
    if verify and "files" in config:
        digests.check(directory, config["files"], where)
    elif verify:  # exported before vggjax recorded digests: still loads
        digests.note_unverified(directory, where)
    if base is None:
        base = (directory / config["base"]).resolve()
        if directory.resolve() not in base.parents:
            raise ValueError(f"{where} names base {config['base']!r}, outside the export; pass "
                             "base=... to load_classifier to use another weights directory")
    base_weights = weights.load(base, verify=verify)
    try:
        head_params = unflatten(load_file(str(directory / HEAD)))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{directory / HEAD} is damaged: {type(err).__name__}: "
                         f"{str(err).strip()[:160]}") from None
    features = jax.eval_shape(base_weights.model.apply, base_weights.variables,
                              jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    want = jax.eval_shape(head.init, jax.random.PRNGKey(0), features)["params"]
    problems = diff(head_params, want) or [f"{p}: contains NaN or Inf" for p in non_finite(head_params)]
    recorded = config.get("head_sha256")
    if not problems and verify and recorded is not None and digest(head_params) != recorded:
        problems = [f"its arrays do not match the head_sha256 recorded in {CLASSIFIER}"]
    if problems:
        raise ValueError(f"{directory / HEAD} is corrupt: " + "; ".join(problems))
    variables = {"params": {"base": base_weights.params, "head": jax.tree.map(jnp.asarray, head_params)}}
    if base_weights.batch_stats is not None:
        variables["batch_stats"] = {"base": base_weights.batch_stats}
    return TrainedClassifier(model=heads.Classifier(base=base_weights.model, head=head), variables=variables,
                             preprocessing=mode, image_size=image_size, class_names=tuple(names),
                             meta=config)


def predict(classifier: TrainedClassifier | str | os.PathLike, images, batch_size: int = 32,
            assume_range: str | None = None) -> np.ndarray:
    """Class probabilities for RGB images (uint8 or float 0..255, (N, S, S, 3), S = image_size).

    `classifier`: a `TrainedClassifier` or an export directory. Returns float32 (N, K), one
    column per `class_names` entry (a binary head too: (1 - p, p), p = sigmoid of its logit),
    the same array the files tool and the exported artifacts give.
    Images go through in batches of `batch_size` (the last one padded, so one compilation).
    Images that cannot be 0..255 RGB (0..1 floats, uint16, NaN, ...) are refused with
    ValueError (`preprocessing.check_images`; `assume_range` as there).
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, found {batch_size!r}")
    if not isinstance(classifier, TrainedClassifier):
        classifier = load_classifier(classifier)
    images = check_images(images, assume_range)
    s = classifier.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"expected RGB images of shape (N, {s}, {s}, 3) (the size this classifier "
                         f"was trained at), found {images.shape}")
    run = functools.partial(classifier.probabilities, classifier.variables)
    out = [run_padded(run, images[start:start + batch_size], batch_size)
           for start in range(0, len(images), batch_size)]
    k = max(classifier.model.head.num_outputs, 2)
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def export(*args, **kwargs) -> Path:
    """Deprecated alias of `save` (the word "export" names the shipping package, vggjax.export);
    goes in the next release."""
    warnings.warn("vggjax.inference.classifier.export is now classifier.save; the old name goes in "
                  "the next release", DeprecationWarning, stacklevel=2)
    return save(*args, **kwargs)
