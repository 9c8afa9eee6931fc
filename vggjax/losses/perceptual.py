"""VGG as a loss: LPIPS, feature (perceptual), Gram style and total-variation losses, and the
neural-style-transfer loss of "Deep Learning with Python" as presets.

Every loss returns float32 per image, shape (N,) (LPIPS `spatial=True`: (N, H, W)), whatever
the model's compute dtype; all are pure functions of arrays, so they jit, vmap and shard with
the batch. LPIPS takes images in [-1, 1]; the other losses take what `model.apply` takes
(images preprocessed for the weights).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import vggjax
from vggjax.model.vgg import VGG, without_top
from vggjax.utils.checks import check_finite, check_nhwc, check_range, warn_if_raw
from vggjax.weights.torch_pickle import read_state_dict

# lpips's VGG16 taps: torchvision features[0:4], [4:9], [9:16], [16:23], [23:30], each after a ReLU.
LPIPS_TAPS = ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3")
LPIPS_WIDTHS = (64, 128, 256, 512, 512)
# lpips's ScalingLayer: ImageNet mean/std re-expressed for [-1, 1] inputs (v0.1 only).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_VERSIONS = ("0.1", "0.0")
NORM_EPS = 1e-10  # lpips.normalize_tensor's eps
STYLE_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")


def _unit(f: jnp.ndarray) -> jnp.ndarray:
    """lpips.normalize_tensor over the channel axis, f / (||f|| + 1e-10), in float32.

    lpips takes sqrt(0) where a feature vector is all zero, whose gradient is inf (NaN after the
    chain rule: lpips #69, #121). Here the root only ever sees positive sums, so the forward value
    is lpips' own and the gradient is finite everywhere.
    """
    f = f.astype(jnp.float32)
    s = jnp.sum(f * f, axis=-1, keepdims=True)
    norm = jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


def taps(model: VGG, variables: Mapping, x, layers: Sequence[str]) -> dict[str, jnp.ndarray]:
    """{layer: float32 (N, h, w, C)} for `layers` of `model` (post-ReLU `blockN_convM` or
    pre-ReLU `blockN_convM_preact`), computed in one pass in the model's dtype."""
    out = model.apply(variables, x, outputs=tuple(layers))
    return {name: out[name].astype(jnp.float32) for name in layers}


def _layer_weights(layers: Sequence[str], weights: Sequence[float] | None) -> tuple[float, ...]:
    if not layers:
        raise ValueError("layers must name at least one layer")
    if weights is None:
        return (1.0 / len(layers),) * len(layers)
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} weights for {len(layers)} layers {tuple(layers)}")
    return tuple(float(w) for w in weights)


