"""Whole Keras models around a VGG conv base (the book's cats-vs-dogs models): the architecture
read from the file's own config, the weights from where that config says Keras put them.

Reads `model.save("x.h5")` (legacy HDF5: `model_config` attribute, `model_weights` group),
Keras 3's `x.keras` (a zip of config.json and model.weights.h5) and `x.weights.h5` with the
architecture given separately (`model.to_json()`, or a .keras file's config.json). Accepted
layers, in this order: Input; augmentation layers (identity at inference); the VGG preprocessing
(`keras.applications.vgg16.preprocess_input`, which Keras 3 saves as GetItem/Stack/Add ops) or
`Rescaling(1/255)`; a VGG16/VGG19 conv base, nested as one layer or inline; Flatten or global
pooling; Dense and Dropout layers ending in Dense(1, sigmoid) or Dense(K, softmax). Anything else
is refused in one line naming the layer and its class.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile
from typing import Iterator, Mapping

import numpy as np

from vggjax.model.vgg import BLOCK_SIZES, conv_names, find_arch
from vggjax.weights.download import KERAS_ARCHS
from vggjax.weights.keras import attr_list, kernel_and_bias
from vggjax.weights.preprocessing import CAFFE_MEAN_BGR
from vggjax.weights.spec import check_variables

AUGMENTATION = ("RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
                "RandomBrightness", "RandomHue", "RandomSaturation", "RandomGrayscale")
POOLING = {"Flatten": "flatten", "GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}
CAFFE_OPS = ("GetItem", "Stack", "Add")  # what Keras 3 saves of vgg16.preprocess_input
PREPROCESS_INPUT = "preprocess_input"  # the class `_chain` gives that block of ops, once checked
MODELS = ("Functional", "Model", "Sequential")
SUPPORTED = ("an Input, augmentation layers, vgg16/vgg19.preprocess_input or Rescaling(1/255), "
             "a VGG16/VGG19 conv base, Flatten or global pooling, Dense and Dropout layers")


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


class _Refused(ValueError):
    pass


def read_keras_model(path: str | os.PathLike, architecture: str | os.PathLike | None = None) -> KerasModel:
    """Read a whole Keras model (.h5 from model.save, .keras, or .weights.h5 plus `architecture`,
    a JSON file of `model.to_json()` or a .keras config.json). ValueError, naming the file (and
    the layer and its class where one is at fault), for anything outside the module docstring's
    structures."""
    path = os.fspath(path)
    config, weights = _open(path, architecture)
    try:
        plan = _plan(config)
        return _read_arrays(path, plan, weights)
    except _Refused as err:
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
        keys[_name(layer)] = key if used[key] == 0 else f"{key}_{used[key]}"
    return keys


class _Weights:
    """A layer's arrays, by (top-level layer, layer nested in it or None), in either layout."""

    def __init__(self, f, config: dict):
        self.f = f
        self.legacy = "model_weights" in f or attr_list(f, "layer_names") is not None
        self.root = f["model_weights"] if "model_weights" in f else f
        layers = config["config"]["layers"]
        self.keys = _keras3_keys(layers)
        self.nested = {_name(l): _keras3_keys(l["config"]["layers"]) for l in layers
                       if l["class_name"] in MODELS}

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
            raise _Refused(f"the weights of layer {where!r} are missing or damaged ({err})") from None

    def close(self):
        self.f.close()


def _name(layer: Mapping) -> str:
    return layer.get("name") or layer["config"]["name"]


def _inputs(layer: Mapping) -> list:
    """The names of the layers whose outputs `layer` takes (Keras 3 and Keras 2 configs)."""
    nodes = layer.get("inbound_nodes") or []
    found = []

    def walk(value):
        if isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__":
                found.append(value["config"]["keras_history"][0])
            else:
                for v in value.values():
                    walk(v)
        elif isinstance(value, list):
            if len(value) == 4 and isinstance(value[0], str) and isinstance(value[3], dict):
                found.append(value[0])  # Keras 2: [name, node_index, tensor_index, kwargs]
            else:
                for v in value:
                    walk(v)

    walk(nodes)
    return found


