"""Converted weights on disk: an Orbax checkpoint plus vggjax.json, written atomically and loaded back."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vggjax.utils import atomic, digests
from vggjax.utils.cache import cache_dir
from vggjax.utils.orbax_tree import restore_tree, save_tree
from vggjax.utils.progress import advance, progress_bar
from vggjax.model.vgg import ARCHS, TOP_INPUTS, VGG, create, without_top
from vggjax.weights.preprocessing import MODES, prepare_images
from vggjax.utils.trees import digest, flatten
from vggjax.weights import download, hub
from vggjax.weights.keras import read_keras_h5
from vggjax.weights.spec import check_variables

METADATA = "vggjax.json"
CHECKPOINT = "checkpoint"
# What the weights of each source expect around them; stored with every converted checkpoint.
SOURCES = {
    "keras": dict(top_input="keras", preprocessing="caffe", classifier_activation="softmax"),
    "torchvision": dict(top_input="torch", preprocessing="torch", classifier_activation=None),
    "timm": dict(top_input="torch", preprocessing="torch", classifier_activation=None),
}
REQUIRED_META = ("arch", "include_top", "top_input", "preprocessing")
NUM_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded checkpoint: `model.apply(variables, preprocess(images))` reproduces the source
    framework's output (Keras: softmax probabilities; torchvision/timm: logits)."""

    model: VGG
    params: dict
    batch_stats: dict | None  # BatchNorm running statistics; None for plain VGGs
    meta: dict

    @property
    def variables(self) -> dict:
        """{"params": ..., ["batch_stats": ...]}: what `model.apply` needs (BN variants need both)."""
        out = {"params": self.params}
        if self.batch_stats is not None:
            out["batch_stats"] = self.batch_stats
        return out

    def preprocess(self, images):
        """RGB NHWC images (uint8 or float 0..255) -> float32 input in the weights' convention
        (`preprocessing.prepare_images`: concrete images are checked first)."""
        return prepare_images(images, self.meta["preprocessing"])


def default_output_dir(source: str, arch: str, include_top: bool) -> Path:
    """$VGGJAX_CACHE/converted/<source>_<arch>[_notop]."""
    return cache_dir() / "converted" / f"{source}_{arch}{'' if include_top else '_notop'}"


def read_weights(source: str, arch: str, path: str | os.PathLike) -> tuple[dict, bool]:
    """({"params": ..., ["batch_stats": ...]} as float32 NumPy, include_top) from a source file."""
    if source == "keras":
        return read_keras_h5(path, arch)
    if source in ("torchvision", "timm"):
        from vggjax.weights.torch import read_torch_file  # safetensors imported lazily; .pth needs no torch
        return read_torch_file(os.fspath(path), arch)
    raise ValueError(f"unknown weights source {source!r}; expected one of {sorted(SOURCES)}")


