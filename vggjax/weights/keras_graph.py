"""The layer graph of a whole Keras model, checked and sorted into a VGG classifier's parts."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import numpy as np

from vggjax.model.vgg import BLOCK_SIZES, conv_names, find_arch
from vggjax.weights.download import KERAS_ARCHS
from vggjax.weights.preprocessing import CAFFE_MEAN_BGR

AUGMENTATION = ("RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
                "RandomBrightness", "RandomHue", "RandomSaturation", "RandomGrayscale")
POOLING = {"Flatten": "flatten", "GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}
CAFFE_OPS = ("GetItem", "Stack", "Add")  # what Keras 3 saves of vgg16.preprocess_input
PREPROCESS_INPUT = "preprocess_input"  # the class `_chain` gives that block of ops, once checked
MODELS = ("Functional", "Model", "Sequential")
SUPPORTED = ("an Input, augmentation layers, vgg16/vgg19.preprocess_input or Rescaling(1/255), "
             "a VGG16/VGG19 conv base, Flatten or global pooling, Dense and Dropout layers")


class Refused(ValueError):
    pass


def layer_name(layer: Mapping) -> str:
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
class Plan:
    image_size: tuple = (None, None)
    preprocessing: str | None = None
    base: tuple = ()  # (outer name or None, [conv layer configs])
    pooling: str | None = None
    head: list = dataclasses.field(default_factory=list)  # Dense and Dropout configs, in order


def plan(config: Mapping) -> Plan:
    """Walk the model's one chain of layers and sort them into the parts of a VGG classifier."""
    if config.get("class_name") not in MODELS:
        raise Refused(f"the model is a {config.get('class_name')!r}, expected one of {MODELS}")
    plan, stage = Plan(), 0
    for layer, nested in _chain(config):
        stage = _place(plan, layer, nested, stage)
    if not plan.base:
        raise Refused("no VGG16/VGG19 conv base found (layers block1_conv1 ... block5_pool)")
    if not plan.head or plan.head[-1]["class_name"] != "Dense":
        raise Refused("the model does not end in a Dense layer (sigmoid or softmax)")
    if plan.pooling is None:
        raise Refused("no Flatten or global pooling between the conv base and the Dense layers")
    return plan


def _place(plan: Plan, layer: Mapping, outer: str | None, stage: int) -> int:
    """Put one layer of the chain into `plan`; the stage (0 inputs, 1 base, 2 pooling, 3 head)
    only moves forward. Returns the new stage."""
    cls, name = layer["class_name"], layer_name(layer)
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
            raise Refused(f"layer {name!r} (Rescaling) scales by {scale} with offset {offset}; "
                          "vggjax imports Rescaling(1/255) only")
        plan.preprocessing = "rescale"
        return 0
    if cls in ("Conv2D", "MaxPooling2D") and stage <= 1:
        key = outer or ""
        if plan.base and plan.base[0] != key:
            raise Refused(f"layer {name!r} ({cls}) is a second conv base")
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
        raise Refused(f"layer {name!r} ({cls}){where} is out of place: vggjax imports, in this "
                      f"order, {SUPPORTED}")
    raise Refused(f"layer {name!r} ({cls}){where} is not supported: vggjax imports {SUPPORTED}")


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
            raise Refused(f"layer {layer_name(layer)!r} ({layer['class_name']}) takes {_inputs(layer)} "
                          f"rather than the output of {previous!r}: vggjax imports models that "
                          "are one chain of layers")
        if layer["class_name"] in MODELS:
            for inner, _ in _chain(layer):
                yield inner, layer_name(layer)
        else:
            yield layer, None
        previous, i = layer_name(layer), i + 1
    outputs = [n for n in _flat_strings(config["config"].get("output_layers", [])) if n in
               {layer_name(l) for l in layers}]
    if functional and outputs and outputs != [previous]:
        raise Refused(f"the model's outputs are {outputs}, not its last layer {previous!r}")


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
        raise Refused(f"layer {layer_name(layer)!r} ({layer['class_name']}) is an op that vggjax does not "
                      f"import (only vgg16/vgg19.preprocess_input's GetItem, Stack, Add; found {classes})")
    channels = [l["inbound_nodes"][0]["args"][1][-1] for l in block[:3]]
    stack, add = block[3], block[4]
    constant = [a for a in add["inbound_nodes"][0]["args"] if isinstance(a, dict)
                and a.get("class_name") == "__tensor__"]
    mean = np.asarray(constant[0]["config"]["value"], np.float64).ravel() if constant else None
    ok = (channels == [2, 1, 0] and all(_inputs(l) == [previous] for l in block[:3])
          and stack["config"].get("axis") == -1 and _inputs(stack) == [layer_name(l) for l in block[:3]]
          and _inputs(add) == [layer_name(stack)] and mean is not None
          and np.allclose(mean, -np.asarray(CAFFE_MEAN_BGR), atol=1e-3))
    if not ok:
        raise Refused(f"layers {[layer_name(l) for l in block]} ({', '.join(classes)}) are not "
                      "vgg16/vgg19.preprocess_input (RGB->BGR, minus the ImageNet mean)")
    return layer_name(add)