@dataclasses.dataclass
class _Plan:
    image_size: tuple = (None, None)
    preprocessing: str | None = None
    base: tuple = ()  # (outer name or None, [conv layer configs])
    pooling: str | None = None
    head: list = dataclasses.field(default_factory=list)  # Dense and Dropout configs, in order


def _plan(config: Mapping) -> _Plan:
    """Walk the model's one chain of layers and sort them into the parts of a VGG classifier."""
    if config.get("class_name") not in MODELS:
        raise _Refused(f"the model is a {config.get('class_name')!r}, expected one of {MODELS}")
    plan, stage = _Plan(), 0
    for layer, nested in _chain(config):
        stage = _place(plan, layer, nested, stage)
    if not plan.base:
        raise _Refused("no VGG16/VGG19 conv base found (layers block1_conv1 ... block5_pool)")
    if not plan.head or plan.head[-1]["class_name"] != "Dense":
        raise _Refused("the model does not end in a Dense layer (sigmoid or softmax)")
    if plan.pooling is None:
        raise _Refused("no Flatten or global pooling between the conv base and the Dense layers")
    return plan


def _place(plan: _Plan, layer: Mapping, outer: str | None, stage: int) -> int:
    """Put one layer of the chain into `plan`; the stage (0 inputs, 1 base, 2 pooling, 3 head)
    only moves forward. Returns the new stage."""
    cls, name = layer["class_name"], _name(layer)
    if cls == "InputLayer" and stage == 0:
        shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
        if shape and None in plan.image_size:  # the outer model's Input first, else the base's
            plan.image_size = tuple(shape[1:3])
        return 0
    if cls in AUGMENTATION and stage == 0:
        return 0
    if cls == PREPROCESS_INPUT and stage == 0:
        plan.preprocessing = "caffe"
        return 0
    if cls == "Rescaling" and stage == 0:
        scale, offset = layer["config"].get("scale"), layer["config"].get("offset", 0.0)
        if not (isinstance(scale, float) and abs(scale - 1 / 255) < 1e-9 and offset == 0):
            raise _Refused(f"layer {name!r} (Rescaling) scales by {scale} with offset {offset}; "
                           "vggjax imports Rescaling(1/255) only")
        plan.preprocessing = "rescale"
        return 0
    if cls in ("Conv2D", "MaxPooling2D") and stage <= 1:
        key = outer or ""
        if plan.base and plan.base[0] != key:
            raise _Refused(f"layer {name!r} ({cls}) is a second conv base")
        plan.base = (key, [*plan.base[1], layer]) if plan.base else (key, [layer])
        return 1
    if cls in POOLING and stage == 1:
        plan.pooling = POOLING[cls]
        return 2
    if cls in ("Dense", "Dropout") and stage >= 2:
        plan.head.append(layer)
        return 3
    where = f" inside {outer!r}" if outer else ""
    if cls in POOLING or cls in ("Dense", "Dropout", "Conv2D", "MaxPooling2D") or cls in AUGMENTATION:
        raise _Refused(f"layer {name!r} ({cls}){where} is out of place: vggjax imports, in this "
                       f"order, {SUPPORTED}")
    raise _Refused(f"layer {name!r} ({cls}){where} is not supported: vggjax imports {SUPPORTED}")


def _chain(config: Mapping) -> Iterator[tuple[dict, str | None]]:
    """(layer config, name of the model it is nested in or None), input to output, with nested
    models (the conv base, a Sequential of augmentation layers) opened up. The model must be
    one chain: each layer takes the previous one's output (vgg preprocess_input's ops checked
    as a block)."""
    layers = config["config"]["layers"]
    functional = config["class_name"] != "Sequential"
    previous = None
    i = 0
    while i < len(layers):
        layer = layers[i]
        if functional and layer["class_name"] in CAFFE_OPS:
            previous, i = _caffe_block(layers, i, previous), i + 5
            yield {"class_name": PREPROCESS_INPUT, "name": previous, "config": {}}, None
            continue
        if functional and previous is not None and _inputs(layer) != [previous]:
            raise _Refused(f"layer {_name(layer)!r} ({layer['class_name']}) takes {_inputs(layer)} "
                           f"rather than the output of {previous!r}: vggjax imports models that "
                           "are one chain of layers")
        if layer["class_name"] in MODELS:
            for inner, _ in _chain(layer):
                yield inner, _name(layer)
        else:
            yield layer, None
        previous, i = _name(layer), i + 1
    outputs = [n for n in _flat_strings(config["config"].get("output_layers", [])) if n in
               {_name(l) for l in layers}]
    if functional and outputs and outputs != [previous]:
        raise _Refused(f"the model's outputs are {outputs}, not its last layer {previous!r}")


