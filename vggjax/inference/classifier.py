"""A new classification head on a pretrained VGG conv base (the book's transfer-learning model),
and the classifier directory: written once, loaded and run on raw images without the training code.

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
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vggjax import weights

from vggjax.utils import atomic, digests
from vggjax.model.vgg import VGG, torch_pool
from vggjax.utils.batches import pad_batch
from vggjax.weights.preprocessing import MODES, check_images, preprocess_input
from vggjax.utils.trees import diff, digest, flatten, non_finite, unflatten

BASE, HEAD, CLASSIFIER = "base", "head.safetensors", "classifier.json"


POOLINGS = ("flatten", "avg", "max", "torch")  # how the head turns (N, H, W, C) features into vectors
ACTIVATIONS = ("relu", None)  # of the hidden layers: the book's relu, or none (its 2nd edition)


class Head(nn.Module):
    """pool -> [Dense(units) activation -> Dropout] ... -> Dense(num_outputs): the book's densely
    connected head, and the heads of Keras and torchvision models it imports.

    Input: (N, H, W, C) features, e.g. (N, 4, 4, 512) VGG16 features of 150x150 images.
    `pooling`: "flatten" (H, W, C order), global "avg" or "max", or "torch" (torchvision's
    adaptive average pool to 7x7, then flatten). `units`: one hidden layer's width, or a tuple
    of widths (() for none). Dropout sits in front of every Dense but the first hidden one.
    Output: (N, num_outputs) logits. With num_outputs=1 they are binary logits (the sigmoid
    lives in the loss); with more, class logits for softmax cross-entropy.
    Param names: "hidden", "hidden_1", ... {kernel (D, units), bias} and "logits" {kernel
    (units, num_outputs), bias}.
    """

    units: int | tuple[int, ...] = 256
    dropout_rate: float = 0.5
    num_outputs: int = 1
    pooling: str = "flatten"
    activation: str | None = "relu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return head_forward(self, _LinenHeadLayers(self, train), x)


# Keras Dense defaults (glorot_uniform kernel, zero bias), so the head starts as the book's.
HEAD_KERNEL_INIT = nn.initializers.glorot_uniform()


def hidden_layers(config: Head) -> list[tuple[str, int]]:
    """[(param name, width)] of the head's hidden Dense layers: "hidden", "hidden_1", ..."""
    widths = (config.units,) if isinstance(config.units, int) else tuple(config.units)
    return [("hidden" if i == 0 else f"hidden_{i}", w) for i, w in enumerate(widths)]


