"""Seeing inside a VGG (DLwP 1st ed. 5.4): Grad-CAM maps, filter patterns, activation grids.

    from vggjax.viz import convnet
    cams = convnet.grad_cam(model, variables, pre.preprocess(images))       # (N, 14, 14) in [0, 1]
    picture = convnet.overlay(images[0], cams[0])                            # (H, W, 3) uint8
    tiles = convnet.filter_pattern(model, variables, "block1_conv1", range(64), size=64)
    sheet = convnet.grid(tiles)                                              # the book's 8x8 sheet
"""
from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vggjax.utils import checks
from vggjax.utils.images import resize
from vggjax.model.vgg import PERTURBATIONS, TAPPED, TAPS, VGG
from vggjax.weights.preprocessing import preprocess_input
from vggjax.inference.heads import class_logits
from vggjax.utils.trees import flatten, unflatten

METHODS = ("gradcam", "gradcam++", "hirescam")
SCORES = ("logits", "softmax")
BOOK_LAYER = "block5_conv3"

# matplotlib's "jet" (its _jet_data): piecewise-linear (x, value) knots per channel. Embedded
# so that core vggjax needs no matplotlib; tests check the table against matplotlib's own.
_JET = {"red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0))}


def jet(n: int = 256) -> np.ndarray:
    """(n, 3) float64 RGB in [0, 1]: matplotlib's `colormaps["jet"].resampled(n)` table."""
    x = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(x, *zip(*_JET[c])) for c in ("red", "green", "blue")], axis=1)