def _flat_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [s for v in value for s in _flat_strings(v)] if isinstance(value, list) else []


def _caffe_block(layers: list, i: int, previous: str | None) -> str:
    """Check layers[i:i+5] are Keras 3's vgg preprocess_input of `previous`: x[..., 2],
    x[..., 1], x[..., 0] stacked on the last axis, plus the negated BGR ImageNet mean; return
    the name of the block's output. The first odd layer is refused, naming its class."""
    block = layers[i:i + 5]
    classes = [l["class_name"] for l in block]
    want = ["GetItem"] * 3 + ["Stack", "Add"]
    bad = next((l for l, w in zip(block, want) if l["class_name"] != w), None)
    if bad is not None or len(block) < 5:
        layer = bad or layers[i]
        raise _Refused(f"layer {_name(layer)!r} ({layer['class_name']}) is an op that vggjax does not "
                       f"import (only vgg16/vgg19.preprocess_input's GetItem, Stack, Add; found {classes})")
    channels = [l["inbound_nodes"][0]["args"][1][-1] for l in block[:3]]
    stack, add = block[3], block[4]
    constant = [a for a in add["inbound_nodes"][0]["args"] if isinstance(a, dict)
                and a.get("class_name") == "__tensor__"]
    mean = np.asarray(constant[0]["config"]["value"], np.float64).ravel() if constant else None
    ok = (channels == [2, 1, 0] and all(_inputs(l) == [previous] for l in block[:3])
          and stack["config"].get("axis") == -1 and _inputs(stack) == [_name(l) for l in block[:3]]
          and _inputs(add) == [_name(stack)] and mean is not None
          and np.allclose(mean, -np.asarray(CAFFE_MEAN_BGR), atol=1e-3))
    if not ok:
        raise _Refused(f"layers {[_name(l) for l in block]} ({', '.join(classes)}) are not "
                       "vgg16/vgg19.preprocess_input (RGB->BGR, minus the ImageNet mean)")
    return _name(add)


def _read_arrays(path: str, plan: _Plan, weights: _Weights) -> KerasModel:
    """The arrays of the base and the head's Dense layers, checked against the architecture."""
    outer, layers = plan.base
    arch = _base_arch(layers)
    params = {}
    for layer in (l for l in layers if l["class_name"] == "Conv2D"):
        name = _name(layer)
        arrays = weights.arrays(outer, name) if outer else weights.arrays(name, None)
        params[name] = kernel_and_bias(path, name, arrays)
    check_variables({"params": params}, arch, False, source=path)
    denses, activation, rate = _head(plan.head)
    arrays = [_dense_arrays(path, layer, weights) for layer in denses]
    return KerasModel(source=path, arch=arch, base={"params": params}, image_size=plan.image_size,
                      preprocessing=plan.preprocessing, pooling=plan.pooling, hidden=arrays[:-1],
                      activation=activation, dropout_rate=rate, output=arrays[-1],
                      output_activation=str(denses[-1]["config"]["activation"]))


