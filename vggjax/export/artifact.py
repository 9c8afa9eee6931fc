"""`export`: a classifier or converted weights -> an artifact directory (one format + manifest.json);
`load`: an artifact, run by its own runtime, with the interface `tools/predict.py` uses."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from vggjax.export import onnx_model, savedmodel, stablehlo
from vggjax.utils import atomic

MANIFEST = "manifest.json"
FORMATS = {"jax": stablehlo, "savedmodel": savedmodel, "onnx": onnx_model}


def export(src: str | os.PathLike, format: str, output: str | os.PathLike, precision: str = "fp32",
           image_size: int | None = None, overwrite: bool = False) -> dict:
    """Write `src` (an exported classifier or a converted weights directory) as a `format`
    artifact in `output`; return its manifest.

    The artifact takes uint8 RGB NHWC images (any batch size) with the preprocessing baked in
    and always runs XLA's convolution. `output` appears complete or not at all; `overwrite`
    replaces only an earlier vggjax output (`vggjax.utils.atomic`). Every argument is checked
    before any work: ValueError (one line).
    """
    from vggjax import __version__
    from vggjax.inference.serving import PORTABLE_CONV, from_source

    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, found {format!r}")
    writer = FORMATS[format]
    if precision not in writer.PRECISIONS:
        raise ValueError(f"the {format} format carries precision {' or '.join(writer.PRECISIONS)}, "
                         f"found {precision!r}")
    atomic.check_target(output, directory=True, overwrite=overwrite, protect=[src])
    serving = from_source(src, precision, image_size)
    s = serving.image_size
    manifest = {"format": format, "vggjax_version": __version__, "source": os.path.abspath(src),
                **serving.info, "precision": precision,
                "conv": f"XLA's convolution (vggjax conv_impl={PORTABLE_CONV!r}): no custom calls",
                "input": {"dtype": "uint8", "shape": [None, s, s, 3], "layout": "NHWC",
                          "values": "RGB 0..255", "preprocessing": f"{serving.info['preprocessing']}, "
                                                                   "inside the artifact"},
                "outputs": serving.outputs}
    with atomic.writing(output, directory=True, overwrite=overwrite, protect=[src]) as tmp:
        tmp.mkdir()
        manifest[format] = writer.write(serving, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_artifact(directory: str | os.PathLike) -> bool:
    """True when `directory` holds an `export` manifest."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") in FORMATS and "outputs" in manifest


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
    """An exported artifact run by its runtime (jax, TensorFlow or onnxruntime); the attributes
    `tools/predict.py` reads from a `Predictor`. No gradients: `cam_layer` is None."""

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
        return len(self.manifest["class_names"])

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
        if "probabilities" not in self.manifest["outputs"]:
            raise ValueError(f"{self.directory} exports conv features, not classes: export weights "
                             "with their top, or a classifier, to predict classes")
        return np.asarray(self.outputs(pixels)["probabilities"], np.float32)


def load(directory: str | os.PathLike) -> Artifact:
    """The artifact in `directory` (written by `export`), ready to run."""
    directory = Path(directory).expanduser()
    if not is_artifact(directory):
        raise ValueError(f"{directory} is not a vggjax export ({MANIFEST} missing or not one)")
    manifest = json.loads((directory / MANIFEST).read_text())
    return Artifact(directory, manifest, FORMATS[manifest["format"]].runner(directory, manifest))
