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

from vggjax.utils import digests
from vggjax.utils.extras import require

MANIFEST = "manifest.json"


def _run_jax(directory: Path, manifest: dict):
    """(images uint8 (N, S, S, 3) -> tuple of NumPy outputs, the input's (S, S, 3) and dtype), by
    the serialized StableHLO alone."""
    exported = jax.export.deserialize(bytearray((directory / manifest["jax"]["file"]).read_bytes()))
    (spec,) = exported.in_avals
    return (lambda images: tuple(np.asarray(o) for o in exported.call(images))), spec.shape[1:], str(spec.dtype)


def _run_savedmodel(directory: Path, manifest: dict):
    """As `_run_jax`, by TensorFlow running the SavedModel."""
    tf = require("tensorflow", "running a savedmodel export")
    serve = tf.saved_model.load(str(directory)).signatures[manifest["savedmodel"]["signature"]]
    names = list(manifest["outputs"])
    spec = serve.structured_input_signature[1]["images"]
    return (lambda images: tuple(serve(images=tf.constant(images))[n].numpy() for n in names),
            tuple(spec.shape[1:]), spec.dtype.name)


def _run_onnx(directory: Path, manifest: dict):
    """As `_run_jax`, by onnxruntime on CPU."""
    ort = require("onnxruntime", "running an onnx export")
    session = ort.InferenceSession(str(directory / manifest["onnx"]["file"]),
                                   providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    return (lambda images: tuple(session.run(None, {"images": images})), tuple(spec.shape[1:]),
            spec.type.removeprefix("tensor(").removesuffix(")"))


# format name -> (directory, manifest) -> (run(images), input (S, S, 3), input dtype);
# `vggjax.export.artifact` writes the same names. The file each loads (savedmodel: the directory).
RUNTIMES = {"jax": "jax.export", "savedmodel": "TensorFlow", "onnx": "onnxruntime"}
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
    """The artifact in `directory` (written by `export`), ready to run. Its files must have the
    sha256 its manifest records and the model must take the input the manifest says: ValueError
    (one line, naming the file) for a damaged or edited artifact."""
    directory = Path(directory).expanduser()
    if not is_artifact(directory):
        raise ValueError(f"{directory} is not a vggjax export ({MANIFEST} missing or not one)")
    where = directory / MANIFEST
    manifest = json.loads(where.read_text())
    size = _check_manifest(manifest, where)
    if "files" in manifest:
        digests.check(directory, manifest["files"], where)
    else:  # exported before vggjax recorded digests: still loads
        digests.note_unverified(directory, where)
    fmt = manifest["format"]
    file = directory / manifest[fmt].get("file", "")
    try:
        run, shape, dtype = RUNNERS[fmt](directory, manifest)
    except ImportError:
        raise
    except Exception as err:  # each runtime raises its own types for a damaged file
        text = str(err).strip().splitlines()
        raise ValueError(f"{file} is damaged: {RUNTIMES[fmt]} cannot load it ({type(err).__name__}: "
                         f"{text[0][:160] if text else ''})") from None
    if tuple(shape) != (size, size, 3) or dtype != "uint8":
        raise ValueError(f"{where} does not match {file}: it says uint8 (N, {size}, {size}, 3), the "
                         f"model takes {dtype} (N, {', '.join(map(str, shape))}); was it edited?")
    return Artifact(directory, manifest, run)


def _check_manifest(manifest: dict, where: Path) -> int:
    """The input size S that `manifest` says (uint8 (None, S, S, 3)); ValueError naming `where`
    for a missing or malformed key."""
    fmt = manifest["format"]
    shape = manifest.get("input", {}).get("shape") if isinstance(manifest.get("input"), dict) else None
    if not isinstance(manifest.get(fmt), dict) or ("file" not in manifest[fmt] and fmt != "savedmodel"):
        raise ValueError(f"{where} is damaged or was edited: its {fmt!r} entry is missing or invalid")
    if fmt == "savedmodel" and "signature" not in manifest[fmt]:
        raise ValueError(f"{where} is damaged or was edited: its 'savedmodel' entry has no 'signature'")
    if "input" not in manifest:
        raise ValueError(f"{where} is damaged or was edited: its 'input' entry is missing")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[0] is None and shape[3] == 3
            and type(shape[1]) is int and shape[1] == shape[2] and shape[1] > 0):
        raise ValueError(f"{where} is damaged or was edited: input shape {shape!r} is not [null, S, S, 3]")
    return shape[1]
