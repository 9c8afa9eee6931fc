"""The VGG family and the book's classifier as Flax NNX modules, on the Linen face's architecture.

Each NNX module keeps its Linen twin as `config`: the options, the layer names and shapes
(`vgg.variable_shapes`) and the forward pass (`vgg.forward`, `heads.head_forward`) are the
Linen ones, so the two faces cannot drift apart. Only parameter storage differs: here each layer
is an attribute named as in Keras (`model.block5_conv3.kernel`), BatchNorm statistics are
`nnx.BatchStat`s, and `model.train()` / `model.eval()` switch BatchNorm and dropout.
Modules start in eval mode, as `model.apply(...)` does (train=False).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vggjax.model import conv, vgg
from vggjax.inference import heads
from vggjax.utils.trees import diff


class Conv3x3(nnx.Module):
    """3x3 stride-1 SAME conv: kernel (3, 3, in, out) HWIO, bias (out,), computed by
    `conv.conv3x3` with `impl` ("direct", "winograd", "onednn", "auto")."""

    def __init__(self, in_features: int, out_features: int, *, impl: str = "direct",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        shape = (3, 3, in_features, out_features)
        self.kernel = nnx.Param(conv.CONV_KERNEL_INIT(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.impl, self.dtype = impl, dtype

    def __call__(self, x, relu: bool = False):
        return conv.conv3x3(x, self.kernel[...], self.bias[...], self.impl, relu, self.dtype)


class VGG(nnx.Module):
    """VGG11/13/16/19 (optionally with BatchNorm) as an NNX module; the keyword arguments are the
    Linen `vggjax.VGG`'s (`include_top`, `pooling`, `num_classes`, `classifier_activation`,
    `top_input`, `dropout_rate`, `dtype`, `param_dtype`, `conv_impl`, `block_sizes`, `batch_norm`).

    `model(x, outputs=None)`: x (N, H, W, 3) float images preprocessed for the weights
    (`model.preprocess`); returns what the Linen VGG returns (probabilities / logits, conv
    features, or a dict of the `outputs` layers).
    """

    def __init__(self, *, rngs: nnx.Rngs, preprocessing: str | None = None, **options):
        self.config = vgg.VGG(**options)
        self.config.check_config()
        self.preprocessing = preprocessing  # the weights' preprocess_input mode, when loaded
        c = self.config
        dtypes = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        for name, shape in _layer_shapes(vgg.variable_shapes(c)).items():
            if name.endswith("_bn"):
                layer = nnx.BatchNorm(shape[0], use_running_average=True, momentum=vgg.BN_MOMENTUM,
                                      epsilon=vgg.BN_EPSILON, rngs=rngs, **dtypes)
            elif len(shape) == 4:
                layer = Conv3x3(shape[2], shape[3], impl=c.conv_impl, rngs=rngs, **dtypes)
            else:
                layer = nnx.Linear(*shape, rngs=rngs, **dtypes)
            setattr(self, name, layer)
        if c.include_top and c.dropout_rate:
            self.dropout = nnx.Dropout(c.dropout_rate, deterministic=True, rngs=rngs)

    def __call__(self, x, outputs=None):
        return vgg.forward(self.config, _Layers(self), x, outputs)

    def layer_names(self) -> list[str]:
        """Every layer `outputs=` can ask for, in forward order."""
        return self.config.layer_names()

    def preprocess(self, images):
        """RGB NHWC images (uint8 or float 0..255) -> float32 input in the weights' convention."""
        from vggjax.weights.preprocessing import prepare_images
        if self.preprocessing is None:
            raise ValueError("this VGG has random weights and no preprocessing mode; load converted "
                             "weights with vggjax.nnx.load, or call vggjax.preprocess_input(x, mode)")
        return prepare_images(images, self.preprocessing)


class _Layers:
    """`vgg.forward`'s layers, looked up by their Keras names on an NNX VGG."""

    def __init__(self, module):
        self.m = module

    def conv(self, name, width, relu, x):
        return getattr(self.m, name)(x, relu=relu)

    def batch_norm(self, name, x):
        return getattr(self.m, name)(x)

    def dense(self, name, units, x):
        return getattr(self.m, name)(x)

    def dropout(self, x):
        return self.m.dropout(x)

    def top(self, x, taps):
        return vgg.top(self.m.config, self, x, taps)

    def perturbed(self, name):  # no tap points: Grad-CAM runs on the Linen twin (to_linen)
        return False

    def perturb(self, name, x):
        return x


def _layer_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """{"block1_conv1": (3, 3, 3, 64), "block1_conv1_bn": (64,), "fc1": (25088, 4096), ...}:
    each layer's kernel (BatchNorm: scale) shape, from `variable_shapes`, in forward order."""
    out = {}
    for path, shape in shapes.items():
        collection, layer, name = path.split("/")
        if collection == "params" and name in ("kernel", "scale"):
            out[layer] = shape
    return out


