"""Random image augmentation in pure JAX: the book's Keras recipes, each image warped once by one affine map.

Every transform an `AugmentConfig` asks for (rotation, shift, shear, zoom, horizontal flip) is
composed into one 3x3 matrix per image, and each image is resampled once: one gather of the
four neighbours of every output pixel, then bilinear weights. The fill mode is applied to the
integer neighbour indices, which is what `scipy.ndimage` / `jax.scipy.ndimage.map_coordinates`
do ("nearest": the edge pixel repeats, so no black borders; "reflect": d c b a | a b c d).

Conventions: pixel coordinates are (x, y) = (column, row) with the origin at the top-left pixel
centre; a matrix maps an OUTPUT pixel to the INPUT position it samples, about the image centre
((W-1)/2, (H-1)/2). Positive rotation turns the content counter-clockwise (like np.rot90).

Recipes:

- `FIRST_EDITION`: Keras `ImageDataGenerator(rotation_range=40, width_shift_range=0.2,
  height_shift_range=0.2, shear_range=0.2, zoom_range=0.2, horizontal_flip=True,
  fill_mode="nearest")`. Keras semantics exactly: angle ~ U(-40, 40) degrees; shifts ~
  U(-0.2, 0.2) x size; `shear_range` is an ANGLE IN DEGREES, so the book's 0.2 is a shear of at
  most 0.2 degrees (practically none); x and y zoom drawn independently from U(0.8, 1.2) (> 1
  zooms out); matrix rotation @ shift @ shear @ zoom about the centre, then the flip, as
  `apply_transform` does. One deviation: Keras centres and shifts with height and width swapped
  (its x offset uses the image height), which only matters for non-square images; here width
  shifts move columns and height shifts rows. For the book's square images with equal shift
  ranges the two agree exactly.
- `SECOND_EDITION`: `RandomFlip("horizontal")`, `RandomRotation(0.1)` (a fraction of a full
  turn: +-36 degrees) and `RandomZoom(0.2)` (one factor for both axes, U(0.8, 1.2)), with those
  layers' default fill "reflect". Keras warps three times; here the three maps are composed and
  applied once (flip before or after the rotation gives the same distribution, the angle being
  symmetric), so there is one interpolation and one fill instead of three.
- `NONE`: no augmentation; `augment` returns the input cast to float32, bit for bit.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FILL_MODES = ("nearest", "reflect")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; frozen and hashable so it can be a static jit argument."""

    rotation: float = 0.0  # degrees: angle ~ U(-rotation, rotation)
    width_shift: float = 0.0  # fraction of the width: ~ U(-width_shift, width_shift) * W
    height_shift: float = 0.0  # fraction of the height
    shear: float = 0.0  # degrees, as ImageDataGenerator's shear_range: ~ U(-shear, shear)
    zoom: float = 0.0  # scale ~ U(1 - zoom, 1 + zoom); > 1 samples a larger area (zooms out)
    zoom_per_axis: bool = True  # ImageDataGenerator: x and y zoom independent; RandomZoom: one
    horizontal_flip: bool = False  # flip with probability 1/2
    fill_mode: str = "nearest"  # how positions outside the image are filled: see FILL_MODES

    def __post_init__(self):
        for name in ("rotation", "width_shift", "height_shift", "shear", "zoom"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AugmentConfig.{name} is a range and must be >= 0, found {getattr(self, name)}")
        if self.zoom >= 1:
            raise ValueError(f"AugmentConfig.zoom must be < 1 (scale in [1-zoom, 1+zoom]), found {self.zoom}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"AugmentConfig.fill_mode must be one of {FILL_MODES}, found {self.fill_mode!r}")

    @property
    def is_identity(self) -> bool:
        """True when every range is zero and there is no flip: `augment` is then a cast."""
        return not (self.rotation or self.width_shift or self.height_shift or self.shear
                    or self.zoom or self.horizontal_flip)


FIRST_EDITION = AugmentConfig(rotation=40.0, width_shift=0.2, height_shift=0.2, shear=0.2,
                              zoom=0.2, zoom_per_axis=True, horizontal_flip=True, fill_mode="nearest")
SECOND_EDITION = AugmentConfig(rotation=0.1 * 360.0, zoom=0.2, zoom_per_axis=False,
                               horizontal_flip=True, fill_mode="reflect")
NONE = AugmentConfig()


def affine_matrix(height: int, width: int, *, rotation=0.0, translate=(0.0, 0.0), shear=0.0,
                  zoom=(1.0, 1.0), flip=False) -> jax.Array:
    """float32 (3, 3): output pixel (x, y, 1) -> input position it samples.

    rotation and shear in degrees (Keras' matrices), translate = (tx, ty) in pixels, zoom =
    (zx, zy), flip = mirror left-right after the other transforms. Arguments may be traced
    scalars (vmap/jit); the composition is centre @ rotation @ translate @ shear @ zoom @
    centre^-1 @ flip, ImageDataGenerator's order.
    """
    f32 = jnp.float32
    theta = jnp.deg2rad(jnp.asarray(rotation, f32))
    phi = jnp.deg2rad(jnp.asarray(shear, f32))
    c, s = jnp.cos(theta), jnp.sin(theta)
    tx, ty = (jnp.asarray(t, f32) for t in translate)
    zx, zy = (jnp.asarray(z, f32) for z in zoom)
    # rotation @ translate @ shear @ zoom, multiplied out (the last row is 0 0 1).
    a, b = c * zx, (-c * jnp.sin(phi) - s * jnp.cos(phi)) * zy
    d, e = s * zx, (-s * jnp.sin(phi) + c * jnp.cos(phi)) * zy
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # Conjugate by the centre shift: p -> A (p - ctr) + R t + ctr.
    ox = c * tx - s * ty + cx - a * cx - b * cy
    oy = s * tx + c * ty + cy - d * cx - e * cy
    # Then @ mirror (x -> W-1-x), written out rather than as a matmul, which may run at reduced
    # (TF32) precision on GPUs; a flip-only matrix is then exactly [[-1, 0, W-1], [0, 1, 0]].
    ox, oy = jnp.where(flip, a * (width - 1) + ox, ox), jnp.where(flip, d * (width - 1) + oy, oy)
    a, d = jnp.where(flip, -a, a), jnp.where(flip, -d, d)
    return jnp.stack([jnp.stack([a, b, ox]), jnp.stack([d, e, oy]), jnp.array([0.0, 0.0, 1.0], f32)])


def random_matrix(key: jax.Array, config: AugmentConfig, height: int, width: int) -> jax.Array:
    """float32 (3, 3): one random draw of `config`'s transforms for a height x width image."""
    # One uniform in [-1, 1) per parameter, scaled by its range.
    rot, shift_x, shift_y, shear, zoom_x, zoom_y, flip = jax.random.uniform(key, (7,), jnp.float32, -1.0, 1.0)
    zx = 1.0 + config.zoom * zoom_x
    zy = 1.0 + config.zoom * zoom_y if config.zoom_per_axis else zx
    return affine_matrix(height, width, rotation=config.rotation * rot,
                         translate=(config.width_shift * width * shift_x, config.height_shift * height * shift_y),
                         shear=config.shear * shear, zoom=(zx, zy),
                         flip=config.horizontal_flip & (flip < 0))


def warp(images, matrices, fill_mode: str = "nearest") -> jax.Array:
    """Resample (B, H, W, C) images (uint8 or float) by (B, 3, 3) `affine_matrix`es, bilinearly.

    Returns float32 (B, H, W, C) on the input's scale. Integer sample positions (identity,
    flips, 90-degree turns) reproduce input pixels exactly. One gather fetches the 4
    neighbours of every output pixel; it keeps the batch as a gather batch dimension, so a
    batch sharded over devices is warped where it lies, with no collective. (Flattening the
    batch into the gathered axis runs faster on one CPU but makes XLA all-gather the
    indices and all-reduce the pixels under data parallelism.)
    """
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, found {fill_mode!r}")
    images = jnp.asarray(images)
    b, h, w, ch = images.shape
    m = jnp.asarray(matrices, jnp.float32)[:, :2, :, None, None]  # (B, 2, 3, 1, 1)
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    src_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]  # (B, H, W)
    src_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    # Materialise the positions once: if XLA recomputed them in two fusions (one FMA-contracted,
    # one not), a position a hair below an integer could floor one way for the index and the
    # other way for the fraction, and the pixel would come from the wrong row or column.
    src_x, src_y = jax.lax.optimization_barrier((src_x, src_y))
    x0, y0 = jnp.floor(src_x), jnp.floor(src_y)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    cols = _fill(jnp.stack([x0, x0 + 1], axis=1), w, fill_mode)  # (B, 2, H, W)
    rows = _fill(jnp.stack([y0, y0 + 1], axis=1), h, fill_mode)
    flat = rows[:, :, None] * w + cols[:, None]  # (B, 2, 2, H, W): [row y0/y1][col x0/x1]
    v = jnp.take_along_axis(images.reshape(b, h * w, ch), flat.reshape(b, -1, 1), axis=1, mode="clip")
    v = v.reshape(b, 2, 2, h, w, ch).astype(jnp.float32)
    # Lerps rather than four weights: at fx == 0 the result is exactly v[:, .., 0] (bit-exact flips).
    top = v[:, 0, 0] + fx * (v[:, 0, 1] - v[:, 0, 0])
    bottom = v[:, 1, 0] + fx * (v[:, 1, 1] - v[:, 1, 0])
    return top + fy * (bottom - top)


def augment(key: jax.Array, images, config: AugmentConfig) -> jax.Array:
    """Randomly transform a batch: (B, H, W, C) uint8 or float in 0..255 -> float32 (B, H, W, C).

    One key per image (`jax.random.split`), so a given key gives the same batch every time.
    `config` must be static under jit. `NONE` (or any all-zero config) returns the cast input.
    """
    images = jnp.asarray(images)
    if config.is_identity:
        return images.astype(jnp.float32)
    b, h, w, _ = images.shape
    keys = jax.random.split(key, b)
    matrices = jax.vmap(random_matrix, in_axes=(0, None, None, None))(keys, config, h, w)
    return warp(images, matrices, config.fill_mode)


def _fill(index, size: int, fill_mode: str):
    """Map integer pixel indices outside 0..size-1 back into the image."""
    if fill_mode == "nearest":
        return jnp.clip(index, 0, size - 1)
    period = jnp.mod(index, 2 * size)  # "reflect": half-sample symmetric, edge pixel repeated
    return jnp.where(period < size, period, 2 * size - 1 - period)
