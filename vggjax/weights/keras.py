"""Keras VGG16/VGG19 HDF5 weight files: reading both published layouts, writing the legacy one."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Iterator, Mapping

import numpy as np

from vggjax.model.vgg import BLOCK_SIZES, TOP, conv_names, find_arch
from vggjax.weights.download import CONVERT_COMMAND, KERAS_ARCHS, check_keras_arch
from vggjax.weights.spec import check_floats, check_variables

LAYER_RE = re.compile(r"block(\d+)_conv(\d+)")


def read_keras_h5(path: str | os.PathLike, arch: str) -> tuple[dict, bool]:
    """Read a Keras VGG weights file into `({"params": {...}}, include_top)`.

    Accepts the legacy per-layer layout (`vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5`,
    Keras-1 or Keras-2 weight names, chunked `layer_names0..N`, or a full-model h5 with a
    `model_weights` group) and the Keras 3 `.weights.h5` layout. Arrays are float32 NumPy:
    conv kernels (3, 3, in, out) HWIO, fc kernels (in, out). include_top is True when the file
    holds the classifier (fc1, fc2, predictions). Raises ValueError naming the file for anything
    that is not exactly `arch`'s weights.
    """
    check_keras_arch(arch)
    path = os.fspath(path)
    layers = _read_layers(path, arch)
    params = {name: kernel_and_bias(path, name, arrays) for name, arrays in layers.items()}
    include_top = any(name in params for name in TOP)
    variables = {"params": params}
    try:
        check_variables(variables, arch, include_top, source=path)
    except ValueError as err:
        n_convs = sum(p["kernel"].ndim == 4 for p in params.values())
        guess = find_arch(n_convs)
        if guess in KERAS_ARCHS and guess != arch:
            raise ValueError(f"{err} (the file has {n_convs} conv layers, as {guess} has: "
                             f"convert it as {guess})") from None
        raise
    return variables, include_top


def _read_layers(path: str, arch: str) -> dict[str, list[np.ndarray]]:
    """{Keras layer name: [weight arrays as stored]} for every layer that has weights."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a Keras weights file; "
                         "was its download interrupted?")
    if zipfile.is_zipfile(path):  # h5py would call it unreadable HDF5
        raise ValueError(f"{path} is a Keras 3 .keras model (a zip), not a weights file: import the "
                         f"whole model as a classifier with `{CONVERT_COMMAND} --source keras --input FILE "
                         "--output DIR` (no --arch)")
    try:
        import h5py  # lazily: `import vggjax` must work where only jax/flax/optax are installed

        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file ({err}); expected a Keras .h5 "
                         "weights file (a truncated download or an HTML error page?)") from None
    try:
        with f:
            root = f
            if attr_list(f, "layer_names") is None and "model_weights" in f:
                root = f["model_weights"]  # full-model file written by model.save("x.h5")
            if attr_list(root, "layer_names") is not None:
                return dict(_legacy_layers(root, path))
            if isinstance(f.get("layers"), h5py.Group):
                return _keras3_layers(f["layers"], arch)
            raise ValueError(
                f"{path} is an HDF5 file but not a Keras weights file: no 'layer_names' "
                f"attribute and no 'model_weights' or 'layers' group (top level: {sorted(f)})")
    except (OSError, KeyError, RuntimeError) as err:
        # h5py reports truncated or damaged files lazily, when a dataset is first read.
        raise ValueError(f"{path} is a damaged or truncated HDF5 file: {err}") from None


