"""vggjax.train.augmentation: one bilinear warp per image, checked against NumPy, SciPy and Keras' own ImageDataGenerator."""
import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vggjax.train import augmentation

B, S = 6, 32
# Jitted once here: op-by-op dispatch of the warp costs more compile time than one jit.
augment = jax.jit(augmentation.augment, static_argnums=2)
warp = jax.jit(augmentation.warp, static_argnums=2)


@pytest.fixture(scope="module")
def images():
    """Smooth random uint8 images, so bilinear interpolation errors stay small and visible."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (B, 5, 5, 3))
    return np.clip(scipy.ndimage.zoom(coarse, (1, S / 5, S / 5, 1), order=1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("config", [augmentation.FIRST_EDITION, augmentation.SECOND_EDITION], ids=["first", "second"])
def test_a_key_determines_the_batch_and_different_keys_differ(images, config):
    a = augment(jax.random.key(1), images, config)
    np.testing.assert_array_equal(a, augment(jax.random.key(1), images, config))
    b = np.asarray(augment(jax.random.key(2), images, config))
    assert all(np.abs(a[i] - b[i]).max() > 1 for i in range(B))  # every image gets its own draw
    assert np.abs(a[0] - a[1][None]).max() > 1


def test_identity_configs_return_the_input_cast_to_float32_bit_for_bit(images):
    zero = augmentation.AugmentConfig(fill_mode="reflect", zoom_per_axis=False)  # all ranges 0
    for x in (images, images.astype(np.float32) / 7.0):
        for config in (augmentation.NONE, zero):
            out = augment(jax.random.key(0), x, config)
            assert out.dtype == jnp.float32
            np.testing.assert_array_equal(out, x.astype(np.float32))
    # The warp itself is exact at integer positions: identity matrices reproduce the input.
    np.testing.assert_array_equal(warp(images, jnp.broadcast_to(augmentation.affine_matrix(S, S), (B, 3, 3))),
                                  images.astype(np.float32))


def test_flip_only_config_gives_exact_mirror_images(images):
    config = augmentation.AugmentConfig(horizontal_flip=True)
    out = np.asarray(augment(jax.random.key(3), images, config))
    flipped = [np.array_equal(o, x[:, ::-1].astype(np.float32)) for o, x in zip(out, images)]
    kept = [np.array_equal(o, x.astype(np.float32)) for o, x in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    mirror = jnp.broadcast_to(augmentation.affine_matrix(S, S, flip=True), (B, 3, 3))
    np.testing.assert_array_equal(warp(images, mirror), images[:, :, ::-1].astype(np.float32))


def test_rotation_by_90_degrees_equals_np_rot90(images):
    for h, w in ((S, S), (S + 8, S + 8)):
        x = np.asarray(jax.image.resize(images.astype(np.float32), (B, h, w, 3), "bilinear"))
        quarter = jnp.broadcast_to(augmentation.affine_matrix(h, w, rotation=90.0), (B, 3, 3))
        # Positive angles turn the content counter-clockwise, as np.rot90 does.
        np.testing.assert_allclose(warp(x, quarter), np.rot90(x, k=1, axes=(1, 2)), atol=1e-2)


@pytest.mark.parametrize("fill_mode,scipy_mode", [("nearest", "nearest"), ("reflect", "reflect")])
def test_warp_matches_scipy_map_coordinates(images, fill_mode, scipy_mode):
    """Bilinear interpolation and the fill outside the image, against scipy.ndimage on the same positions."""
    config = dataclasses.replace(augmentation.FIRST_EDITION, zoom=0.5, fill_mode=fill_mode)
    keys = jax.random.split(jax.random.key(4), B)
    matrices = np.asarray(jax.vmap(augmentation.random_matrix, in_axes=(0, None, None, None))(keys, config, S, S + 4))
    x = np.asarray(jax.image.resize(images.astype(np.float32), (B, S, S + 4, 3), "bilinear"))
    out = np.asarray(warp(x, matrices, fill_mode))
    ys, xs = np.mgrid[0:S, 0:S + 4].astype(np.float64)
    for i, m in enumerate(matrices.astype(np.float64)):
        coords = [m[1, 0] * xs + m[1, 1] * ys + m[1, 2], m[0, 0] * xs + m[0, 1] * ys + m[0, 2]]
        want = np.stack([scipy.ndimage.map_coordinates(x[i, ..., c], coords, order=1, mode=scipy_mode)
                         for c in range(3)], axis=-1)
        np.testing.assert_allclose(out[i], want, atol=0.05)


@pytest.mark.filterwarnings("ignore:Please import `affine_transform`:DeprecationWarning")  # inside Keras
def test_first_edition_matrices_match_keras_image_data_generator(images):
    """Same (theta, tx, ty, shear, zx, zy) and flip through Keras' legacy apply_transform (scipy)."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    keras = ImageDataGenerator(fill_mode="nearest")
    rng = np.random.default_rng(5)
    x = images.astype(np.float32)
    for i in range(B):
        theta, shear = rng.uniform(-40, 40), rng.uniform(-20, 20)  # a visible shear, to pin its sign
        tx, ty = rng.uniform(-0.2, 0.2, 2) * S
        zx, zy = rng.uniform(0.8, 1.2, 2)
        flip = bool(i % 2)
        want = keras.apply_transform(x[i], {"theta": theta, "tx": tx, "ty": ty, "shear": shear,
                                            "zx": zx, "zy": zy, "flip_horizontal": flip})
        # Keras' tx is the shift along its first matrix axis, which it then swaps to columns.
        m = augmentation.affine_matrix(S, S, rotation=theta, translate=(tx, ty), shear=shear, zoom=(zx, zy),
                              flip=flip)
        np.testing.assert_allclose(warp(x[i:i + 1], m[None])[0], want, atol=0.05)