class Head(nnx.Module):
    """The book's head (flatten -> Dense(units) relu -> Dropout -> Dense(num_outputs)) in NNX;
    `in_features` is the pooled feature size (4*4*512 for VGG16 at 150x150, flattened). Keyword
    arguments as the Linen `vggjax.inference.heads.Head`."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, **options):
        self.config = heads.Head(**options)
        c, init = self.config, heads.HEAD_KERNEL_INIT
        dtypes = dict(dtype=c.dtype, param_dtype=c.param_dtype, kernel_init=init)
        for name, width in heads.hidden_layers(c):
            setattr(self, name, nnx.Linear(in_features, width, rngs=rngs, **dtypes))
            in_features = width
        self.dropout = nnx.Dropout(c.dropout_rate, deterministic=True, rngs=rngs)
        self.logits = nnx.Linear(in_features, c.num_outputs, rngs=rngs, **dtypes)

    def __call__(self, x):
        return heads.head_forward(self.config, self, x)

    def dense(self, name, units, x):  # the layers `head_forward` runs
        return getattr(self, name)(x)


class Classifier(nnx.Module):
    """`head` on a headless NNX `base`: x (N, H, W, 3) preprocessed images -> (N, num_outputs)
    logits. `train()` leaves the base's BatchNorm on its running statistics unless
    `train_base_batch_norm` (Keras' behaviour for a pretrained base, as in the Linen Classifier)."""

    def __init__(self, base: VGG, head: Head, train_base_batch_norm: bool = False):
        if base.config.include_top:
            raise ValueError("the classifier's base must be headless: create it with include_top=False")
        self.base, self.head, self.train_base_batch_norm = base, head, train_base_batch_norm

    def __call__(self, x):
        return self.head(self.base(x))

    def train(self, **attributes):
        super().train(**attributes)
        if not self.train_base_batch_norm:
            self.base.set_attributes(use_running_average=True, raise_if_not_found=False)

    @property
    def config(self) -> heads.Classifier:
        return heads.Classifier(base=self.base.config, head=self.head.config,
                                           train_base_batch_norm=self.train_base_batch_norm)


ARCHS = vgg.ARCHS


def create(arch: str, *, rngs: nnx.Rngs, **kwargs) -> VGG:
    """NNX VGG for an arch name ("vgg16", "vgg19_bn", ...) with the Linen `create`'s arguments."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    return VGG(**ARCHS[arch], rngs=rngs, **kwargs)


VGG11, VGG13, VGG16, VGG19, VGG11_BN, VGG13_BN, VGG16_BN, VGG19_BN = (
    functools.partial(VGG, **ARCHS[name]) for name in
    ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"))


def variables(model: nnx.Module) -> dict:
    """The Linen variables of an NNX VGG or Classifier: {"params": ...[, "batch_stats": ...]},
    so `model.config.apply(variables(model), x)` computes what `model(x)` does (in eval mode)."""
    out = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    if stats := nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)):
        out["batch_stats"] = stats
    return out


def to_linen(model: nnx.Module) -> tuple[Any, dict]:
    """(Linen module, variables) of an NNX VGG or Classifier: what LPIPS, the feature and style
    losses and Grad-CAM take (`vggjax.losses.perceptual.LPIPS(*vggjax.nnx.to_linen(model), lins)`)."""
    return model.config, variables(model)


def set_variables(model: nnx.Module, linen_variables: Mapping) -> None:
    """Put Linen variables ({"params"[, "batch_stats"]}, NumPy or JAX) into `model`, in place.

    ValueError naming every missing / unexpected layer and shape that differs."""
    have = {k: v for k, v in dict(linen_variables).items() if k in ("params", "batch_stats")}
    want = jax.tree.map(lambda v: v.shape, variables(model))
    if problems := diff(have, want) + ([f"unexpected collections {sorted(set(linen_variables) - set(have))}"]
                                        if set(linen_variables) - set(have) else []):
        raise ValueError("the variables do not fit this NNX model: " + "; ".join(problems))
    for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        if collection in have:
            state = nnx.state(model, kind)
            nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, have[collection]))
            nnx.update(model, state)


def from_linen(module, linen_variables: Mapping, preprocessing: str | None = None,
               rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The NNX twin of a Linen `VGG` or `Classifier` holding `linen_variables` (no random init);
    its dropout draws from `rngs` (default nnx.Rngs(0))."""
    def build():
        rngs = nnx.Rngs(0)
        if isinstance(module, heads.Classifier):
            base = VGG(rngs=rngs, preprocessing=preprocessing, **_fields(module.base))
            head_params = linen_variables["params"]["head"]
            first = ([name for name, _ in heads.hidden_layers(module.head)] + ["logits"])[0]
            size = int(head_params[first]["kernel"].shape[0])
            head = Head(size, rngs=rngs, **_fields(module.head))
            return Classifier(base, head, module.train_base_batch_norm)
        return VGG(rngs=rngs, preprocessing=preprocessing, **_fields(module))

    model = nnx.eval_shape(build)  # shapes only: the values come from linen_variables
    set_variables(model, linen_variables)
    rngs = rngs or nnx.Rngs(0)
    for _, layer in nnx.iter_modules(model):
        if isinstance(layer, nnx.Dropout):  # its abstract key from eval_shape, made real
            layer.rngs = rngs[layer.rng_collection].fork()
    return model


def _fields(module) -> dict:
    """A Linen module's dataclass fields (its options), without Linen's own bookkeeping."""
    return {name: getattr(module, name) for name in module.__dataclass_fields__
            if name not in ("parent", "name")}
