"""Reading an artifact of `vggjax.export`: its manifest, and the artifact run by its own runtime
(jax, TensorFlow or onnxruntime) with the interface `vggjax predict` uses."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from vggjax.utils.extras import require

MANIFEST = "manifest.json"


def _run_jax(directory: Path, manifest: dict):
    """images uint8 (N, S, S, 3) -> tuple of NumPy outputs, by the serialized StableHLO alone."""
    exported = jax.export.deserialize(bytearray((directory / manifest["jax"]["file"]).read_bytes()))
    return lambda images: tuple(np.asarray(o) for o in exported.call(images))


def _run_savedmodel(directory: Path, manifest: dict):
    """images uint8 (N, S, S, 3) -> tuple of NumPy outputs, by TensorFlow running the SavedModel."""
    tf = require("tensorflow", "running a savedmodel export")
    serve = tf.saved_model.load(str(directory)).signatures[manifest["savedmodel"]["signature"]]
    names = list(manifest["outputs"])
    return lambda images: tuple(serve(images=tf.constant(images))[n].numpy() for n in names)


def _run_onnx(directory: Path, manifest: dict):
    """images uint8 (N, S, S, 3) -> tuple of NumPy outputs, by onnxruntime on CPU."""
    ort = require("onnxruntime", "running an onnx export")
    session = ort.InferenceSession(str(directory / manifest["onnx"]["file"]),
                                   providers=["CPUExecutionProvider"])
    return lambda images: tuple(session.run(None, {"images": images}))


# format name -> (directory, manifest) -> run(images); `vggjax.export.artifact` writes the same names.
RUNNERS: dict[str, Callable] = {"jax": _run_jax, "savedmodel": _run_savedmodel, "onnx": _run_onnx}


def is_artifact(directory: str | os.PathLike) -> bool:
    """True when `directory` holds an `export` manifest."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") in RUNNERS and "outputs" in manifest


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
    """An exported artifact run by its runtime (jax, TensorFlow or onnxruntime); the attributes
    `vggjax predict` reads from a `Predictor`. No gradients: `cam_layer` is None."""

    directory: Path
    manifest: dict
    run: Callable  # uint8 (N, S, S, 3) -> tuple of NumPy arrays in manifest["outputs"] order
    cam_layer = None

    @property
    def image_size(self) -> int:
        return self.manifest["input"]["shape"][1]

    @property
    def class_names(self) -> tuple[str, ...] | None:
        names = self.manifest.get("class_names")
        return None if names is None or self.manifest["kind"] == "imagenet" else tuple(names)

    @property
    def num_classes(self) -> int:
        self._check_classes()
        return len(self.manifest["class_names"])

    def _check_classes(self) -> None:
        if "probabilities" not in self.manifest["outputs"]:
            raise ValueError(f"{self.directory} holds conv features, not a classifier: export weights "
                             "with their top, or a classifier, to predict classes")

    def outputs(self, pixels) -> dict[str, np.ndarray]:
        """{output name: array} for uint8 RGB pixels (N, S, S, 3)."""
        pixels = np.ascontiguousarray(pixels)
        s = self.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"{self.directory} takes uint8 images (N, {s}, {s}, 3), found "
                             f"{pixels.dtype} {pixels.shape}")
        return dict(zip(self.manifest["outputs"], self.run(pixels)))

    def probabilities(self, pixels) -> np.ndarray:
        """(N, K) float32 class probabilities, as `Predictor.probabilities`."""
        self._check_classes()
        return np.asarray(self.outputs(pixels)["probabilities"], np.float32)


def load(directory: str | os.PathLike) -> Artifact:
    """The artifact in `directory` (written by `export`), ready to run."""
    directory = Path(directory).expanduser()
    if not is_artifact(directory):
        raise ValueError(f"{directory} is not a vggjax export ({MANIFEST} missing or not one)")
    manifest = json.loads((directory / MANIFEST).read_text())
    return Artifact(directory, manifest, RUNNERS[manifest["format"]](directory, manifest))
