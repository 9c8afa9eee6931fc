"""`export`: a classifier or converted weights -> an artifact directory (one format + manifest.json).
Reading one back is `vggjax.inference.artifact`."""
from __future__ import annotations

import json
import os

from vggjax import __version__
from vggjax.export import onnx_model, savedmodel, stablehlo
from vggjax.inference.artifact import MANIFEST, RUNNERS
from vggjax.inference.serving import PORTABLE_CONV, from_source
from vggjax.utils import atomic, digests
from vggjax.utils.deprecation import moved_module
from vggjax.utils.extras import require
from vggjax.utils.progress import progress_bar

FORMATS = {"jax": stablehlo, "savedmodel": savedmodel, "onnx": onnx_model}
assert FORMATS.keys() == RUNNERS.keys()  # each format written here is read back there


def export(src: str | os.PathLike, format: str, output: str | os.PathLike, precision: str = "fp32",
           image_size: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write `src` (a classifier directory or a converted weights directory) as a `format`
    artifact in `output`; return its manifest.

    The artifact takes uint8 RGB NHWC images (any batch size) with the preprocessing baked in
    and always runs XLA's convolution. `output` appears complete or not at all; `overwrite`
    replaces only an earlier vggjax output (`vggjax.utils.atomic`). The manifest holds
    the sha256 of every file (`files`), checked by `load`. Every argument is checked
    before any work: ValueError (one line). `progress`: a bar over its two steps (loading the
    source, tracing and writing the artifact).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, found {format!r}")
    writer = FORMATS[format]
    if precision not in writer.PRECISIONS:
        raise ValueError(f"the {format} format carries precision {' or '.join(writer.PRECISIONS)}, "
                         f"found {precision!r}")
    for module in writer.REQUIRES:  # a missing extra is one line before any work, not after loading
        require(module, f"the {format} export")
    atomic.check_target(output, directory=True, overwrite=overwrite, protect=[src])
    bar = progress_bar(total=2, desc=f"export {format}: loading {os.path.basename(os.path.abspath(src))}",
                       unit="step", enabled=progress)
    with bar:
        serving = from_source(src, precision, image_size)
        bar.update()
        bar.set_description(f"export {format}: writing {output}", refresh=False)
        manifest = _write(serving, src, format, writer, precision, output, overwrite)
        bar.update()
    return manifest


def _write(serving, src, format: str, writer, precision: str, output, overwrite: bool) -> dict:
    """`export`'s second step: the manifest and the artifact, written atomically."""
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
        manifest["files"] = digests.of_files(tmp)  # checked when it is loaded
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# `load`, `is_artifact` and `Artifact` moved to vggjax.inference.artifact (deprecated here).
__getattr__ = moved_module(__name__, "vggjax.inference.artifact")
