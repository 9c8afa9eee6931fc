"""Classify image files with converted ImageNet weights, a classifier directory or an exported
artifact (`vggjax predict`); the Grad-CAM overlays it can draw come from the caller (`vggjax.viz`)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

import vggjax
from vggjax.inference import artifact
from vggjax.inference.classifier import CLASSIFIER, class_probabilities, load_classifier
from vggjax.utils import atomic, images
from vggjax.utils.batches import run_padded
from vggjax.utils.progress import advance, progress_bar
from vggjax.weights.preprocessing import check_images

IMAGENET_SIZE = 224  # what keras.utils.load_img(target_size=(224, 224)) feeds VGG16 with top


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
    """Weights ready to classify (N, S, S, 3) uint8 RGB pixels, S = `image_size`."""

    model: object  # a flax module whose output is class logits (one logit for a binary head)
    variables: dict
    preprocessing: str  # the preprocess_input mode, applied inside `serve`
    image_size: int
    class_names: tuple[str, ...] | None  # None: the 1000 ImageNet classes (decode_predictions)
    cam_layer: str | None  # the last conv layer: where Grad-CAM looks

    def __post_init__(self):
        object.__setattr__(self, "_serve", jax.jit(self.serve))

    def serve(self, variables, pixels) -> jax.Array:
        """(N, K) float32 class probabilities of uint8 pixels (N, S, S, 3)
        (`classifier.class_probabilities`). Traceable: `probabilities` runs it jitted and
        `vggjax.export` ships it."""
        return class_probabilities(self.model, self.preprocessing, variables, pixels)

    @property
    def num_classes(self) -> int:
        return 1000 if self.class_names is None else len(self.class_names)

    def probabilities(self, pixels) -> np.ndarray:
        """(N, num_classes) float32 probabilities (a binary head: (1 - p, p)) of RGB pixels
        (uint8 or floats in 0..255; others refused, `preprocessing.check_images`)."""
        return np.asarray(self._serve(self.variables, check_images(pixels)))


def load_predictor(directory: str | os.PathLike, conv_impl: str | None = None):
    """A `Predictor` from converted weights with their top (`vggjax.load`) or from an exported
    cats-vs-dogs classifier (`classifiers/<phase>/`, recognised by its classifier.json); for an
    artifact of `vggjax export` (its manifest.json), the artifact itself (`vggjax.inference.artifact`,
    no Grad-CAM). `conv_impl`: the base's conv (None: as loaded)."""
    directory = Path(directory).expanduser()
    if artifact.is_artifact(directory):
        return artifact.load(directory)
    if (directory / CLASSIFIER).is_file():
        clf = load_classifier(directory)
        model = clf.model if conv_impl is None else clf.model.clone(
            base=clf.model.base.clone(conv_impl=conv_impl))
        return Predictor(model=model, variables=clf.variables, preprocessing=clf.preprocessing,
                         image_size=clf.image_size, class_names=tuple(clf.class_names),
                         cam_layer=_last_conv(clf.model.base))
    pretrained = vggjax.load(directory)
    if not pretrained.meta["include_top"]:
        raise ValueError(f"{directory} holds a conv base without classifier: convert the weights "
                         "with --include-top to predict classes")
    model = pretrained.model.clone(classifier_activation=None,
                                   **({} if conv_impl is None else {"conv_impl": conv_impl}))
    n = pretrained.meta["num_classes"]
    return Predictor(model=model, variables=pretrained.variables,
                     preprocessing=pretrained.meta["preprocessing"], image_size=IMAGENET_SIZE,
                     class_names=None if n == 1000 else tuple(f"class {i}" for i in range(n)),
                     cam_layer=_last_conv(model))


def _last_conv(model) -> str:
    return [n for n in model.layer_names() if "_conv" in n and not n.endswith("_preact")][-1]


# (predictor, pixels (1, S, S, 3) uint8, the file's own pixels (H, W, 3) uint8) -> (H, W, 3) uint8:
# the Grad-CAM overlay of the top class (`vggjax.viz.convnet.cam_overlay`).
CamOverlay = Callable[[Predictor, np.ndarray, np.ndarray], np.ndarray]


