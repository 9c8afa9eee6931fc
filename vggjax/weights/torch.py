"""torchvision and timm VGG state dicts (.pth, .pt, .bin, .safetensors) as vggjax variables, and
vggjax variables as those state dicts (`to_state_dict`: the same layout table, both ways)."""
from __future__ import annotations

import os
from typing import Callable, Mapping, NamedTuple

import numpy as np

from vggjax.model.vgg import ARCHS, WIDTHS, find_arch
from vggjax.utils.trees import diff, flatten, unflatten
from vggjax.weights.spec import check_floats, check_variables, expected_shapes
from vggjax.weights.torch_pickle import read_state_dict

POOLED = (7, 7, WIDTHS[-1])  # torch's AdaptiveAvgPool2d((7, 7)) output that fc1 reads, as H, W, C
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


class Layout(NamedTuple):
    """How one torch tensor is stored: its shape given the Keras shape, and the conversions."""

    torch_shape: Callable[[tuple], tuple]
    to_keras: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]  # the inverse of to_keras


def _fc1_from_conv(w: np.ndarray) -> np.ndarray:
    # (out, C, H, W) -> (H*W*C, out): rows in our H, W, C flatten order instead of torch's C, H, W.
    rows = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    # Transposing 400 MB in one strided copy thrashes the cache; blocks of rows stay in it.
    out = np.empty(rows.shape[::-1], np.float32)
    for i in range(0, len(rows), 256):
        out[:, i:i + 256] = rows[i:i + 256].T
    return out


def _fc1_to_conv(w: np.ndarray) -> np.ndarray:
    # (H*W*C, out) -> (out, C, H, W): `_fc1_from_conv` backwards.
    return np.ascontiguousarray(w.T.reshape(w.shape[1], *POOLED).transpose(0, 3, 1, 2))


