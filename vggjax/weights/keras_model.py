"""Whole Keras models around a VGG conv base (the book's cats-vs-dogs models): the architecture
read from the file's own config, the weights from where that config says Keras put them.

Reads `model.save("x.h5")` (legacy HDF5: `model_config` attribute, `model_weights` group),
Keras 3's `x.keras` (a zip of config.json and model.weights.h5) and `x.weights.h5` with the
architecture given separately (`model.to_json()`, or a .keras file's config.json). Accepted
layers, in this order: Input; augmentation layers (identity at inference); the VGG preprocessing
(`keras.applications.vgg16.preprocess_input`, which Keras 3 saves as GetItem/Stack/Add ops) or
`Rescaling(1/255)`; a VGG16/VGG19 conv base, nested as one layer or inline; Flatten or global
pooling; Dense and Dropout layers ending in Dense(1, sigmoid) or Dense(K, softmax). Anything else
is refused in one line naming the layer and its class. This module reads the file; `keras_graph`
checks the layers and sorts them into those parts.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile
from typing import Mapping

import numpy as np

from vggjax.weights import keras_graph
from vggjax.weights.keras import attr_list, kernel_and_bias
from vggjax.weights.spec import check_variables


@dataclasses.dataclass(frozen=True)
class KerasModel:
    """What a whole Keras VGG classifier holds, as float32 NumPy arrays with Keras' layouts."""

    source: str
    arch: str  # "vgg16" or "vgg19"
    base: dict  # {"params": {"block1_conv1": {"kernel" (3, 3, in, out), "bias"}, ...}}
    image_size: tuple  # the Input's (H, W); None where the model leaves it open
    preprocessing: str | None  # "caffe" (preprocess_input inside), "rescale" (Rescaling), or None
    pooling: str  # "flatten", "avg" or "max"
    hidden: list  # [{"kernel" (D, units), "bias"}] of the Dense layers before the output
    activation: str | None  # the hidden layers' activation: "relu" or None (linear)
    dropout_rate: float  # 0.0 without Dropout
    output: dict  # {"kernel" (units, K), "bias"} of the last Dense
    output_activation: str  # "sigmoid" (K = 1) or "softmax"


def read_keras_model(path: str | os.PathLike, architecture: str | os.PathLike | None = None) -> KerasModel:
    """Read a whole Keras model (.h5 from model.save, .keras, or .weights.h5 plus `architecture`,
    a JSON file of `model.to_json()` or a .keras config.json). ValueError, naming the file (and
    the layer and its class where one is at fault), for anything outside the module docstring's
    structures."""
    path = os.fspath(path)
    config, weights = _open(path, architecture)
    try:
        plan = keras_graph.plan(config)
        return _read_arrays(path, plan, weights)
    except keras_graph.Refused as err:
        raise ValueError(f"{path}: {err}") from None
    except (KeyError, TypeError, IndexError, AttributeError) as err:  # a config Keras did not write
        raise ValueError(f"{path}: its model config is damaged or not Keras' "
                         f"({type(err).__name__}: {err})") from None
    finally:
        weights.close()