def predict_files(predictor: Predictor, paths: Sequence[str | os.PathLike], top: int = 5,
                  cam_dir: str | os.PathLike | None = None, interpolation: str = "nearest",
                  cam_overlay: CamOverlay | None = None, batch_size: int = 32,
                  progress: bool = True) -> list[dict]:
    """One record per file, in order: {"file", "top": [{"index", "wnid"?, "name",
    "probability"}, ...], "cam"?} or, for a file that cannot be read, {"file", "error"}.

    Each image is read and resized as `keras.utils.load_img(target_size=(S, S),
    interpolation=...)` does. The model runs on batches of `batch_size` files (as Keras'
    `predict`), each padded to one shape (`batches.run_padded`: one compilation); the records
    do not depend on it beyond float rounding. With `cam_dir`, `cam_overlay`'s picture at the
    file's own size is written to cam_dir/<stem>_cam.png (one image at a time); all those paths
    are checked before any work (`atomic.RefusedError` if one is a file vggjax did not write).
    `progress`: a bar on stderr counting files (`vggjax.utils.progress`; False: none).
    """
    paths = list(paths)
    _check_request(predictor, top, interpolation, cam_dir, cam_overlay, batch_size)
    cams = [None] * len(paths)
    if cam_dir is not None:
        cams = _cam_paths(paths, Path(cam_dir))
        for cam in cams:
            atomic.check_target(cam, directory=False)
    # Fewer files than a batch: the batch is that many, not `batch_size` rows of mostly padding
    # (a single photo would otherwise cost 32 images' work); still one shape for the whole call.
    size = max(1, min(batch_size, len(paths)))
    records = []
    with progress_bar(total=len(paths), desc="predict", unit="img", enabled=progress) as bar:
        for start in range(0, len(paths), size):
            chunk = slice(start, start + size)
            records += _predict_batch(predictor, paths[chunk], cams[chunk], size, top, interpolation,
                                      cam_overlay)
            advance(bar, len(paths[chunk]))  # unreadable files count too: the bar ends at len(paths)
    return records


def _check_request(predictor: Predictor, top: int, interpolation: str, cam_dir, cam_overlay,
                   batch_size: int) -> None:
    """ValueError for `predict_files` arguments that cannot work, before any file is read."""
    if not 1 <= top <= predictor.num_classes:
        raise ValueError(f"top must lie in [1, {predictor.num_classes}], found {top}")
    if interpolation not in images.INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {images.INTERPOLATIONS}, found {interpolation!r}")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, found {batch_size!r}")
    if cam_dir is not None and cam_overlay is None:
        raise ValueError("cam_dir needs cam_overlay (vggjax.viz.convnet.cam_overlay) to draw the maps")
    if cam_dir is not None and predictor.cam_layer is None:
        raise ValueError("Grad-CAM needs the model's gradients, which an exported artifact does not "
                         "carry: pass the directory it was exported from to use --cam")


def _predict_batch(predictor: Predictor, paths: Sequence[str | os.PathLike], cams: Sequence[Path | None],
                   size: int, top: int, interpolation: str, cam_overlay: CamOverlay | None) -> list[dict]:
    """`predict_files`' records for at most `size` files: the readable ones' pixels, uint8
    (n, S, S, 3), classified in one call padded to `size` rows; `cams[i]` None: no Grad-CAM."""
    shape = (predictor.image_size, predictor.image_size)
    pixels, errors = {}, {}
    for i, path in enumerate(paths):
        try:
            pixels[i] = images.load_image(path, shape, interpolation)
        except ValueError as err:
            errors[i] = str(err)
    if pixels:
        probs = run_padded(predictor.probabilities, np.stack(list(pixels.values())), size)
        probs = dict(zip(pixels, probs))  # file index -> (num_classes,) float32
    records = []
    for i, path in enumerate(paths):
        if i in errors:
            records.append({"file": str(path), "error": errors[i]})
            continue
        record = {"file": str(path), "top": _top_classes(predictor, probs[i], top)}
        if cams[i] is not None:
            original = images.load_image(path)  # the overlay is drawn at the file's own size
            overlay = cam_overlay(predictor, pixels[i][None], original)
            record["cam"] = str(images.save_png(cams[i], overlay))
        records.append(record)
    return records


def _top_classes(predictor: Predictor, probs: np.ndarray, top: int) -> list[dict]:
    """The `top` classes of one image's (num_classes,) float32 probabilities, best first:
    [{"index", "wnid" (ImageNet only), "name", "probability"}, ...]."""
    order = np.argsort(-probs, kind="stable")[:top]
    if predictor.class_names is None:
        names = vggjax.decode_predictions(probs[None], top=top)[0]
        return [{"index": int(i), "wnid": w, "name": n, "probability": float(p)}
                for i, (w, n, p) in zip(order, names)]
    return [{"index": int(i), "name": predictor.class_names[i], "probability": float(probs[i])}
            for i in order]


def _cam_paths(paths: Sequence[str | os.PathLike], cam_dir: Path) -> list[Path]:
    """cam_dir/<stem>_cam.png per input; <stem>_2_cam.png, ... for inputs sharing a stem."""
    used, out = set(), []
    for path in paths:
        stem = Path(path).stem
        name, k = f"{stem}_cam.png", 1
        while name in used:  # two inputs with one stem (from different folders)
            k += 1
            name = f"{stem}_{k}_cam.png"
        used.add(name)
        out.append(cam_dir / name)
    return out
