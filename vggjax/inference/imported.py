"""Classifiers trained elsewhere, written as vggjax classifier directories (the layout of
`classifier.save`, so load_classifier, `vggjax predict`, `vggjax export`, Grad-CAM and the
workflow's fine-tuning take them): a whole Keras model (`from_keras`), a fine-tuned torchvision
or timm VGG state dict (`from_torch`).

    clf = from_keras("fine_tuning.keras", "imported/catsdogs", class_names=["cats", "dogs"])
    probabilities = classifier.predict(clf, images)   # uint8 (N, 180, 180, 3) -> (N, 2)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from vggjax.inference.heads import Classifier, Head, hidden_layers
from vggjax.inference.classifier import CLASSIFIER, TrainedClassifier, save
from vggjax.model.vgg import TOP, create, without_top
from vggjax.utils import atomic, digests
from vggjax.utils.trees import diff
from vggjax.weights.keras_model import read_keras_model
from vggjax.weights.preprocessing import MODES
from vggjax.weights.store import SOURCES


def parse_class_names(text: str) -> tuple[str, ...]:
    """"cats,dogs" -> ("cats", "dogs"); the name of an existing file -> its non-empty lines."""
    if os.path.isfile(text):
        with open(text) as f:
            names = [line.strip() for line in f]
    else:
        names = [n.strip() for n in text.split(",")]
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--class-names {text!r}: expected distinct names, comma-separated or one a "
                         f"line in a file, found {names}")
    return tuple(names)


def from_keras(path: str | os.PathLike, output: str | os.PathLike, preprocess: str | None = None,
               class_names: Sequence[str] | None = None, image_size: int | None = None,
               architecture: str | os.PathLike | None = None, overwrite: bool = False) -> TrainedClassifier:
    """Import a whole Keras model (`weights.keras_model`: .h5 from model.save, .keras, or
    .weights.h5 with `architecture`) into the classifier directory `output`; return it.

    `preprocess`: what the model's inputs were when nothing inside it says ("rescale" for the
    1st edition's x/255, "caffe" for vgg16.preprocess_input applied outside); recorded in
    classifier.json and the base's metadata. `class_names`: one per output column (default "0",
    "1", ...). `image_size`: only where the model's Input leaves it open.
    """
    path = os.fspath(path)
    if preprocess is not None and preprocess not in MODES:
        raise ValueError(f"--preprocess must be one of {sorted(MODES)}, found {preprocess!r}")
    atomic.check_target(output, directory=True, overwrite=overwrite, protect=[path])
    m = read_keras_model(path, architecture)
    if m.preprocessing and preprocess not in (None, m.preprocessing):
        raise ValueError(f"{path} preprocesses its inputs itself ({m.preprocessing}): drop "
                         f"--preprocess {preprocess}, or it would be applied twice")
    mode = m.preprocessing or preprocess
    if mode is None:
        raise ValueError(f"{path} has no preprocessing inside (no preprocess_input or Rescaling "
                         "layer): say what its inputs were with --preprocess (rescale for x/255 as "
                         "the book's 1st edition, caffe for vgg16.preprocess_input done outside)")
    size = _image_size(m.image_size, image_size, path)
    widths = [h["kernel"].shape[1] for h in m.hidden]
    head = Head(units=widths[0] if len(widths) == 1 else tuple(widths), dropout_rate=m.dropout_rate,
                num_outputs=int(m.output["kernel"].shape[1]), pooling=m.pooling, activation=m.activation)
    head_params = {name: arrays for (name, _), arrays in zip(hidden_layers(head), m.hidden)}
    head_params["logits"] = m.output
    meta = dict(SOURCES["keras"], arch=m.arch, source="keras", include_top=False, preprocessing=mode)
    return _write(path, output, m.arch, meta, m.base, head, head_params, size, class_names,
                  dict(keras_output_activation=m.output_activation), overwrite)


def from_torch(path: str | os.PathLike, arch: str, output: str | os.PathLike,
               class_names: Sequence[str] | None = None, source: str = "torchvision",
               image_size: int = 224, overwrite: bool = False) -> TrainedClassifier:
    """Import a torchvision or timm VGG state dict whose classifier was replaced (e.g.
    `classifier[6] = nn.Linear(4096, 2)`; .pth read without running its pickle, or
    .safetensors) into the classifier directory `output`; return it.

    The head is torchvision's: adaptive 7x7 average pool, fc1 and fc2 (4096, relu, dropout
    0.5), then the file's own classifier; its softmax gives the probabilities.
    """
    from vggjax.weights.torch import read_torch_file  # safetensors imported lazily

    path = os.fspath(path)
    if source not in ("torchvision", "timm"):
        raise ValueError(f"from_torch reads torchvision or timm state dicts, not {source!r}")
    create(arch, include_top=False).check_input((1, image_size, image_size, 3))  # before reading
    atomic.check_target(output, directory=True, overwrite=overwrite, protect=[path])
    variables, include_top = read_torch_file(path, arch)
    if not include_top:
        raise ValueError(f"{path} holds no classifier (classifier.* or pre_logits.*/head.fc.*): "
                         "nothing to import as a classifier")
    params = variables["params"]
    head = Head(units=(params["fc1"]["kernel"].shape[1], params["fc2"]["kernel"].shape[1]),
                dropout_rate=0.5, num_outputs=int(params["predictions"]["kernel"].shape[1]),
                pooling="torch", activation="relu")
    head_params = dict(zip([name for name, _ in hidden_layers(head)] + ["logits"],
                           (params[name] for name in TOP)))
    base = dict(variables, params=without_top(params))
    meta = dict(SOURCES[source], arch=arch, source=source, include_top=False)
    return _write(path, output, arch, meta, base, head, head_params, image_size, class_names, {},
                  overwrite)


def _image_size(found: tuple, given: int | None, path: str) -> int:
    """The classifier's square input size: the model's Input, or `given` where that is open."""
    if None not in found:
        h, w = found
        if h != w:
            raise ValueError(f"{path} takes {h}x{w} images; vggjax classifiers take square ones")
        if given not in (None, h):
            raise ValueError(f"--image-size {given} differs from the {h}x{w} input of {path}")
        return int(h)
    if given is None:
        raise ValueError(f"{path} leaves its input size open: give it with --image-size")
    return given


def _write(path: str, output, arch: str, meta: Mapping, base: Mapping, head: Head,
           head_params: Mapping, image_size: int, class_names, info: Mapping,
           overwrite: bool) -> TrainedClassifier:
    """Check the head fits the base at `image_size`, export, and load the result back."""
    k = max(head.num_outputs, 2)
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(k))
    if len(names) != k:
        raise ValueError(f"--class-names gives {len(names)} name(s) {list(names)}, but {path} "
                         f"has {k} classes")
    model = Classifier(base=create(arch, include_top=False), head=head)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    model.base.check_input(images.shape)
    features = jax.eval_shape(model.base.init_with_output, jax.random.PRNGKey(0), images)[0]
    want = jax.eval_shape(head.init, jax.random.PRNGKey(0), features)["params"]
    if problems := diff(dict(head_params), want):
        raise ValueError(f"{path}: the Dense layers do not fit {arch}'s features of {image_size}x"
                         f"{image_size} images: " + "; ".join(problems))
    variables = {"params": {"base": dict(base["params"]), "head": dict(head_params)}}
    if "batch_stats" in base:
        variables["batch_stats"] = {"base": dict(base["batch_stats"])}
    source = dict(file=os.path.abspath(path), sha256=digests.file_digest(path), **info)
    meta = dict(meta, source_file=source["file"], source_sha256=source["sha256"])
    clf = TrainedClassifier(model=model, variables=variables, preprocessing=meta["preprocessing"],
                            image_size=image_size, class_names=names)
    written = save(output, clf, meta, info={"phase": "imported", "imported_from": source},
                     overwrite=overwrite)  # the base is reloaded and compared there, bit for bit
    return dataclasses.replace(clf, meta=json.loads((written / CLASSIFIER).read_text()))
