"""What a training run leaves for people: history.json, results.json, curves.png, and the exported classifier.

Exported classifier layout (`export`), readable without the training code:

    <export_dir>/
      base/              the conv base as a vggjax weights directory: `vggjax.load(export_dir/"base")`
                         gives the fine-tuned base with the input weights' Keras layer names and
                         metadata, its `preprocessing` set to the mode the classifier was trained with
      head.safetensors   the head's parameters, '/'-joined names ("hidden/kernel", "logits/bias", ...)
      classifier.json    head shape, image size, preprocessing, class names, phase

    clf = load_classifier(export_dir)
    probabilities = predict(clf, images)   # images uint8 (N, S, S, 3) RGB at clf.image_size
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vggjax import pretrained
from vggjax.classifier import Classifier, Head
from vggjax.preprocessing import preprocess_input
from vggjax.weights import flatten, unflatten

HISTORY, RESULTS, CURVES = "history.json", "results.json", "curves.png"
BASE, HEAD, CLASSIFIER = "base", "head.safetensors", "classifier.json"


def update_json(path: str | os.PathLike, key: str, value: Any) -> dict:
    """Set `key` in the JSON object at `path` (created if absent), written atomically; return it all.

    Phases run in separate invocations accumulate in one file this way.
    """
    path = Path(path)
    content = json.loads(path.read_text()) if path.is_file() else {}
    content[key] = value
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))
    return content


def plot_curves(histories: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> Path:
    """Write the book's training plots to `path` (PNG): one column per phase, accuracy on top and
    loss below, training as dots and validation as a line, against the epoch.

    histories: {phase: [{"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}, ...]}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global pyplot state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    phases = [p for p, h in histories.items() if h]
    if not phases:
        raise ValueError("no history to plot: every phase is empty")
    fig = Figure(figsize=(4.5 * len(phases), 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(phases), squeeze=False)
    for col, phase in enumerate(phases):
        epochs = [r["epoch"] for r in histories[phase]]
        for row, metric in enumerate(("accuracy", "loss")):
            ax = axes[row, col]
            ax.plot(epochs, [r[metric] for r in histories[phase]], "bo", markersize=3,
                    label=f"Training {metric}")
            # The book's solid line, plus small crosses so a one-epoch run still shows its point.
            ax.plot(epochs, [r[f"val_{metric}"] for r in histories[phase]], "b-x", markersize=4,
                    label=f"Validation {metric}")
            ax.set_title(f"{phase}: training and validation {metric}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
    _write_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return Path(path)


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
        model, mode = self.model, self.preprocessing

        def probabilities(variables, images):
            logits = model.apply(variables, preprocess_input(images, mode)).astype(jnp.float32)
            return jax.nn.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else jax.nn.softmax(logits)

        # One jitted function per classifier: every `predict` call after the first reuses it.
        self.probabilities = jax.jit(probabilities)


def export(directory: str | os.PathLike, classifier: TrainedClassifier, base_meta: Mapping,
           info: Mapping | None = None) -> Path:
    """Write `classifier` to `directory` in the layout of the module docstring; return the path.

    `base_meta`: the metadata of the weights the base started from (`Pretrained.meta`); the
    exported base keeps it, with include_top False and `preprocessing` set to the
    classifier's. `info`: extra JSON for classifier.json (e.g. phase, test accuracy). The
    directory is written under a temporary name and renamed: it is complete or absent.
    """
    from safetensors.numpy import save_file

    head = classifier.model.head
    params = classifier.variables["params"]
    base_variables = {"params": params["base"]}
    if "batch_stats" in classifier.variables:
        base_variables["batch_stats"] = classifier.variables["batch_stats"]["base"]
    meta = dict(base_meta, include_top=False, preprocessing=classifier.preprocessing)
    config = {"head": {"units": head.units, "dropout_rate": head.dropout_rate,
                       "num_outputs": head.num_outputs},
              "image_size": classifier.image_size, "preprocessing": classifier.preprocessing,
              "class_names": list(classifier.class_names), "base": BASE, **dict(info or {})}

    def write(tmp: Path):
        tmp.mkdir()
        pretrained.save(tmp / BASE, jax.device_get(base_variables), meta)
        save_file({k: np.asarray(v) for k, v in flatten(params["head"]).items()}, str(tmp / HEAD))
        (tmp / CLASSIFIER).write_text(json.dumps(config, indent=2) + "\n")

    _write_atomically(Path(directory), write)
    return Path(directory)


def load_classifier(directory: str | os.PathLike) -> TrainedClassifier:
    """Load an `export`ed classifier: the base via `vggjax.load`, the head from head.safetensors."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not (directory / CLASSIFIER).is_file():
        raise FileNotFoundError(f"{directory} is not an exported classifier: {CLASSIFIER} is missing")
    config = json.loads((directory / CLASSIFIER).read_text())
    base = pretrained.load(directory / config["base"])
    head = Head(**config["head"])
    head_params = jax.tree.map(jnp.asarray, unflatten(load_file(str(directory / HEAD))))
    variables = {"params": {"base": base.params, "head": head_params}}
    if base.batch_stats is not None:
        variables["batch_stats"] = {"base": base.batch_stats}
    return TrainedClassifier(model=Classifier(base=base.model, head=head), variables=variables,
                             preprocessing=config["preprocessing"], image_size=config["image_size"],
                             class_names=tuple(config["class_names"]), meta=config)


def predict(classifier: TrainedClassifier | str | os.PathLike, images, batch_size: int = 32) -> np.ndarray:
    """Class probabilities for RGB images (uint8 or float 0..255, (N, S, S, 3), S = image_size).

    `classifier`: a `TrainedClassifier` or an export directory. Returns float32 (N,), the
    probability of `class_names[1]`, for a binary head; (N, K) softmax probabilities otherwise.
    Images go through in batches of `batch_size` (the last one padded, so one compilation).
    """
    if not isinstance(classifier, TrainedClassifier):
        classifier = load_classifier(classifier)
    images = np.asarray(images)
    s = classifier.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"expected RGB images of shape (N, {s}, {s}, 3) (the size this classifier "
                         f"was trained at), found {images.shape}")
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
        padded[:len(chunk)] = chunk
        out.append(np.asarray(classifier.probabilities(classifier.variables, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` then rename tmp to `path` (a file or a directory), replacing what was there."""
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if tmp.is_dir():
            pretrained.replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