@pytest.mark.parametrize("config", [augmentation.FIRST_EDITION, augmentation.SECOND_EDITION], ids=["first", "second"])
def test_fill_never_introduces_black_borders(config):
    """Strong transforms of an image with no dark pixel stay within its value range."""
    strong = dataclasses.replace(config, rotation=45.0, zoom=0.5)
    x = np.random.default_rng(6).uniform(100, 200, (16, S, S, 3)).astype(np.float32)
    out = np.asarray(augment(jax.random.key(7), x, strong))
    assert out.min() >= 100 - 1e-3 and out.max() <= 200 + 1e-3


def test_shapes_are_static_under_jit_and_configs_are_hashable():
    assert hash(augmentation.FIRST_EDITION) != hash(augmentation.SECOND_EDITION)
    for dtype in (jnp.uint8, jnp.float32):
        spec = jax.ShapeDtypeStruct((20, 150, 150, 3), dtype)
        out = jax.eval_shape(augment, jax.random.key(0), spec, augmentation.FIRST_EDITION)
        assert out.shape == (20, 150, 150, 3) and out.dtype == jnp.float32


def test_a_batch_sharded_over_devices_is_augmented_in_place(subprocess_env):
    """Under data parallelism (batch split over a mesh) the warp compiles to no collective and
    gives the unsharded result. Two fake CPU devices need a fresh process."""
    script = textwrap.dedent("""
        import re
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from vggjax.train import augmentation
        mesh = Mesh(np.array(jax.devices()), ("data",))
        x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
        run = jax.jit(augmentation.augment, static_argnums=2)
        sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
        hlo = run.lower(jax.random.key(0), sharded, augmentation.FIRST_EDITION).compile().as_text()
        found = re.findall(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
        assert not found, found
        np.testing.assert_array_equal(run(jax.random.key(0), sharded, augmentation.FIRST_EDITION),
                                      run(jax.random.key(0), x, augmentation.FIRST_EDITION))
    """)
    env = dict(subprocess_env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="rotation"):
        augmentation.AugmentConfig(rotation=-1)
    with pytest.raises(ValueError, match="zoom must be < 1"):
        augmentation.AugmentConfig(zoom=1.0)
    with pytest.raises(ValueError, match="fill_mode"):
        augmentation.AugmentConfig(fill_mode="constant")