LAYOUTS = {
    "vector": Layout(lambda s: s, lambda w: w, lambda w: w),
    "conv": Layout(lambda s: (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
                   lambda w: w.transpose(3, 2, 0, 1)),
    "linear": Layout(lambda s: s[::-1], lambda w: w.T, lambda w: w.T),  # (out, in) <-> (in, out)
    # torchvision's fc1: nn.Linear over torch.flatten of (C, 7, 7).
    "fc1_linear": Layout(lambda s: (s[1], s[0]),
                         lambda w: _fc1_from_conv(w.reshape(w.shape[0], POOLED[2], *POOLED[:2])),
                         lambda w: _fc1_to_conv(w).reshape(w.shape[1], -1)),
    # timm's ConvMlp: fc1 is the same weights as a 7x7 conv, fc2 as a 1x1 conv.
    "fc1_conv": Layout(lambda s: (s[1], POOLED[2], *POOLED[:2]), _fc1_from_conv, _fc1_to_conv),
    "conv1x1": Layout(lambda s: (s[1], s[0], 1, 1), lambda w: w[:, :, 0, 0].T,
                      lambda w: w.T[:, :, None, None]),
}

# The classifier modules of each library: torch module -> (Keras layer, layout of its weight).
TOP_LAYOUTS = {
    "torchvision": {"classifier.0": ("fc1", "fc1_linear"), "classifier.3": ("fc2", "linear"),
                    "classifier.6": ("predictions", "linear")},
    "timm": {"pre_logits.fc1": ("fc1", "fc1_conv"), "pre_logits.fc2": ("fc2", "conv1x1"),
             "head.fc": ("predictions", "linear")},
}


def feature_indices(arch: str) -> dict[str, int]:
    """Keras conv name -> index of that Conv2d in torch's `features` Sequential.

    torchvision (and timm) build `features` as conv, [BatchNorm2d], ReLU per conv and one
    MaxPool2d per block, so e.g. vgg16 has convs at 0, 2, 5, 7, 10, ... and vgg16_bn at 0, 3, 7, ...
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    per_conv = 3 if ARCHS[arch].get("batch_norm", False) else 2
    indices, i = {}, 0
    for b, n in enumerate(ARCHS[arch]["block_sizes"], 1):
        for c in range(1, n + 1):
            indices[f"block{b}_conv{c}"] = i
            i += per_conv
        i += 1  # the block's MaxPool2d
    return indices


def _plan(arch: str, top: str | None) -> dict[str, tuple[str, str]]:
    """torch key -> ('/'-joined vggjax path, layout name) for every tensor the file must hold."""
    plan = {}
    batch_norm = ARCHS[arch].get("batch_norm", False)
    for name, i in feature_indices(arch).items():
        plan[f"features.{i}.weight"] = (f"params/{name}/kernel", "conv")
        plan[f"features.{i}.bias"] = (f"params/{name}/bias", "vector")
        if batch_norm:
            bn = f"features.{i + 1}"
            plan[f"{bn}.weight"] = (f"params/{name}_bn/scale", "vector")
            plan[f"{bn}.bias"] = (f"params/{name}_bn/bias", "vector")
            plan[f"{bn}.running_mean"] = (f"batch_stats/{name}_bn/mean", "vector")
            plan[f"{bn}.running_var"] = (f"batch_stats/{name}_bn/var", "vector")
    for module, (layer, layout) in TOP_LAYOUTS.get(top, {}).items():
        plan[f"{module}.weight"] = (f"params/{layer}/kernel", layout)
        plan[f"{module}.bias"] = (f"params/{layer}/bias", "vector")
    return plan


def _top_layout(state: Mapping[str, object], source: str) -> str | None:
    """Which classifier layout the state dict carries: "torchvision", "timm", or None (conv base only)."""
    found = [top for top, modules in TOP_LAYOUTS.items()
             if any(key.startswith(f"{m}.") for key in state for m in modules)]
    if len(found) > 1:
        raise ValueError(f"{source} mixes torchvision (classifier.*) and timm (pre_logits.*, head.fc.*) "
                         "classifier keys; expected one layout")
    return found[0] if found else None


def _guess_arch(state: Mapping[str, object]) -> str | None:
    """The arch whose conv count and BatchNorm use match the state dict's `features`, if any."""
    n_convs = sum(k.startswith("features.") and k.endswith(".weight") and np.ndim(v) == 4
                  for k, v in state.items())
    batch_norm = any(k.startswith("features.") and k.endswith(".running_mean") for k in state)
    return find_arch(n_convs, batch_norm)


def from_state_dict(state: Mapping[str, np.ndarray], arch: str, source: str) -> tuple[dict, bool]:
    """Map a torchvision or timm VGG state dict to vggjax variables.

    `state`: torch key -> array (anything `np.asarray` takes), e.g. "features.0.weight" (64, 3, 3, 3)
    OIHW. Returns ({"params": ..., ["batch_stats": ...]}, include_top): float32 arrays keyed by
    Keras layer names, conv kernels HWIO, fc1 (25088, 4096) with rows in H, W, C order.
    include_top is True when the state dict has a head (any number of classes). `source` (the
    file) is named in every error: missing or unexpected keys, shapes that do not fit `arch`.
    """
    top = _top_layout(state, source)
    plan = _plan(arch, top)
    include_top = top is not None
    # The classifier's size comes from the file, so fine-tuned ones (e.g. 2 classes) load too.
    bias_key = next((k for k, (path, _) in plan.items() if path == "params/predictions/bias"), None)
    num_classes = 1000
    if bias_key in state and np.ndim(state[bias_key]) == 1:
        num_classes = len(state[bias_key])
    want = expected_shapes(arch, include_top, num_classes)
    torch_shapes = {key: tuple(LAYOUTS[layout].torch_shape(want[path])) for key, (path, layout) in plan.items()}
    # BatchNorm's step counter only matters for momentum=None, which torchvision does not use.
    problems = diff({k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")},
                    torch_shapes)
    if problems:
        guess = _guess_arch(state)
        hint = f" (its features look like {guess}: convert it as {guess})" if guess not in (
            None, arch) else ""
        raise ValueError(f"{source} is not a {top or 'torchvision/timm'} {arch} state dict{hint}: "
                         + "; ".join(problems))
    check_floats({key: state[key] for key in plan}, source)
    flat = {path: np.ascontiguousarray(LAYOUTS[layout].to_keras(np.asarray(state[key], np.float32)))
            for key, (path, layout) in plan.items()}
    variables = unflatten(flat)
    check_variables(variables, arch, include_top, source, num_classes)
    return variables, include_top


def to_state_dict(variables: Mapping, arch: str, top: str | None = "torchvision") -> dict[str, np.ndarray]:
    """`from_state_dict` backwards: vggjax `variables` of `arch` as a state dict of float32 NumPy
    arrays in torch's layout (conv kernels OIHW, linear weights (out, in)), with the classifier
    under `top`'s keys ("torchvision" or "timm"; None: the conv base only, `variables`' top is
    ignored). No `num_batches_tracked` entries: torch's BatchNorm keeps its own."""
    if top is not None and top not in TOP_LAYOUTS:
        raise ValueError(f"unknown classifier layout {top!r}; expected one of {sorted(TOP_LAYOUTS)} or None")
    flat, plan = flatten(variables), _plan(arch, top)
    missing = sorted(path for path, _ in plan.values() if path not in flat)
    if missing:
        raise ValueError(f"variables lack {arch}'s " + ", ".join(missing))
    return {key: np.ascontiguousarray(LAYOUTS[layout].to_torch(np.asarray(flat[path], np.float32)))
            for key, (path, layout) in plan.items()}


def _tensor_dict_from_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_torch_file(path: str | os.PathLike, arch: str) -> tuple[dict, bool]:
    """Read a torchvision/timm VGG checkpoint and return `from_state_dict`'s (variables, include_top).

    `.pth`/`.pt`/`.bin` are read by `torch_pickle` (no torch needed; a file whose pickle would
    call anything but torch's tensor rebuilding is refused with ValueError), `.safetensors` by
    safetensors.
    Arrays come back float32, Keras-named, checked against `arch`.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ValueError(f"{path}: expected a {', '.join(PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)} file, "
                         f"found suffix {suffix!r}")
    if os.path.getsize(path) == 0:  # FileNotFoundError, naming the path, if it does not exist
        raise ValueError(f"{path} is empty")
    if suffix in SAFETENSORS_SUFFIXES:
        state = _tensor_dict_from_safetensors(path)
    else:
        state = read_state_dict(path)
    return from_state_dict(state, arch, source=path)