def _open(path: str, architecture) -> tuple[dict, "_Weights"]:
    """(model config, weights reader) of a .keras zip or an HDF5 file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    given = _read_architecture(architecture) if architecture is not None else None
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if not {"config.json", "model.weights.h5"} <= names:
                    raise ValueError(f"{path} is a zip file but not a Keras .keras model: it lacks "
                                     f"{sorted({'config.json', 'model.weights.h5'} - names)}")
                config = given or json.loads(z.read("config.json"))
                data = io.BytesIO(z.read("model.weights.h5"))
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is a damaged .keras file: {err}") from None
        return _checked(config, path), _Weights(_h5(data, path), _checked(config, path))
    f = _h5(path, path)
    if "model_config" in f.attrs and given is None:
        given = json.loads(f.attrs["model_config"])
    if given is None:
        f.close()
        raise ValueError(f"{path} holds weights only (no model_config): give the model's "
                         "architecture with --architecture FILE (model.to_json(), or the config.json "
                         "inside a .keras file), or convert VGG weights with --arch")
    try:
        return _checked(given, path), _Weights(f, _checked(given, path))
    except ValueError:
        f.close()
        raise


def _checked(config, path: str) -> dict:
    """`config` when it is a Keras model config with a list of layers; else ValueError."""
    layers = config.get("config", {}).get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, list) or not all(isinstance(l, dict) and "class_name" in l for l in layers):
        raise ValueError(f"{path}: its model config is damaged or not Keras' (no list of layers)")
    return config


def _read_architecture(path) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--architecture {path} is not a readable JSON file: {err}") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"--architecture {path} is not a Keras model config (no class_name)")
    return config


def _h5(source, path: str):
    import h5py  # lazily: `import vggjax` must work where only jax/flax/optax are installed

    try:
        return h5py.File(source, "r")
    except OSError as err:
        raise ValueError(f"{path} is neither a .keras zip nor a readable HDF5 file ({err}); "
                         "expected a Keras model saved by model.save") from None


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: how Keras 3 names a layer's group in .weights.h5."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras3_keys(layers: list) -> dict[str, str]:
    """{layer name: its group in a Keras 3 weights file}: the class in snake case, counted."""
    used, keys = {}, {}
    for layer in layers:
        key = _snake_case(layer["class_name"])
        used[key] = used.get(key, -1) + 1
        keys[keras_graph.layer_name(layer)] = key if used[key] == 0 else f"{key}_{used[key]}"
    return keys


class _Weights:
    """A layer's arrays, by (top-level layer, layer nested in it or None), in either layout."""

    def __init__(self, f, config: dict):
        self.f = f
        self.legacy = "model_weights" in f or attr_list(f, "layer_names") is not None
        self.root = f["model_weights"] if "model_weights" in f else f
        layers = config["config"]["layers"]
        self.keys = _keras3_keys(layers)
        self.nested = {keras_graph.layer_name(l): _keras3_keys(l["config"]["layers"]) for l in layers
                       if l["class_name"] in keras_graph.MODELS}

    def arrays(self, outer: str, inner: str | None) -> list[np.ndarray]:
        try:
            if self.legacy:
                group = self.root[outer]
                names = attr_list(group, "weight_names") or []
                if inner is not None:
                    names = [n for n in names if inner in n.split("/")]
                return [np.asarray(group[n]) for n in names]
            group = self.root["layers"][self.keys[outer]]
            if inner is not None:
                group = group["layers"][self.nested[outer][inner]]
            return [np.asarray(group["vars"][str(i)]) for i in range(len(group["vars"]))]
        except (KeyError, OSError) as err:
            where = outer if inner is None else f"{outer}/{inner}"
            raise keras_graph.Refused(f"the weights of layer {where!r} are missing or damaged "
                                      f"({err})") from None

    def close(self):
        self.f.close()


def _read_arrays(path: str, plan: keras_graph.Plan, weights: _Weights) -> KerasModel:
    """The arrays of the base and the head's Dense layers, checked against the architecture."""
    outer, layers = plan.base
    arch = keras_graph.base_arch(layers)
    params = {}
    for layer in (l for l in layers if l["class_name"] == "Conv2D"):
        name = keras_graph.layer_name(layer)
        arrays = weights.arrays(outer, name) if outer else weights.arrays(name, None)
        params[name] = kernel_and_bias(path, name, arrays)
    check_variables({"params": params}, arch, False, source=path)
    denses, activation, rate = keras_graph.head(plan.head)
    arrays = [_dense_arrays(path, layer, weights) for layer in denses]
    return KerasModel(source=path, arch=arch, base={"params": params}, image_size=plan.image_size,
                      preprocessing=plan.preprocessing, pooling=plan.pooling, hidden=arrays[:-1],
                      activation=activation, dropout_rate=rate, output=arrays[-1],
                      output_activation=str(denses[-1]["config"]["activation"]))


def _dense_arrays(path: str, layer: Mapping, weights: _Weights) -> dict:
    name = keras_graph.layer_name(layer)
    arrays = weights.arrays(name, None)
    if not layer["config"].get("use_bias", True) and len(arrays) == 1:
        arrays.append(np.zeros(arrays[0].shape[-1], arrays[0].dtype))  # use_bias=False: a zero bias
    return kernel_and_bias(path, name, arrays)