def grad_cam(model: nn.Module, variables, images, target=None, layer: str = BOOK_LAYER,
             score: str | None = None, method: str = "gradcam", book: bool = False) -> jax.Array:
    """Class-activation maps (N, h, w) float32 in [0, 1] at `layer`'s resolution.

    model: a VGG with its classifier (its `classifier_activation` does not matter: the score
    is taken from the logits), or any module whose output is class logits around a VGG base
    (e.g. the cats-vs-dogs `Classifier`; a single binary logit l counts as two classes with
    logits (-l/2, l/2), so softmax gives sigmoid(l)). images: (N, H, W, 3) as `model.apply`
    takes them, i.e. preprocessed. target: None (each image's top class), an int, or (N,) ints.
    layer: any conv layer, "blockN_convM" (after ReLU) or "blockN_convM_preact".
    score: "logits" (the Grad-CAM paper's pre-softmax score, the default) or "softmax".
    method: "gradcam" (channel weights = mean gradient), "gradcam++" (Chattopadhay et al., as
    pytorch-grad-cam computes it) or "hirescam" (gradient times activation, summed per place).

    `book=True` is DLwP 1st ed. 5.4 exactly: the post-softmax class probability, gradient
    w.r.t. block5_conv3's output, channel weights = mean gradient, map = *mean* over channels
    of the weighted activations, ReLU, divided by its max. The paper differs in the score
    (pre-softmax: a saturated softmax has near-zero gradients and gives empty maps) and sums
    over channels (which the division by the max cancels). A map whose max is 0 comes back
    as zeros with a warning, never NaN. Compiled once per model, layer, shape and options.
    """
    if book:
        if layer != BOOK_LAYER or method != "gradcam" or score not in (None, "softmax"):
            raise ValueError(f"book=True is Grad-CAM of the softmax score at {BOOK_LAYER}; found "
                             f"layer={layer!r}, method={method!r}, score={score!r}")
        score = "softmax"
    score = score or "logits"
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, found {score!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, found {method!r}")
    model = _logits_model(model)
    vgg = model if isinstance(model, VGG) else getattr(model, "base", None)
    if isinstance(vgg, VGG):
        convs = [n for n in vgg.layer_names() if "_conv" in n]
        if layer not in convs:
            raise ValueError(f"layer {layer!r} is not a conv layer of this {vgg.block_sizes} VGG; "
                             f"expected one of {convs}")
    if np.ndim(images) != 4:
        raise ValueError(f"grad_cam expects a batch of images (N, H, W, 3), found shape {np.shape(images)}")
    checks.check_finite(images, "grad_cam")
    checks.warn_if_raw(images, "grad_cam")
    images = jnp.asarray(images, jnp.float32)
    if target is not None:
        target = np.broadcast_to(np.asarray(target), (images.shape[0],))
        if not np.issubdtype(target.dtype, np.integer):
            raise ValueError(f"target must be class indices (ints), found dtype {target.dtype}")
        classes = max(jax.eval_shape(model.apply, variables, images).shape[-1], 2)
        if target.min() < 0 or target.max() >= classes:
            raise ValueError(f"target must lie in [0, {classes}), found {target.tolist()}")
        target = jnp.asarray(target, jnp.int32)
    cams, peaks = _grad_cam(model, variables, images, target, layer=layer, score=score,
                            method=method, mean=book)
    empty = np.flatnonzero(np.asarray(peaks) <= 0)
    if empty.size:
        warnings.warn(f"Grad-CAM map(s) of image(s) {empty.tolist()} are all zero (no positive "
                      f"evidence at {layer}; with score='softmax' a saturated softmax does this): "
                      "returned as zeros", RuntimeWarning, stacklevel=2)
    return cams


@functools.partial(jax.jit, static_argnames=("model", "layer", "score", "method", "mean"))
def _grad_cam(model, variables, images, target, *, layer, score, method, mean):
    def class_score(logits):
        logits = class_logits(logits)
        t = jnp.argmax(logits, axis=-1) if target is None else target
        values = jax.nn.softmax(logits, axis=-1) if score == "softmax" else logits
        # Images are independent, so the gradient of the sum is each image's own gradient.
        return jnp.take_along_axis(values, t[:, None], axis=-1).sum()

    acts, grads = layer_gradient(model, variables, images, layer, class_score)
    if method == "gradcam":
        cam = jnp.einsum("nhwc,nc->nhw", acts, grads.mean(axis=(1, 2)))
        cam = cam / acts.shape[-1] if mean else cam
    elif method == "gradcam++":
        g2 = grads ** 2
        alpha = g2 / (2 * g2 + acts.sum(axis=(1, 2), keepdims=True) * g2 * grads + 1e-6)
        alpha = jnp.where(grads != 0, alpha, 0.0)
        cam = jnp.einsum("nhwc,nc->nhw", acts, (jax.nn.relu(grads) * alpha).sum(axis=(1, 2)))
    else:  # hirescam
        cam = (grads * acts).sum(axis=-1)
    cam = jax.nn.relu(cam)
    peak = cam.max(axis=(1, 2))
    cam = jnp.where(peak[:, None, None] > 0, cam / jnp.where(peak > 0, peak, 1.0)[:, None, None], 0.0)
    return cam, peak


def layer_gradient(model: nn.Module, variables, images, layer: str, fn):
    """(A, dS/dA): `layer`'s output A (N, h, w, C) and the gradient of S = fn(model output).

    `model` is a VGG or any Linen module holding one (e.g. the cats-vs-dogs `Classifier`).
    The gradient is taken at the layer's own output (after its ReLU for "blockN_convM", before
    it for "blockN_convM_preact"), as TF's GradientTape does on a Keras layer's output: the
    VGG adds a zero perturbation there (its tap points, `vggjax.model.vgg.PERTURBATIONS`) and
    S is differentiated with respect to it, in one forward and one backward pass.
    """
    declared = jax.eval_shape(lambda: model.apply(variables, images, mutable=[PERTURBATIONS])[1])
    points = flatten(declared[PERTURBATIONS])
    wanted = [path for path in points if f"/{path}".endswith(f"/{TAPS}/{layer}")]
    if len(wanted) != 1:
        names = sorted({path.rsplit("/", 1)[1] for path in points})
        raise ValueError(f"Grad-CAM needs a conv layer ('blockN_convM' or 'blockN_convM_preact') "
                         f"of one VGG in the model, found {layer!r} {len(wanted)} times; "
                         f"the layers: {names}")
    (path,) = wanted
    zeros = unflatten({path: jnp.zeros(points[path].shape, points[path].dtype)})

    def run(perturbation):
        out, state = model.apply({**variables, PERTURBATIONS: perturbation}, images, mutable=[TAPPED])
        return fn(out), flatten(state[TAPPED])[path]

    grads, acts = jax.grad(run, has_aux=True)(zeros)
    return acts, flatten(grads)[path]


def _logits_model(model: nn.Module) -> nn.Module:
    if isinstance(model, VGG):
        if not model.include_top:
            raise ValueError("Grad-CAM needs class scores: this VGG has no classifier "
                             "(include_top=False); load weights converted with their top")
        return model.clone(classifier_activation=None)
    return model


def overlay(image, cam, alpha: float = 0.4) -> np.ndarray:
    """The book's picture: `image` (H, W, 3) uint8 RGB plus `alpha` times the jet-coloured `cam`.

    cam: (h, w) in [0, 1], upsampled bilinearly to (H, W), quantised as uint8(255 * cam), mapped
    through matplotlib's jet (0..255) and added: image + alpha * heat. The sum is rescaled to
    0..255 (min to 0, max to 255) as the 2nd edition's `array_to_img` does; the 1st edition's
    cv2.imwrite clipped it instead, which washes bright photos out to white.
    """
    image, cam = np.asarray(image), np.asarray(cam, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"overlay expects an (H, W, 3) RGB image, found shape {image.shape}")
    if cam.ndim != 2:
        raise ValueError(f"overlay expects one (h, w) map, found shape {cam.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], found {alpha}")
    up = np.clip(resize(cam, image.shape[:2], "bilinear"), 0.0, 1.0)
    heat = jet()[(255 * up).astype(np.uint8)] * 255.0
    out = image.astype(np.float64) + alpha * heat
    out -= out.min()
    return (out * (255.0 / max(out.max(), 1e-12))).astype(np.uint8)


def cam_overlay(predictor, pixels, original) -> np.ndarray:
    """The Grad-CAM overlay `vggjax predict --cam` draws: the map of the top class (the paper's
    pre-softmax score) at `predictor.cam_layer` of `pixels` (1, S, S, 3) uint8, the image the
    predictor classifies, over `original` (H, W, 3) uint8, the file at its own size.
    `predictor`: a `vggjax.inference.predictor.Predictor`. Returns (H, W, 3) uint8."""
    x = preprocess_input(pixels, predictor.preprocessing)
    cam = grad_cam(predictor.model, predictor.variables, x, layer=predictor.cam_layer)
    return overlay(original, np.asarray(cam)[0])


def filter_pattern(model: VGG, variables, layer: str, filter_index, size: int = 150,
                   steps: int = 40, step: float = 1.0, init=None, seed: int = 0,
                   deprocess: bool = True) -> np.ndarray:
    """The input pattern that a filter responds to most, by gradient ascent (the book's recipe).

    Loss = mean of the filter's activation map; each step adds `step` times the gradient
    w.r.t. the raw input image (no preprocessing in between) divided by its RMS + 1e-5; the
    start is `uniform[0, 1) * 20 + 128` (NumPy's `default_rng(seed)`) unless `init`
    (size, size, 3) or (K, size, size, 3) is given. filter_index: an int -> one (size, size, 3)
    image, or a sequence of K ints -> (K, size, size, 3), all filters in one compiled, vmapped
    call.
    Returns uint8 after the book's `deprocess_image`, or the raw float32 images with
    `deprocess=False`.
    """
    single = np.ndim(filter_index) == 0
    index = np.atleast_1d(np.asarray(filter_index))
    for name, value, low in (("size", size, 32), ("steps", steps, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, found {value!r}")
    if not np.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive number, found {step!r}")
    # The head is never needed, and would hold the input at 224x224.
    model = model.clone(include_top=False, pooling=None)
    shape = (index.size, size, size, 3)
    channels = jax.eval_shape(functools.partial(model.apply, outputs=(layer,)), variables,
                              jax.ShapeDtypeStruct((1, *shape[1:]), jnp.float32))[layer].shape[-1]
    if index.size == 0 or not np.issubdtype(index.dtype, np.integer) or index.min() < 0 \
            or index.max() >= channels:
        raise ValueError(f"filter_index must be ints in [0, {channels}) for {layer}, "
                         f"found {index.tolist()}")
    if init is None:
        # NumPy's generator, as the book draws it (np.random.random): jax.random's first call
        # compiles its hash (benchmarks/results_library.md).
        init = np.random.default_rng(seed).random(shape, np.float32) * 20 + 128
    # The image accumulates in float32 even for a bfloat16 model (float64 under jax x64).
    dtype = jnp.promote_types(model.dtype, jnp.float32)
    init = np.asarray(init, dtype)
    if init.shape not in (shape, shape[1:]):
        raise ValueError(f"init must have shape {shape[1:]} or {shape}, found {init.shape}")
    raw = _ascend(model, variables, jnp.broadcast_to(init, shape), jnp.asarray(index, jnp.int32),
                  jnp.asarray(step, dtype), layer=layer, steps=int(steps))
    out = deprocess_image(raw) if deprocess else np.asarray(raw)
    return out[0] if single else out


@functools.partial(jax.jit, static_argnames=("model", "layer", "steps"))
def _ascend(model, variables, init, index, step, *, layer, steps):
    def one(image, f):
        def loss(x):
            return jnp.mean(model.apply(variables, x[None], outputs=(layer,))[layer][0, ..., f])

        def body(_, x):
            g = jax.grad(loss)(x)
            return x + step * g / (jnp.sqrt(jnp.mean(g ** 2)) + 1e-5)

        return jax.lax.fori_loop(0, steps, body, image)

    return jax.vmap(one)(init, index)


def deprocess_image(x) -> np.ndarray:
    """The book's `deprocess_image`, per image: standardise, *0.1 + 0.5, clip to [0, 1], to uint8.

    x: (..., H, W, 3) float -> same shape uint8.
    """
    x = np.asarray(x, np.float32)
    axes = (-3, -2, -1)
    x = (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + 1e-5)
    return (np.clip(x * 0.1 + 0.5, 0, 1) * 255).astype(np.uint8)


def grid(tiles, rows: int = 8, margin: int = 5) -> np.ndarray:
    """The book's filter sheet: tiles (K, h, w[, 3]) laid out with `margin` px of black between
    them, tile k at row k % rows, column k // rows (filter i + 8 j at row i, column j)."""
    tiles = np.asarray(tiles)
    if tiles.ndim not in (3, 4) or len(tiles) == 0:
        raise ValueError(f"grid expects tiles (K, h, w) or (K, h, w, 3), found shape {tiles.shape}")
    if rows < 1 or margin < 0:
        raise ValueError(f"rows must be >= 1 and margin >= 0, found rows={rows}, margin={margin}")
    rows = min(rows, len(tiles))
    cols = -(-len(tiles) // rows)
    h, w = tiles.shape[1:3]
    sheet = np.zeros((rows * h + (rows - 1) * margin, cols * w + (cols - 1) * margin,
                      *tiles.shape[3:]), tiles.dtype)
    for k, tile in enumerate(tiles):
        i, j = k % rows, k // rows
        sheet[i * (h + margin):i * (h + margin) + h, j * (w + margin):j * (w + margin) + w] = tile
    return sheet


def activation_grid(feature_map, cols: int = 16) -> np.ndarray:
    """Every channel of one layer's output side by side, as the book shows them.

    feature_map: (H, W, C) or (1, H, W, C), e.g. `model.apply(..., outputs=(name,))[name]`.
    Each channel is standardised, * 64 + 128, clipped to 0..255 (the book); a constant channel
    (a dead filter, which the book would turn into NaN) stays black. Returns uint8
    (ceil(C / cols) * H, cols * W), channel k at row k // cols, column k % cols.
    """
    fmap = np.asarray(feature_map, np.float32)
    if fmap.ndim == 4 and fmap.shape[0] == 1:
        fmap = fmap[0]
    if fmap.ndim != 3:
        raise ValueError(f"activation_grid expects one image's (H, W, C) features, found {fmap.shape}")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, found {cols}")
    h, w, c = fmap.shape
    std = fmap.std(axis=(0, 1))
    scaled = (fmap - fmap.mean(axis=(0, 1))) / np.where(std > 0, std, 1.0) * 64 + 128
    channels = np.where(std > 0, np.clip(scaled, 0, 255), 0).astype(np.uint8)
    rows = -(-c // cols)
    sheet = np.zeros((rows * h, cols * w), np.uint8)
    for k in range(c):
        r, q = divmod(k, cols)
        sheet[r * h:(r + 1) * h, q * w:(q + 1) * w] = channels[..., k]
    return sheet