def convert_file(source: str, arch: str, input_path: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None, include_top: bool = False,
                 overwrite: bool = False, revision: str | None = None, progress: bool = True) -> dict:
    """Convert an official weights file into a checked vggjax checkpoint; return its metadata.

    `input_path=None` downloads the official file (checksum-verified, cached, `progress`: its bar;
    timm's from the Hugging Face Hub at the commit `hub.revision_for(arch, revision)` gives). A file holding
    the classifier can be converted without it (`include_top=False`), not the other way
    round. The output directory appears complete or not at all; `overwrite` replaces only a
    previous vggjax output, never a directory holding the input file or the working directory.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown weights source {source!r}; expected one of {sorted(SOURCES)}")
    create(arch)  # unknown arch: fail before any download
    output_dir = Path(output_dir).expanduser() if output_dir is not None else default_output_dir(
        source, arch, include_top)
    input_path = os.path.expanduser(input_path) if input_path is not None else None
    protect = [input_path] if input_path is not None else []
    atomic.check_target(output_dir, directory=True, overwrite=overwrite,
                        protect=protect)  # before any download or reading
    if input_path is None and source == "timm":
        input_path = hub.fetch(arch, revision)
    elif input_path is None:
        input_path = download.fetch(source, arch, include_top, progress=progress)
    input_path = os.fspath(input_path)
    if os.path.isdir(input_path):
        raise ValueError(f"--input {input_path} is a directory; expected a weights file "
                         "(.h5, .pth, .pt, .bin or .safetensors)")
    # Reading, checking and digesting, then the write and its bit-for-bit check: a few seconds
    # each for a 500 MB file, shown as steps (the bytes are read by h5py / the unpickler).
    with progress_bar(total=2, desc=f"converting {os.path.basename(input_path)}", unit="step",
                      enabled=progress) as bar:
        variables, meta = _read_checked(source, arch, input_path, include_top)
        advance(bar, 1)
        meta = save(output_dir, variables, meta, overwrite=overwrite, protect=[input_path])
        advance(bar, 1)
    return meta


def _read_checked(source: str, arch: str, input_path: str, include_top: bool) -> tuple[dict, dict]:
    """(variables, metadata) of `convert_file`'s input, checked: the top kept or dropped as asked."""
    variables, has_top = read_weights(source, arch, input_path)
    if include_top and not has_top:
        raise ValueError(f"{input_path} holds no classifier (fc1, fc2, predictions): it is a "
                         f"'notop' file; convert it without --include-top, or use the full file")
    if has_top and not include_top:
        variables = dict(variables, params=without_top(variables["params"]))
    # A fine-tuned classifier (e.g. torchvision with 2 classes) keeps its own class count.
    num_classes = (int(variables["params"]["predictions"]["bias"].shape[0]) if include_top
                   else NUM_CLASSES)
    check_variables(variables, arch, include_top, source=input_path, num_classes=num_classes)
    meta = dict(arch=arch, source=source, source_file=os.path.abspath(input_path),
                source_sha256=digests.file_digest(input_path),
                include_top=include_top, **SOURCES[source], num_classes=num_classes)
    return variables, meta


def save(directory: str | os.PathLike, variables: Mapping, meta: Mapping,
         overwrite: bool = False, protect: list = ()) -> dict:
    """Write `variables` ({"params", ["batch_stats"]}, keyed by Keras layer names) and `meta`
    to `directory`; return the metadata as written.

    `meta` needs arch, include_top, head and preprocessing; other keys are kept. The
    variables must pass `check_variables`. Everything is written to a temp dir next to
    `directory`, reloaded and compared bit for bit, then renamed into place (`atomic.writing`:
    `overwrite` replaces only a vggjax weights directory, never one holding a `protect` path).
    """
    directory = Path(directory).absolute()
    meta = _complete_meta(meta, f"metadata for {directory}")
    variables = jax.tree.map(np.asarray, dict(variables))
    check_variables(variables, meta["arch"], meta["include_top"], source=f"variables for {directory}",
                    num_classes=meta["num_classes"])
    meta["variables_sha256"] = digest(variables)
    with atomic.writing(directory, directory=True, overwrite=overwrite,
                        protect=protect) as tmp:
        tmp.mkdir()
        save_tree(tmp / CHECKPOINT, variables)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _verify_copy(tmp, variables, meta)
    return meta