def attr_list(group: h5py.Group, name: str) -> list[str] | None:
    """A string-list attribute, joined back when Keras split it into name0, name1, ...
    (HDF5 caps an object header at 64 KiB); None when absent."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    elif f"{name}0" in group.attrs:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    return [n.decode("utf8") if isinstance(n, bytes) else str(n)
            for chunk in chunks for n in np.atleast_1d(chunk)]


def _legacy_layers(root: h5py.Group, path: str) -> Iterator[tuple[str, list[np.ndarray]]]:
    for name in attr_list(root, "layer_names"):
        if name not in root:
            raise ValueError(f"{path}: layer_names lists {name!r} but the file has no such group")
        group = root[name]
        # Weight names are paths relative to the layer group: "block1_conv1_W_1:0" (Keras 1)
        # or "block1_conv1/kernel:0" (Keras 2, a nested group).
        arrays = [np.asarray(group[w]) for w in attr_list(group, "weight_names") or []]
        if arrays:
            yield name, arrays


def _keras3_layers(layers: h5py.Group, arch: str) -> dict[str, list[np.ndarray]]:
    """Keras 3 keys layers by class counters (conv2d, conv2d_1, ..., dense, dense_1, ...), not
    by layer name, so convs and dense layers get `arch`'s names in file order; any beyond
    those keep their file key, which check_variables then reports as unexpected."""
    import h5py

    found = []
    for key in sorted(layers, key=_natural_key):
        vars_group = layers[key].get("vars")
        if isinstance(vars_group, h5py.Group) and len(vars_group):
            found.append((key, [np.asarray(vars_group[str(i)]) for i in range(len(vars_group))]))
    names = {4: iter(conv_names(BLOCK_SIZES[arch])), 2: iter(TOP)}
    out = {}
    for key, arrays in found:
        rank = max(a.ndim for a in arrays)
        out[next(names[rank], key) if rank in names else key] = arrays
    return out


def _natural_key(key: str) -> tuple[str, int]:
    """conv2d_10 after conv2d_9: (class prefix, counter) with no suffix counting as 0."""
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
    return m.group(1), int(m.group(2) or 0)


def kernel_and_bias(path: str, layer: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Tell kernel from bias by rank, not by name: names differ between Keras versions."""
    kernels = [a for a in arrays if a.ndim >= 2]
    biases = [a for a in arrays if a.ndim == 1]
    if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
        shapes = [a.shape for a in arrays]
        raise ValueError(f"{path}: layer {layer!r} holds {len(arrays)} weight(s) of shapes "
                         f"{shapes}; expected one kernel and one bias")
    check_floats({f"layer {layer!r} weight {i}": a for i, a in enumerate(arrays)}, path)
    return {"kernel": kernels[0].astype(np.float32, copy=False),
            "bias": biases[0].astype(np.float32, copy=False)}


def _layer_order(name: str) -> tuple:
    m = LAYER_RE.fullmatch(name)
    if m:
        return (int(m.group(1)), int(m.group(2)), "")
    return (len(BLOCK_SIZES) + 2, TOP.index(name) if name in TOP else len(TOP), name)


def write_legacy_h5(params: Mapping, path: str | os.PathLike, names: str = "keras1",
                    chunk_layer_names: bool = False) -> None:
    """Write `{layer: {"kernel", "bias"}}` in the published legacy Keras layout.

    Root attributes `layer_names` (bytes; split into `layer_names0..2` with
    `chunk_layer_names`), `backend`, `keras_version`; one group per layer in forward order,
    including the weightless `input_1`, `blockN_pool` and `flatten` with an empty
    `weight_names`. `names="keras1"` stores `block1_conv1_W_1:0` / `block1_conv1_b_1:0` in the
    layer group, as the files keras.applications downloads do; `"keras2"` stores
    `block1_conv1/kernel:0` / `block1_conv1/bias:0` (a nested group). Layers are written as
    given, even incomplete or extra ones, so tests can also produce broken files.
    """
    if names not in ("keras1", "keras2"):
        raise ValueError(f"names must be 'keras1' or 'keras2', found {names!r}")
    ordered = sorted(params, key=_layer_order)
    layer_names = ["input_1"]
    for i, name in enumerate(ordered):
        if name in TOP and "flatten" not in layer_names:
            layer_names.append("flatten")
        layer_names.append(name)
        m = LAYER_RE.fullmatch(name)
        next_m = LAYER_RE.fullmatch(ordered[i + 1]) if i + 1 < len(ordered) else None
        if m and (next_m is None or next_m.group(1) != m.group(1)):
            layer_names.append(f"block{m.group(1)}_pool")
    import h5py

    with h5py.File(path, "w") as f:
        encoded = np.array([n.encode("utf8") for n in layer_names])
        if chunk_layer_names:
            for i, chunk in enumerate(np.array_split(encoded, 3)):
                f.attrs[f"layer_names{i}"] = chunk
        else:
            f.attrs["layer_names"] = encoded
        # Present in the published files; no reader (Keras 3's included) acts on their values.
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"1.1.0" if names == "keras1" else b"2.2.4"
        for name in layer_names:
            group = f.create_group(name)
            if name not in params:
                group.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            if names == "keras1":
                weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"]
            else:
                weight_names = [f"{name}/kernel:0", f"{name}/bias:0"]
            group.attrs["weight_names"] = np.array([w.encode("utf8") for w in weight_names])
            for w, key in zip(weight_names, ("kernel", "bias")):
                group.create_dataset(w, data=np.asarray(params[name][key]))
