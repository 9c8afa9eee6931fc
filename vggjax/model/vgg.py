"""The VGG family as one Flax Linen module whose parameters carry the Keras layer names."""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vggjax.model.conv import Conv3x3
from vggjax.model.pooling import TORCH_GRID, max_pool2x2, torch_pool
from vggjax.utils.deprecation import moved_names
from vggjax.utils.trees import flatten

# Convolutions per block; every block doubles the width up to 512 and ends in a 2x2 max pool.
BLOCK_SIZES = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
TOP_INPUTS = ("keras", "torch")  # how the top sees block5: Keras flattens, torchvision pools to 7x7
TOP = ("fc1", "fc2", "predictions")  # the ImageNet classifier's layers (include_top)
POOLINGS = (None, "avg", "max")
MIN_SIZE = 32  # five 2x2 poolings: anything smaller pools to nothing
# The tap points (see `_LinenLayers.perturb`): each conv's output and pre-activation, as
# {"taps": {"block5_conv3": ...}} in these collections of the VGG's scope.
PERTURBATIONS, TAPPED, TAPS = "perturbations", "intermediates", "taps"


__getattr__ = moved_names(__name__, {"adaptive_pool_matrix": "vggjax.model.pooling"})

# torchvision's BatchNorm2d: eps 1e-5, momentum 0.1 (Flax counts the other way: 0.9).
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
FC_UNITS, TOP_GRID = 4096, TORCH_GRID  # fc1/fc2 width; the top reads a 7x7x512 grid


def conv_names(block_sizes: Sequence[int]) -> list[str]:
    """Keras names of the conv layers in order: block1_conv1 ... block5_convN."""
    return [f"block{b}_conv{i}" for b, n in enumerate(block_sizes, 1) for i in range(1, n + 1)]