def load(directory: str | os.PathLike, verify: bool = True) -> Pretrained:
    """Load a directory written by `save` / `convert_file` (or `vggjax convert`).

    The arrays must have the recorded `variables_sha256` (a changed byte is refused;
    `verify=False` skips the digest) and be finite, with the shapes of `meta["arch"]`.
    """
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    meta = _read_meta(directory)
    if not (directory / CHECKPOINT).is_dir():
        raise ValueError(f"{directory} is not a vggjax checkpoint: {CHECKPOINT}/ is missing")
    try:
        variables = restore_tree(directory / CHECKPOINT)
    except Exception as err:  # Orbax raises many types for a damaged checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{directory / CHECKPOINT} is damaged and could not be restored: {first}") from err
    check_variables(variables, meta["arch"], meta["include_top"], source=str(directory),
                    num_classes=meta["num_classes"])
    recorded = meta.get("variables_sha256")
    if verify and recorded is not None and digest(variables) != recorded:
        raise ValueError(f"{directory} is corrupt: its arrays do not match the variables_sha256 "
                         f"recorded in {METADATA}; convert or save the weights again")
    model = create(meta["arch"], include_top=meta["include_top"], top_input=meta["top_input"],
                   classifier_activation=meta["classifier_activation"],
                   num_classes=meta["num_classes"])
    variables = jax.tree.map(jnp.asarray, variables)
    return Pretrained(model=model, params=variables["params"],
                      batch_stats=variables.get("batch_stats"), meta=meta)


def _complete_meta(meta: Mapping, where: str) -> dict:
    """Check the keys `load` relies on and fill the defaults; raise ValueError naming `where`."""
    from vggjax import __version__

    if not isinstance(meta, Mapping):
        raise ValueError(f"{where} must be a JSON object, found {type(meta).__name__}")
    meta = dict(meta)
    if "head" in meta and "top_input" not in meta:  # vggjax.json before 0.1's rename of the key
        meta["top_input"] = meta.pop("head")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{where} lacks {missing} (needs {list(REQUIRED_META)})")
    meta.setdefault("classifier_activation", "softmax" if meta["top_input"] == "keras" else None)

    def one_of(value, allowed) -> bool:  # JSON may hold lists or objects, which are unhashable
        return isinstance(value, (str, type(None))) and value in allowed

    meta.setdefault("num_classes", NUM_CLASSES)
    meta.setdefault("vggjax_version", __version__)
    problems = []
    if not one_of(meta["arch"], ARCHS):
        problems.append(f"arch {meta['arch']!r} is not one of {sorted(ARCHS)}")
    if not isinstance(meta["include_top"], bool):
        problems.append(f"include_top must be true or false, found {meta['include_top']!r}")
    if not one_of(meta["top_input"], TOP_INPUTS):
        problems.append(f"top_input must be one of {TOP_INPUTS}, found {meta['top_input']!r}")
    if not one_of(meta["preprocessing"], MODES):
        problems.append(f"preprocessing must be one of {sorted(MODES)}, found {meta['preprocessing']!r}")
    if not one_of(meta["classifier_activation"], ("softmax", None)):
        problems.append(f"classifier_activation must be 'softmax' or null, "
                        f"found {meta['classifier_activation']!r}")
    if type(meta["num_classes"]) is not int or meta["num_classes"] < 1:
        problems.append(f"num_classes must be a positive integer, found {meta['num_classes']!r}")
    try:
        json.dumps(meta)
    except TypeError as err:
        problems.append(f"not JSON-serialisable ({err})")
    if problems:
        raise ValueError(f"{where} is invalid: " + "; ".join(problems))
    return meta


def _read_meta(directory: Path) -> dict:
    path = directory / METADATA
    if not path.is_file():
        raise ValueError(f"{directory} is not a vggjax checkpoint: {METADATA} is missing")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    return _complete_meta(meta, str(path))


def _verify_copy(tmp: Path, variables: dict, meta: dict) -> None:
    """Reload what was just written and demand it equals what was meant, bit for bit."""
    want, have = flatten(variables), flatten(restore_tree(tmp / CHECKPOINT))
    if set(want) != set(have):
        raise RuntimeError(f"checkpoint in {tmp} reloaded with different names: "
                           f"{sorted(set(want) ^ set(have))}")
    for path, a in want.items():
        b = have[path]
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            raise RuntimeError(f"checkpoint in {tmp} reloaded {path} differently")
    if json.loads((tmp / METADATA).read_text()) != meta:
        raise RuntimeError(f"{tmp / METADATA} reloaded differently")