def check_head(config: Head) -> None:
    """ValueError (one line) for a pooling, activation or width the head does not have."""
    widths = [w for _, w in hidden_layers(config)]
    if config.pooling not in POOLINGS:
        raise ValueError(f"head pooling must be one of {POOLINGS}, found {config.pooling!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"head activation must be one of {ACTIVATIONS}, found {config.activation!r}")
    if not all(type(w) is int and w > 0 for w in [*widths, config.num_outputs]):
        raise ValueError(f"head widths must be positive integers, found units {config.units!r}, "
                         f"num_outputs {config.num_outputs!r}")


def pool_features(pooling: str, x):
    """(N, H, W, C) features -> (N, D) vectors, as `Head.pooling` says."""
    if pooling in ("avg", "max"):
        return jnp.mean(x, axis=(1, 2)) if pooling == "avg" else jnp.max(x, axis=(1, 2))
    if pooling == "torch":
        x = torch_pool(x)
    return x.reshape(x.shape[0], -1)


def head_forward(config: Head, layers, x):
    """The head's one forward pass, for both faces (Linen here, vggjax.nnx there): `layers`
    runs the Dense layers by name and the dropout. x: (N, ...) features -> (N, num_outputs) logits."""
    check_head(config)
    x = pool_features(config.pooling, jnp.asarray(x, config.dtype))
    for i, (name, width) in enumerate(hidden_layers(config)):
        x = layers.dense(name, width, layers.dropout(x) if i else x)
        x = nn.relu(x) if config.activation == "relu" else x
    return layers.dense("logits", config.num_outputs, layers.dropout(x))


class _LinenHeadLayers:
    def __init__(self, module: Head, train: bool):
        self.m, self.train = module, train

    def dense(self, name, units, x):
        return nn.Dense(units, name=name, dtype=self.m.dtype, param_dtype=self.m.param_dtype,
                        kernel_init=HEAD_KERNEL_INIT)(x)

    def dropout(self, x):
        return nn.Dropout(self.m.dropout_rate, deterministic=not self.train)(x)


class Classifier(nn.Module):
    """`head` on top of a headless VGG `base` (include_top=False).

    `__call__(x, train=False)`: x (N, H, W, 3) float images already preprocessed for the base's
    weights (see `preprocess_input`); returns (N, num_outputs) logits.
    Variables: {"params": {"base": <VGG params, Keras names>, "head": {...}}} plus
    {"batch_stats": {"base": ...}} for BatchNorm bases.
    `train` switches the head's dropout. The base's BatchNorm layers use their running statistics
    unless `train_base_batch_norm` is set, which is Keras' behaviour for a pretrained base
    (frozen or fine-tuned): a small new dataset would otherwise overwrite ImageNet statistics.
    """

    base: VGG
    head: Head
    train_base_batch_norm: bool = False

    def __call__(self, x, train: bool = False):
        features = self.base(x, train=train and self.train_base_batch_norm)
        return self.head(features, train=train)


def init_classifier(base_variables: Mapping, base_model: VGG, head: Head,
                    image_size: int | Sequence[int], key: jax.Array) -> tuple[Classifier, dict]:
    """(Classifier(base=base_model, head=head), its variables) with the pretrained base dropped in.

    base_variables: {"params": {...}[, "batch_stats": {...}]} of `base_model` (NumPy or JAX
    arrays, e.g. from the converters), not re-initialised. Only the head is initialised, from
    `key`, for the feature shape that `image_size` (int or (H, W)) gives. The variables are
    {"params": {"base", "head"}[, "batch_stats": {"base"}]} of JAX arrays. Raises ValueError
    when the base is not headless or `base_variables` does not fit `base_model`, naming the layers.
    """
    if base_model.include_top:
        raise ValueError("the classifier's base must be headless: create it with include_top=False")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    base_model.check_input((1, h, w, 3))
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    want = jax.eval_shape(base_model.init, key, images)
    if problems := diff(base_variables, want):
        raise ValueError("base variables do not fit the base model: " + "; ".join(problems))

    features = jax.eval_shape(base_model.apply, want, images)
    head_vars = head.init(key, jnp.zeros(features.shape, features.dtype))
    variables = {"params": {"base": dict(base_variables["params"]), "head": head_vars["params"]}}
    if "batch_stats" in base_variables:
        variables["batch_stats"] = {"base": dict(base_variables["batch_stats"])}
    return Classifier(base=base_model, head=head), jax.tree.map(jnp.asarray, variables)


def class_logits(logits: jax.Array) -> jax.Array:
    """float32 (N, K) logits of a classifier's output: a binary head's one logit l becomes
    (-l/2, l/2), whose softmax is (1 - sigmoid(l), sigmoid(l)). Predicting, exporting and
    Grad-CAM all go through this, so a binary head is two classes everywhere."""
    logits = logits.astype(jnp.float32)
    return jnp.concatenate([-logits / 2, logits / 2], axis=-1) if logits.shape[-1] == 1 else logits


def class_probabilities(model: nn.Module, preprocessing: str, variables, pixels) -> jax.Array:
    """The one "classify pixels" runner: uint8 or 0..255 float RGB (N, S, S, 3) -> float32
    (N, K) probabilities: `preprocessing`, `model` (whose output is class logits), softmax of
    `class_logits` (a binary head: (1 - sigmoid(l), sigmoid(l))). Traceable; `predict`, the
    files tool's `Predictor` and the exported serving function all run it."""
    logits = model.apply(variables, preprocess_input(pixels, preprocessing))
    return jax.nn.softmax(class_logits(logits))


@dataclasses.dataclass(eq=False)
class TrainedClassifier:
    """A headless VGG base plus a head, ready to classify raw images (see `predict`)."""

    model: Classifier
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
    config = {"head": head_config(head),
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


def head_config(head: Head) -> dict:
    """The head's options as classifier.json stores them (widths as a list when several)."""
    units = head.units if isinstance(head.units, int) else list(head.units)
    return {"units": units, "dropout_rate": head.dropout_rate, "num_outputs": head.num_outputs,
            "pooling": head.pooling, "activation": head.activation}


def head_from_config(config: Mapping) -> Head:
    """`head_config`'s inverse; exports written before pooling and activation existed get the
    book's flatten and relu."""
    units = config["units"]
    return Head(units=units if isinstance(units, int) else tuple(units),
                dropout_rate=config["dropout_rate"], num_outputs=config["num_outputs"],
                pooling=config.get("pooling", "flatten"), activation=config.get("activation", "relu"))


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
        head = head_from_config(config["head"])
        image_size, mode, names = config["image_size"], config["preprocessing"], config["class_names"]
        ok = (type(image_size) is int and isinstance(mode, str) and mode in MODES
              and isinstance(names, list) and all(isinstance(n, str) for n in names)
              and isinstance(config["base"], str))
        check_head(head)
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
    return TrainedClassifier(model=Classifier(base=base_weights.model, head=head), variables=variables,
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
    out = []
    for start in range(0, len(images), batch_size):
        batch = pad_batch({"image": images[start:start + batch_size]}, batch_size)
        out.append(np.asarray(classifier.probabilities(classifier.variables, batch["image"]))[batch["mask"]])
    k = max(classifier.model.head.num_outputs, 2)
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def export(*args, **kwargs) -> Path:
    """Deprecated alias of `save` (the word "export" names the shipping package, vggjax.export);
    goes in the next release."""
    warnings.warn("vggjax.inference.classifier.export is now classifier.save; the old name goes in "
                  "the next release", DeprecationWarning, stacklevel=2)
    return save(*args, **kwargs)