def base_arch(layers: list) -> str:
    """"vgg16" or "vgg19" when `layers` are exactly that conv base (3x3 same relu convs named
    blockN_convM, a 2x2 max pool after each block); else the first odd layer is refused."""
    n_convs = sum(l["class_name"] == "Conv2D" for l in layers)
    arch = find_arch(n_convs)
    if arch not in KERAS_ARCHS:
        raise Refused(f"the conv base has {n_convs} Conv2D layers; vggjax imports Keras' VGG16 "
                      "(13) and VGG19 (16)")
    names = iter(conv_names(BLOCK_SIZES[arch]))
    want = [("Conv2D", next(names)) for n in BLOCK_SIZES[arch] for _ in range(n)]
    blocks = np.cumsum(BLOCK_SIZES[arch])
    for b in reversed(blocks):  # a pool after each block's last conv
        want.insert(int(b), ("MaxPooling2D", None))
    conv = dict(kernel_size=[3, 3], strides=[1, 1], padding="same", activation="relu")
    for layer, (cls, name) in zip(layers, want):
        c = layer["config"]
        odd = (layer["class_name"] != cls or (name is not None and layer_name(layer) != name)
               or (cls == "Conv2D" and any(_listed(c.get(k)) != v for k, v in conv.items()))
               or (cls == "MaxPooling2D" and _listed(c.get("pool_size")) != [2, 2]))
        if odd:
            raise Refused(f"layer {layer_name(layer)!r} ({layer['class_name']}) is not where {arch}'s "
                          f"conv base has {name or 'a 2x2 max pool'} ({cls})")
    if len(layers) != len(want):
        raise Refused(f"the conv base has {len(layers)} layers, {arch}'s has {len(want)}")
    return arch


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def head(layers: list) -> tuple[list, str | None, float]:
    """(the Dense layers, the hidden ones' activation, the dropout rate) of the layers after
    the pooling. Dropout must sit where vggjax's head has it: in front of every Dense but the
    first hidden one, at one rate (or nowhere)."""
    denses = [l for l in layers if l["class_name"] == "Dense"]
    out = denses[-1]
    units, act = out["config"]["units"], out["config"]["activation"]
    if not ((act == "sigmoid" and units == 1) or (act == "softmax" and units >= 2)):
        raise Refused(f"layer {layer_name(out)!r} (Dense) ends the model with {units} unit(s) and "
                      f"activation {act!r}; vggjax imports Dense(1, sigmoid) or Dense(K, softmax)")
    hidden_acts = {l["config"]["activation"] for l in denses[:-1]}
    odd = [l for l in denses[:-1] if l["config"]["activation"] not in ("relu", "linear")]
    if odd or len(hidden_acts) > 1:
        layer = (odd or denses[:-1])[0]
        raise Refused(f"layer {layer_name(layer)!r} (Dense) has activation {layer['config']['activation']!r}"
                      f"; vggjax imports hidden Dense layers that are all relu or all linear "
                      f"(found {sorted(hidden_acts)})")
    expected = set(range(1, len(denses))) if len(denses) > 1 else {0}
    rates, pending, seen = {}, None, 0
    for layer in layers:
        if layer["class_name"] == "Dropout":
            if pending is not None or seen == len(denses):
                raise Refused(f"layer {layer_name(layer)!r} (Dropout) is out of place: vggjax's head has "
                              "one Dropout in front of every Dense but the first hidden one")
            pending = layer
            continue
        if pending is not None:
            if seen not in expected:
                raise Refused(f"layer {layer_name(pending)!r} (Dropout) sits in front of the first hidden "
                              "Dense; vggjax's head has one in front of every Dense but that one")
            rates[seen] = float(pending["config"]["rate"])
        pending, seen = None, seen + 1
    if rates and (len(set(rates.values())) > 1 or set(rates) != expected):
        layer = denses[min(expected - set(rates))] if set(rates) != expected else denses[max(rates)]
        raise Refused(f"the Dropout in front of layer {layer_name(layer)!r} (Dense) is missing or has "
                      f"another rate ({rates}); vggjax's head has one rate, in front of every "
                      "Dense but the first hidden one")
    activation = "relu" if hidden_acts == {"relu"} else None
    return denses, activation, next(iter(rates.values()), 0.0)