class VGG(nn.Module):
    """VGG11/13/16/19 (optionally with BatchNorm), Keras-style arguments.

    Input: float NHWC images already preprocessed for the weights (see `preprocess_input`),
    at least 32x32, 3 channels. Output: (N, num_classes) probabilities
    (`classifier_activation="softmax"`) or logits (None); with `include_top=False` the
    (N, H/32, W/32, 512) conv features, or (N, 512) with `pooling`.
    `outputs=("block3_conv3", "fc2", ...)` returns a dict of those layers' outputs instead,
    computed in one pass that stops after the last one asked for.
    """

    block_sizes: Sequence[int] = BLOCK_SIZES["vgg16"]
    batch_norm: bool = False
    include_top: bool = True
    pooling: str | None = None
    num_classes: int = 1000
    classifier_activation: str | None = "softmax"
    top_input: str = "keras"  # "keras": flatten, 224x224 only; "torch": adaptive 7x7 average pool, any size
    dropout_rate: float = 0.0  # torchvision's head trains with 0.5; Keras' has no dropout
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # one of vggjax.model.conv.IMPLS; "auto" is vggjax.model.conv.choose_impl's policy
    conv_impl: str = "direct"

    def layer_names(self) -> list[str]:
        """Every layer whose output `outputs=` can ask for, in forward order.

        `blockN_convM` is a conv's output after its ReLU (after BatchNorm in the _bn variants);
        `blockN_convM_preact` the same output before the ReLU (ESRGAN-style feature losses).
        """
        names = []
        for b, n in enumerate(self.block_sizes, 1):
            for i in range(1, n + 1):
                names += [f"block{b}_conv{i}_preact", f"block{b}_conv{i}"]
            names.append(f"block{b}_pool")
        if self.include_top:
            names += ["flatten", "fc1", "fc2", "predictions"]
        elif self.pooling:
            names += [f"global_{self.pooling}_pool"]
        return names

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise ValueError naming what was expected when `shape` (NHWC) cannot go through."""
        if len(shape) != 4:
            raise ValueError(f"VGG expects NHWC images (4 dims), found shape {tuple(shape)}")
        _, h, w, c = shape
        if c != 3:
            raise ValueError(f"VGG expects 3 channels (RGB, NHWC), found {c} in shape {tuple(shape)}")
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(f"VGG expects images of at least {MIN_SIZE}x{MIN_SIZE}, found {h}x{w}")
        if self.include_top and self.top_input == "keras" and (h, w) != (224, 224):
            raise ValueError(
                f"the Keras top (flatten -> fc1) expects 224x224 inputs, found {h}x{w}; "
                "use include_top=False or top_input='torch' for other sizes")

    def check_config(self) -> None:
        """ValueError (one line) for a top_input, pooling or classifier_activation VGG lacks."""
        if self.top_input not in TOP_INPUTS:
            raise ValueError(f"top_input must be one of {TOP_INPUTS}, found {self.top_input!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, found {self.pooling!r}")
        if self.classifier_activation not in ("softmax", None):
            raise ValueError(
                f"classifier_activation must be 'softmax' or None, found {self.classifier_activation!r}")

    @nn.compact
    def __call__(self, x, train: bool = False, outputs: Sequence[str] | None = None):
        return forward(self, _LinenLayers(self, train), x, outputs)


def forward(config: VGG, layers, x, outputs: Sequence[str] | None):
    """The one VGG forward pass, for both faces: `config` (a Linen VGG, bound or not) holds the
    options, `layers` runs the named layers (`_LinenLayers` here, vggjax.nnx's own there).
    x: (N, H, W, 3) preprocessed floats -> see VGG's docstring for the outputs."""
    config.check_config()
    config.check_input(x.shape)
    taps = _Taps(outputs, config.layer_names())
    x = features(config, layers, jnp.asarray(x, config.dtype), taps)
    if taps.done:
        return taps.values
    if config.include_top:
        x = layers.top(x, taps)
    elif config.pooling:
        x = jnp.mean(x, axis=(1, 2)) if config.pooling == "avg" else jnp.max(x, axis=(1, 2))
        taps(f"global_{config.pooling}_pool", x)
    return taps.values if taps.wanted else x


def features(config: VGG, layers, x, taps: "_Taps"):
    """The conv base: (N, H, W, 3) -> (N, H/32, W/32, 512); stops early once `taps` is full."""
    for b, (n, width) in enumerate(zip(config.block_sizes, WIDTHS), 1):
        for i in range(1, n + 1):
            name = f"block{b}_conv{i}"
            # The ReLU goes into the conv unless BatchNorm or a `_preact` output or perturbation
            # sits between.
            preact = f"{name}_preact"
            fuse = not (config.batch_norm or preact in taps.wanted or layers.perturbed(preact))
            x = layers.conv(name, width, fuse, x)
            if not fuse:
                if config.batch_norm:
                    x = layers.batch_norm(f"{name}_bn", x)
                x = layers.perturb(preact, x)
                if taps(preact, x):
                    return x
                x = nn.relu(x)
            x = layers.perturb(name, x)
            if taps(name, x):
                return x
        x = max_pool2x2(x)
        if taps(f"block{b}_pool", x):
            return x
    return x


def top(config: VGG, layers, x, taps: "_Taps"):
    """The ImageNet classifier: conv features -> (N, num_classes) probabilities or logits."""
    if config.top_input == "torch":
        x = torch_pool(x)
    # H, W, C flatten order: the Keras layout, and the one the converter gives torch's fc1.
    x = x.reshape(x.shape[0], -1)
    if taps("flatten", x):
        return x
    for name in ("fc1", "fc2"):
        x = nn.relu(layers.dense(name, FC_UNITS, x))
        if config.dropout_rate:
            x = layers.dropout(x)
        if taps(name, x):
            return x
    x = layers.dense("predictions", config.num_classes, x)
    if config.classifier_activation == "softmax":
        x = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
    taps("predictions", x)
    return x


class _LinenLayers:
    """The layers of `forward` as Linen submodules, created inside VGG's compact call (so their
    parameters carry the Keras names)."""

    def __init__(self, module: VGG, train: bool):
        self.m, self.train = module, train
        self.dtypes = dict(dtype=module.dtype, param_dtype=module.param_dtype)

    def conv(self, name, width, relu, x):
        return Conv3x3(width, self.m.conv_impl, relu, name=name, **self.dtypes)(x)

    def batch_norm(self, name, x):
        return nn.BatchNorm(use_running_average=not self.train, momentum=BN_MOMENTUM,
                            epsilon=BN_EPSILON, name=name, **self.dtypes)(x)

    def dense(self, name, units, x):
        return nn.Dense(units, name=name, **self.dtypes)(x)

    def dropout(self, x):
        return nn.Dropout(self.m.dropout_rate, deterministic=not self.train)(x)

    def top(self, x, taps):
        return top(self.m, self, x, taps)

    def perturbed(self, name: str) -> bool:
        """Whether `perturb(name, ...)` changes anything in this pass: every tap point is
        declared while the PERTURBATIONS collection is mutable (outside init), else only those
        given a perturbation."""
        m = self.m
        declaring = m.is_mutable_collection(PERTURBATIONS) and not m.is_initializing()
        return declaring or name in _tapped(m, PERTURBATIONS)

    def perturb(self, name: str, x):
        """x plus the perturbation given for `name` (a zero one declared in a declaring pass),
        with x itself recorded in TAPPED when that collection is mutable: jax.grad with respect
        to a zero perturbation is the gradient at this layer's output, with no second forward
        pass (how vggjax.viz.convnet.layer_gradient takes it)."""
        m = self.m
        if not self.perturbed(name):
            return x
        if m.is_mutable_collection(PERTURBATIONS):
            m.put_variable(PERTURBATIONS, TAPS, {**_tapped(m, PERTURBATIONS), name: jnp.zeros_like(x)})
        if m.is_mutable_collection(TAPPED):
            m.put_variable(TAPPED, TAPS, {**_tapped(m, TAPPED), name: x})
        return x + _tapped(m, PERTURBATIONS)[name]


def _tapped(module: nn.Module, collection: str) -> dict:
    return dict(module.get_variable(collection, TAPS, {}))


class _Taps:
    """The layer outputs `outputs=` asked for, collected during one forward pass."""

    def __init__(self, wanted: Sequence[str] | None, known: Sequence[str]):
        self.wanted = set(wanted or ())
        unknown = self.wanted - set(known)
        if unknown:
            raise ValueError(f"unknown layer(s) {sorted(unknown)}; this model has {list(known)}")
        self.values: dict = {}

    def __call__(self, name: str, value) -> bool:
        """Record `value` if `name` was asked for; True once every asked-for layer is in."""
        if name in self.wanted:
            self.values[name] = value
        return self.done

    @property
    def done(self) -> bool:
        return bool(self.wanted) and len(self.values) == len(self.wanted)


ARCHS = {
    **{name: dict(block_sizes=sizes) for name, sizes in BLOCK_SIZES.items()},
    **{f"{name}_bn": dict(block_sizes=sizes, batch_norm=True) for name, sizes in BLOCK_SIZES.items()},
}

VGG11 = functools.partial(VGG, **ARCHS["vgg11"])
VGG13 = functools.partial(VGG, **ARCHS["vgg13"])
VGG16 = functools.partial(VGG, **ARCHS["vgg16"])
VGG19 = functools.partial(VGG, **ARCHS["vgg19"])
VGG11_BN = functools.partial(VGG, **ARCHS["vgg11_bn"])
VGG13_BN = functools.partial(VGG, **ARCHS["vgg13_bn"])
VGG16_BN = functools.partial(VGG, **ARCHS["vgg16_bn"])
VGG19_BN = functools.partial(VGG, **ARCHS["vgg19_bn"])


def create(arch: str, **kwargs) -> VGG:
    """VGG module for an arch name ("vgg16", "vgg19_bn", ...) with Keras-style keyword arguments."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    return VGG(**ARCHS[arch], **kwargs)


def variable_shapes(config: VGG) -> dict[str, tuple]:
    """{"params/block1_conv1/kernel": (3, 3, 3, 64), ...}: every variable of `config`, by
    tracing its init at 224x224 without computing anything."""
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(config.init, jax.random.PRNGKey(0), images)
    return {path: tuple(leaf.shape) for path, leaf in flatten(variables).items()}


def init_random(model: VGG, seed: int = 0) -> dict:
    """Seeded random variables from `model`'s own Flax initialisers (convs He-normal over
    fan-out, zero biases, BatchNorm 1/0): {"params": ..., ["batch_stats": ...]}, JAX arrays in
    the param dtype (float32). The values do not depend on the input size, so the smallest the
    model takes is used: 32x32, or 224x224 under the Keras top."""
    size = TOP_GRID * MIN_SIZE if model.include_top and model.top_input == "keras" else MIN_SIZE
    return _jit_init(model, jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3), jnp.float32))


@functools.partial(jax.jit, static_argnums=0)  # one compilation per model, whatever the seed
def _jit_init(model: VGG, key, x):
    return model.init(key, x)


def without_top(params: Mapping) -> dict:
    """`params` without the ImageNet classifier's layers (`TOP`): the headless VGG's params,
    the same arrays (conv kernels (3, 3, in, out) and biases), not copies."""
    return {name: value for name, value in params.items() if name not in TOP}


def find_arch(convs: Sequence[int] | int, batch_norm: bool = False) -> str | None:
    """The ARCHS name ("vgg16", "vgg11_bn", ...) with these block sizes, or with this many conv
    layers in all (an int: each VGG has its own count), and this BatchNorm use; None if none."""
    total = np.ndim(convs) == 0
    want = int(convs) if total else tuple(convs)
    for name, cfg in ARCHS.items():
        sizes = tuple(cfg["block_sizes"])
        if (sum(sizes) if total else sizes) == want and cfg.get("batch_norm", False) == batch_norm:
            return name
    return None


def arch_name(model: VGG) -> str:
    """Inverse of `create`: "vgg16", "vgg11_bn", ..."""
    name = find_arch(model.block_sizes, model.batch_norm)
    if name is None:
        raise ValueError(f"block sizes {tuple(model.block_sizes)} are not a known VGG")
    return name