def _base_arch(layers: list) -> str:
    """"vgg16" or "vgg19" when `layers` are exactly that conv base (3x3 same relu convs named
    blockN_convM, a 2x2 max pool after each block); else the first odd layer is refused."""
    n_convs = sum(l["class_name"] == "Conv2D" for l in layers)
    arch = find_arch(n_convs)
    if arch not in KERAS_ARCHS:
        raise _Refused(f"the conv base has {n_convs} Conv2D layers; vggjax imports Keras' VGG16 "
                       "(13) and VGG19 (16)")
    names = iter(conv_names(BLOCK_SIZES[arch]))
    want = [("Conv2D", next(names)) for n in BLOCK_SIZES[arch] for _ in range(n)]
    blocks = np.cumsum(BLOCK_SIZES[arch])
    for b in reversed(blocks):  # a pool after each block's last conv
        want.insert(int(b), ("MaxPooling2D", None))
    conv = dict(kernel_size=[3, 3], strides=[1, 1], padding="same", activation="relu")
    for layer, (cls, name) in zip(layers, want):
        c = layer["config"]
        odd = (layer["class_name"] != cls or (name is not None and _name(layer) != name)
               or (cls == "Conv2D" and any(_listed(c.get(k)) != v for k, v in conv.items()))
               or (cls == "MaxPooling2D" and _listed(c.get("pool_size")) != [2, 2]))
        if odd:
            raise _Refused(f"layer {_name(layer)!r} ({layer['class_name']}) is not where {arch}'s "
                           f"conv base has {name or 'a 2x2 max pool'} ({cls})")
    if len(layers) != len(want):
        raise _Refused(f"the conv base has {len(layers)} layers, {arch}'s has {len(want)}")
    return arch


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _head(layers: list) -> tuple[list, str | None, float]:
    """(the Dense layers, the hidden ones' activation, the dropout rate) of the layers after
    the pooling. Dropout must sit where vggjax's head has it: in front of every Dense but the
    first hidden one, at one rate (or nowhere)."""
    denses = [l for l in layers if l["class_name"] == "Dense"]
    out = denses[-1]
    units, act = out["config"]["units"], out["config"]["activation"]
    if not ((act == "sigmoid" and units == 1) or (act == "softmax" and units >= 2)):
        raise _Refused(f"layer {_name(out)!r} (Dense) ends the model with {units} unit(s) and "
                       f"activation {act!r}; vggjax imports Dense(1, sigmoid) or Dense(K, softmax)")
    hidden_acts = {l["config"]["activation"] for l in denses[:-1]}
    odd = [l for l in denses[:-1] if l["config"]["activation"] not in ("relu", "linear")]
    if odd or len(hidden_acts) > 1:
        layer = (odd or denses[:-1])[0]
        raise _Refused(f"layer {_name(layer)!r} (Dense) has activation {layer['config']['activation']!r}"
                       f"; vggjax imports hidden Dense layers that are all relu or all linear "
                       f"(found {sorted(hidden_acts)})")
    expected = set(range(1, len(denses))) if len(denses) > 1 else {0}
    rates, pending, seen = {}, None, 0
    for layer in layers:
        if layer["class_name"] == "Dropout":
            if pending is not None or seen == len(denses):
                raise _Refused(f"layer {_name(layer)!r} (Dropout) is out of place: vggjax's head has "
                               "one Dropout in front of every Dense but the first hidden one")
            pending = layer
            continue
        if pending is not None:
            if seen not in expected:
                raise _Refused(f"layer {_name(pending)!r} (Dropout) sits in front of the first hidden "
                               "Dense; vggjax's head has one in front of every Dense but that one")
            rates[seen] = float(pending["config"]["rate"])
        pending, seen = None, seen + 1
    if rates and (len(set(rates.values())) > 1 or set(rates) != expected):
        layer = denses[min(expected - set(rates))] if set(rates) != expected else denses[max(rates)]
        raise _Refused(f"the Dropout in front of layer {_name(layer)!r} (Dense) is missing or has "
                       f"another rate ({rates}); vggjax's head has one rate, in front of every "
                       "Dense but the first hidden one")
    activation = "relu" if hidden_acts == {"relu"} else None
    return denses, activation, next(iter(rates.values()), 0.0)


def _dense_arrays(path: str, layer: Mapping, weights: _Weights) -> dict:
    name = _name(layer)
    arrays = weights.arrays(name, None)
    if not layer["config"].get("use_bias", True) and len(arrays) == 1:
        arrays.append(np.zeros(arrays[0].shape[-1], arrays[0].dtype))  # use_bias=False: a zero bias
    return kernel_and_bias(path, name, arrays)