@struct.dataclass
class LPIPS:
    """LPIPS-VGG distance of images in [-1, 1] (or [0, 1] with normalize=True), computing what
    `lpips.LPIPS(net="vgg", version="0.1" or "0.0")` computes.

    A pytree (the trunk's variables and the five lin vectors are leaves), so it can be passed
    into `jax.jit`ted functions. Build it with `LPIPS.load`.
    """

    model: VGG = struct.field(pytree_node=False)  # VGG16 conv base, torchvision weights
    variables: dict
    lins: tuple  # five float32 (C,) vectors: lpips's 1x1 "lin" convs, C = 64, 128, 256, 512, 512
    version: str = struct.field(pytree_node=False, default="0.1")

    @classmethod
    def load(cls, trunk: str | os.PathLike, lin: str | os.PathLike | None = None,
             version: str = "0.1", dtype=jnp.float32, conv_impl: str = "auto") -> "LPIPS":
        """`trunk`: a directory from `vggjax convert --source torchvision --arch vgg16`
        (with or without top); `lin`: lpips's `weights/v<version>/vgg.pth`, None = the one in
        an installed `lpips` package (never downloaded). `dtype=jnp.bfloat16` runs the trunk in
        bf16; distances stay float32. `conv_impl`: see `vggjax.VGG` ("auto" is faster on CPU)."""
        if version not in LPIPS_VERSIONS:
            raise ValueError(f"LPIPS version must be one of {LPIPS_VERSIONS}, found {version!r}")
        lins = read_lin(lin if lin is not None else installed_lin_path(version))
        pretrained = vggjax.load(trunk)
        meta = pretrained.meta
        if meta["arch"] != "vgg16" or meta["preprocessing"] != "torch":
            raise ValueError(
                f"{trunk}: LPIPS-VGG's lin layers were calibrated on torchvision's vgg16; this "
                f"checkpoint is {meta.get('source', '?')} {meta['arch']} expecting "
                f"{meta['preprocessing']!r} inputs (convert it with --source torchvision --arch vgg16)")
        return cls(model=vggjax.create("vgg16", include_top=False, dtype=dtype, conv_impl=conv_impl),
                   variables={"params": without_top(pretrained.params)}, lins=lins, version=version)

    def __call__(self, x0, x1, normalize: bool = False, spatial: bool = False) -> jnp.ndarray:
        """LPIPS distance between NHWC RGB images in [-1, 1] (`normalize=True`: [0, 1]).

        x0, x1: float (N, H, W, 3), H and W >= 32. Returns float32 (N,), or with
        `spatial=True` the (N, H, W) map (per-tap maps bilinearly upsampled, as lpips does).
        """
        low = 0.0 if normalize else -1.0
        for name, x in (("x0", x0), ("x1", x1)):
            check_nhwc(x, f"LPIPS {name}")
            check_range(x, low, 1.0, f"LPIPS {name}{' (normalize=True)' if normalize else ''}",
                        "; for 0..255 images pass x / 127.5 - 1, or x / 255 with normalize=True")
        if np.shape(x0) != np.shape(x1):
            raise ValueError(f"LPIPS compares images of one shape, found {np.shape(x0)} and {np.shape(x1)}")
        return _distance(self, x0, x1, normalize, spatial)

    def features(self, x, normalize: bool = False) -> dict[str, jnp.ndarray]:
        """The five trunk taps LPIPS compares, float32, for images in [-1, 1] ([0, 1] with normalize)."""
        x = jnp.asarray(x, jnp.float32)
        if normalize:
            x = 2 * x - 1
        if self.version == "0.1":  # v0.0 fed [-1, 1] to the trunk unscaled (lpips' "bug", kept)
            x = (x - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
        return taps(self.model, self.variables, x, LPIPS_TAPS)


@functools.partial(jax.jit, static_argnames=("normalize", "spatial"))
def _distance(lp: LPIPS, x0, x1, normalize: bool, spatial: bool) -> jnp.ndarray:
    # Compiled here (not only by the caller) so that eager calls do not run op by op.
    f0, f1 = lp.features(x0, normalize), lp.features(x1, normalize)
    n, h, w = x0.shape[:3]
    total = 0.0
    for name, lin in zip(LPIPS_TAPS, lp.lins):
        d = jnp.einsum("nhwc,c->nhw", (_unit(f0[name]) - _unit(f1[name])) ** 2, lin)
        if spatial:  # torch Upsample(mode="bilinear", align_corners=False)
            total = total + jax.image.resize(d, (n, h, w), "linear", antialias=False)
        else:
            total = total + jnp.mean(d, axis=(1, 2))
    return total


def installed_lin_path(version: str) -> Path:
    """lpips/weights/v<version>/vgg.pth inside an installed `lpips` package (not imported)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "LPIPS lin weights: pass lin=<path to lpips/weights/v0.1/vgg.pth> or install the lpips "
            "package that ships them (pip install --no-deps lpips; only its 7 KB file is read)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / f"v{version}" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"the installed lpips package has no {path}; pass lin=<path>")
    return path


def read_lin(path: str | os.PathLike) -> tuple[np.ndarray, ...]:
    """lpips's "lin" file (`lin{k}.model.1.weight`, (1, C, 1, 1)) -> five float32 (C,) vectors,
    read without torch and without running pickled code."""
    state = read_state_dict(path)
    want = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_WIDTHS)}
    problems = [f"{k}: expected {s}, found {state[k].shape if k in state else 'nothing'}"
                for k, s in want.items() if k not in state or state[k].shape != s]
    if problems:
        raise ValueError(f"{path} is not an lpips VGG lin file: " + "; ".join(problems))
    return tuple(np.asarray(state[k][0, :, 0, 0], np.float32) for k in want)


def feature_loss(model: VGG, variables: Mapping, x, y, layers: Sequence[str] = ("block3_conv3",),
                 weights: Sequence[float] | None = None, kind: str = "mse") -> jnp.ndarray:
    """Perceptual loss: sum over `layers` of weight * mean over (h, w, C) of (f(x) - f(y))**2
    ("mse") or |f(x) - f(y)| ("l1").

    x, y: (N, H, W, 3) as `model.apply` takes them (preprocessed). Layer names may be
    post-ReLU (`block3_conv3`) or pre-ReLU (`block3_conv3_preact`, as ESRGAN uses).
    weights: one per layer, default 1/len(layers). Returns float32 (N,).
    """
    if kind not in ("mse", "l1"):
        raise ValueError(f"kind must be 'mse' or 'l1', found {kind!r}")
    if np.shape(x) != np.shape(y):
        raise ValueError(f"feature_loss compares images of one shape, found {np.shape(x)} and {np.shape(y)}")
    _check_images("feature_loss", x=x, y=y)
    weights = _layer_weights(layers, weights)
    fx, fy = taps(model, variables, x, layers), taps(model, variables, y, layers)
    total = 0.0
    for name, w in zip(layers, weights):
        d = fx[name] - fy[name]
        total = total + w * jnp.mean(d * d if kind == "mse" else jnp.abs(d), axis=(1, 2, 3))
    return total


def _check_images(what: str, **images) -> None:
    """Each concrete batch of `images` NHWC and finite (ValueError), and not raw uint8 (a warning)."""
    for name, x in images.items():
        check_nhwc(x, f"{what} {name}")
        check_finite(x, f"{what} {name}")
        warn_if_raw(x, f"{what} {name}")


def gram(f: jnp.ndarray) -> jnp.ndarray:
    """(N, h, w, C) features -> (N, C, C) float32 Gram matrices F @ F.T, F the (C, h*w) matrix."""
    f = f.astype(jnp.float32)
    return jnp.einsum("nhwc,nhwd->ncd", f, f)


def _gram_distance(g: jnp.ndarray, target: jnp.ndarray, denom) -> jnp.ndarray:
    return jnp.sum((g - target) ** 2, axis=(1, 2)) / denom


def style_loss(model: VGG, variables: Mapping, x, style, layers: Sequence[str] = STYLE_LAYERS,
               weights: Sequence[float] | None = None, normalization: str = "gatys") -> jnp.ndarray:
    """Gram-matrix style loss: sum over `layers` of weight * sum((G(x) - G(style))**2) / denom.

    denom: "gatys" = 4 * C**2 * (h*w)**2 of each layer; "book" = 4 * 3**2 * (H*W)**2 of the
    input image for every layer (DLwP's formula). x: (N, H, W, 3) preprocessed; style: (1 or N,
    H', W', 3) preprocessed (any size). weights default 1/len(layers). Returns float32 (N,).
    """
    if normalization not in ("gatys", "book"):
        raise ValueError(f"normalization must be 'gatys' or 'book', found {normalization!r}")
    _check_images("style_loss", x=x, style=style)
    weights = _layer_weights(layers, weights)
    fx, fs = taps(model, variables, x, layers), taps(model, variables, style, layers)
    total = 0.0
    for name, w in zip(layers, weights):
        _, h, wd, c = fx[name].shape
        denom = (4.0 * c ** 2 * (h * wd) ** 2 if normalization == "gatys"
                 else _book_style_denom(np.shape(x)))
        total = total + w * _gram_distance(gram(fx[name]), gram(fs[name]), denom)
    return total


def _book_style_denom(shape: Sequence[int]) -> float:
    # DLwP: channels = 3 and size = img_height * img_width for every layer, not the layer's own.
    return 4.0 * 3 ** 2 * (shape[1] * shape[2]) ** 2


def total_variation(x, power: float = 1.25) -> jnp.ndarray:
    """DLwP's total variation: sum((a + b) ** power) over the image minus its last row and
    column, a / b the squared differences to the next row / column. x: (N, H, W, C).
    Returns float32 (N,). power >= 1 keeps the gradient finite where neighbours are equal."""
    if power < 1:
        raise ValueError(f"power must be >= 1 (smaller powers have infinite gradients), found {power}")
    check_finite(x, "total_variation x")
    x = jnp.asarray(x, jnp.float32)
    a = (x[:, :-1, :-1] - x[:, 1:, :-1]) ** 2
    b = (x[:, :-1, :-1] - x[:, :-1, 1:]) ** 2
    return jnp.sum((a + b) ** power, axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class StyleTransferPreset:
    """Weights and layers of a neural-style-transfer loss (VGG19, caffe-preprocessed images)."""

    content_weight: float
    style_weight: float  # split evenly over style_layers
    tv_weight: float
    content_layer: str = "block5_conv2"
    style_layers: tuple = STYLE_LAYERS


PRESETS = {
    "book1": StyleTransferPreset(0.025, 1.0, 1e-4),  # DLwP 1st ed. 8.3
    "book2": StyleTransferPreset(2.5e-8, 1e-6, 1e-6),  # DLwP 2nd ed. 12.3
}


def get_preset(name_or_preset: str | StyleTransferPreset) -> StyleTransferPreset:
    """A `StyleTransferPreset` from its name in PRESETS (or itself)."""
    if isinstance(name_or_preset, StyleTransferPreset):
        return name_or_preset
    if name_or_preset not in PRESETS:
        raise ValueError(f"unknown style-transfer preset {name_or_preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name_or_preset]


def style_transfer_targets(model: VGG, variables: Mapping, content, style,
                           preset: str | StyleTransferPreset = "book1") -> dict:
    """What the combination image is pulled towards, computed once: the content image's
    features at the content layer and the style image's Gram matrices.

    content: (1, H, W, 3), style: (1, H', W', 3), both preprocessed. Returns
    {"content": (1, h, w, C) float32, "grams": {layer: (1, C, C) float32}}.
    """
    p = get_preset(preset)
    fc = taps(model, variables, content, (p.content_layer,))[p.content_layer]
    fs = taps(model, variables, style, p.style_layers)
    return {"content": fc, "grams": {name: gram(fs[name]) for name in p.style_layers}}


def style_transfer_loss(model: VGG, variables: Mapping, combination, targets: Mapping,
                        preset: str | StyleTransferPreset = "book1") -> tuple[jnp.ndarray, dict]:
    """The book's loss of a combination image: content_weight * sum((f - f_content)**2) at the
    content layer + style_weight / len(style_layers) * each layer's "book" style term +
    tv_weight * total_variation.

    combination: (N, H, W, 3) preprocessed, the content image's size. Returns (total, parts):
    float32 (N,) and {"content", "style", "tv"} float32 (N,), each already weighted.
    """
    p = get_preset(preset)
    f = taps(model, variables, combination, (p.content_layer, *p.style_layers))
    content = p.content_weight * jnp.sum((f[p.content_layer] - targets["content"]) ** 2,
                                         axis=(1, 2, 3))
    denom = _book_style_denom(np.shape(combination))
    style = sum(p.style_weight / len(p.style_layers)
                * _gram_distance(gram(f[name]), targets["grams"][name], denom)
                for name in p.style_layers)
    tv = p.tv_weight * total_variation(combination)
    return content + style + tv, {"content": content, "style": style, "tv": tv}
