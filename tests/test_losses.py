"""vggjax.losses.perceptual: LPIPS against the `lpips` package itself, finite gradients, feature/style/TV losses
against NumPy, and the book's style-transfer presets against the book's Keras code.

The LPIPS reference is lpips's own code (vggjax.testing.reference.reference_lpips) on a seeded random VGG16 in
torchvision's layout, written as a .pth and converted with vggjax.convert_file, with the lin
weights of lpips's wheel; images are crops of JPEG files the tests write and read back.
Run with `pytest -s` to see the measured differences.
"""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import vggjax
from book_style_transfer import book_loss, keras_vgg19
from vggjax.testing.reference import import_lpips, reference_lpips, run_lpips, write_lpips_trunk
from vggjax.losses import perceptual
from vggjax.utils import checks
from vggjax.train import parallel

LPIPS_TOL = 1e-5
CROP = 64


def write_photos(directory, n: int = 3, size: int = 80, seed: int = 0) -> list:
    """Photo-like JPEGs (smooth colour fields, a disc, fine texture) with two degraded copies each
    (quality-15 recompression, Gaussian blur); returns [(original, degraded...)] paths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        coarse = rng.uniform(0, 255, (size // 16 + 2, size // 16 + 2, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
        yy, xx = np.mgrid[:size, :size]
        disc = (yy - rng.uniform(20, 60)) ** 2 + (xx - rng.uniform(20, 60)) ** 2 < rng.uniform(100, 400)
        img[disc] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        paths = [directory / f"photo{i}.jpg", directory / f"photo{i}_q15.jpg", directory / f"photo{i}_blur.jpg"]
        photo.save(paths[0], quality=95)
        original = Image.open(paths[0])
        original.save(paths[1], quality=15)
        original.filter(ImageFilter.GaussianBlur(1.5)).save(paths[2], quality=95)
        out.append(paths)
    return out


def read_crop(path, offset: int = 8) -> np.ndarray:
    """(CROP, CROP, 3) float32 in [0, 1] from a JPEG on disk."""
    img = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
    return img[offset:offset + CROP, offset:offset + CROP]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(x0, x1) in [0, 1], NHWC: each photo against its recompressed and its blurred copy, and
    against itself."""
    photos = write_photos(tmp_path_factory.mktemp("photos"))
    x0 = np.stack([read_crop(p[0]) for p in photos for _ in range(3)])
    x1 = np.stack([read_crop(q) for p in photos for q in (p[1], p[2], p[0])])
    return x0, x1


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """A seeded random torchvision-layout VGG16 conv base, its .pth converted by vggjax, and a
    cached `LPIPS.load(converted, version=..., dtype=...)`."""
    d = tmp_path_factory.mktemp("trunk")
    model, converted = write_lpips_trunk(d, seed=3)
    load = functools.cache(lambda version="0.1", dtype=jnp.float32, conv_impl="auto": perceptual.LPIPS.load(
        converted, version=version, dtype=dtype, conv_impl=conv_impl))
    return model, converted, load


def max_diff(label, ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.float32, (ours.shape, ours.dtype, ref.shape)
    err = float(np.abs(ours - ref).max())
    print(f"\n{label}: max abs diff {err:.2e} (reference values {ref.min():.4g} .. {ref.max():.4g})")
    return err


# --- LPIPS parity with the lpips package --------------------------------------------------

@pytest.mark.parametrize("version", ["0.1", "0.0"])
def test_lpips_matches_lpips_package(trunk, pairs, version):
    torch_trunk, _, load = trunk
    lp = load(version)  # lin=None: the installed lpips wheel's file
    x0, x1 = pairs
    ref = run_lpips(reference_lpips(torch_trunk, version), x0, x1, normalize=True)
    assert max_diff(f"v{version} [0,1] inputs", lp(x0, x1, normalize=True), ref) <= LPIPS_TOL
    # Distances mean something: zero for a photo against itself, positive and varied otherwise.
    assert np.all(ref[2::3] == 0) and np.all(ref[0::3] > 0) and np.all(ref[1::3] > 0)
    assert ref.max() > 1.5 * ref[ref > 0].min()
    s0, s1 = 2 * x0 - 1, 2 * x1 - 1
    ref = run_lpips(reference_lpips(torch_trunk, version), s0, s1)
    assert max_diff(f"v{version} [-1,1] inputs", lp(s0, s1), ref) <= LPIPS_TOL
    ref_map = run_lpips(reference_lpips(torch_trunk, version, spatial=True), s0, s1)
    ours_map = lp(s0, s1, spatial=True)
    assert max_diff(f"v{version} spatial map", ours_map, ref_map) <= LPIPS_TOL
    # Non-square inputs whose size is not a multiple of 16: taps floor, the map upsamples back.
    a, b = s0[:2, :50, :], s1[:2, :50, :]
    ref_map = run_lpips(reference_lpips(torch_trunk, version, spatial=True), a, b)
    assert max_diff(f"v{version} spatial map 50x64", lp(a, b, spatial=True), ref_map) <= LPIPS_TOL


def test_lin_reader_equals_torch_load_weights_only():
    for version in perceptual.LPIPS_VERSIONS:
        path = perceptual.installed_lin_path(version)
        want = torch.load(path, weights_only=True, map_location="cpu")
        lins = perceptual.read_lin(path)
        for k, lin in enumerate(lins):
            np.testing.assert_array_equal(lin, want[f"lin{k}.model.1.weight"].numpy()[0, :, 0, 0])
    assert not np.array_equal(perceptual.read_lin(perceptual.installed_lin_path("0.0"))[0],
                              perceptual.read_lin(perceptual.installed_lin_path("0.1"))[0])


def test_load_refuses_what_cannot_be_lpips(trunk, tmp_path, monkeypatch, make_variables):
    _, converted, _ = trunk
    with pytest.raises(ValueError, match="version must be one of"):
        perceptual.LPIPS.load(converted, version="0.2")
    with pytest.raises(ValueError, match="vgg16.pth is not an lpips VGG lin file: lin0.model.1.weight"):
        perceptual.LPIPS.load(converted, lin=converted.parent / "vgg16.pth")
    from vggjax.weights.keras import write_legacy_h5
    write_legacy_h5(make_variables("vgg16", include_top=False)["params"], tmp_path / "k.h5")
    vggjax.convert_file("keras", "vgg16", tmp_path / "k.h5", tmp_path / "keras16")
    with pytest.raises(ValueError, match="calibrated on torchvision's vgg16.*'caffe'"):
        perceptual.LPIPS.load(tmp_path / "keras16")
    find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "lpips" else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps lpips"):
        perceptual.LPIPS.load(converted)


def test_input_range_is_checked(trunk, pairs):
    lp = trunk[2]()
    x0, x1 = pairs
    with pytest.raises(ValueError, match=r"x0 expects values in \[-1, 1\], found \[0, 255\]"):
        lp(np.round(x0 * 255), x1)
    with pytest.raises(ValueError, match=r"x1 \(normalize=True\) expects values in \[0, 1\]"):
        lp(x0, x1 * 255, normalize=True)
    lp(x0 * 1.2 - 0.1, x1, normalize=True)  # a generator overshooting a little is fine
    with pytest.raises(ValueError, match="one shape"):
        lp(x0, x1[:, :32])
    with pytest.raises(ValueError, match=r"found \[-128"):
        checks.check_range(np.array([-128.0, 127.0]), -1, 1, "found")
    nan = np.array(x0)
    nan[0, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"^LPIPS x0 holds NaN or Inf$"):
        lp(nan, x1)
    with pytest.raises(ValueError, match=r"LPIPS x0 expects NHWC RGB images \(N, H, W, 3\), found shape "
                                         r"\(\d+, 3, \d+, \d+\); it looks like NCHW"):
        lp(np.asarray(x0).transpose(0, 3, 1, 2), np.asarray(x1).transpose(0, 3, 1, 2))
    jax.jit(lambda a, b: lp(a, b))(x0 * 255, x1)  # traced: nothing to check, by design


def test_lpips_jits_vmaps_and_is_a_pytree(trunk, pairs):
    lp = trunk[2](conv_impl="direct")
    x0, x1 = (2 * x - 1 for x in pairs)
    eager = lp(x0, x1)
    jitted = jax.jit(lambda l, a, b: l(a, b))(lp, x0, x1)  # LPIPS passed as an argument
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-7)
    stacked = jax.vmap(lambda a, b: lp(a, b))(x0.reshape(3, 3, *x0.shape[1:]), x1.reshape(3, 3, *x1.shape[1:]))
    np.testing.assert_allclose(stacked.reshape(-1), eager, rtol=1e-5, atol=1e-7)
    assert len(jax.tree.leaves(lp)) == 26 + 5  # 13 convs' kernel and bias, 5 lin vectors


def _sharded_child():
    """Child process with 2 CPU devices: LPIPS on a batch sharded over them equals one device's."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    trunk_dir, out = sys.argv[2], sys.argv[3]
    lp = perceptual.LPIPS.load(trunk_dir)
    rng = np.random.default_rng(0)
    x0, x1 = (rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32) for _ in range(2))
    mesh = parallel.make_mesh()  # Auto axes: vggjax's convolutions leave the layout to XLA
    shard = NamedSharding(mesh, P("data"))
    d = jax.jit(lambda l, a, b: l(a, b))(lp, jax.device_put(x0, shard), jax.device_put(x1, shard))
    assert d.sharding.spec == P("data"), d.sharding
    np.save(out, np.stack([np.asarray(d), np.asarray(lp(x0, x1))]))


def test_lpips_shards_with_the_batch(trunk, tmp_path, subprocess_env):
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, __file__, "sharded", str(trunk[1]), str(tmp_path / "d.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = np.load(tmp_path / "d.npy")
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


# --- gradients ------------------------------------------------------------------------------

def test_unit_normalisation_matches_lpips_and_has_finite_gradient_at_zero():
    normalize_tensor = import_lpips().normalize_tensor  # lpips' own function
    rng = np.random.default_rng(0)
    f = rng.standard_normal((4, 3, 3, 8)).astype(np.float32) * np.float32([[[[1]]], [[[1e-3]]], [[[1e-6]]], [[[0]]]])
    ref = normalize_tensor(torch.from_numpy(f.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(perceptual._unit(jnp.asarray(f)), ref, rtol=1e-6, atol=1e-7)
    # lpips' sqrt(0) gives a NaN gradient at an all-zero feature vector ...
    t = torch.zeros(1, 8, 1, 1, requires_grad=True)
    (normalize_tensor(t) - 1).pow(2).sum().backward()
    assert torch.isnan(t.grad).all()
    # ... vggjax's does not.
    g = jax.grad(lambda v: jnp.sum((perceptual._unit(v) - 1) ** 2))(jnp.zeros((1, 1, 1, 8)))
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gradients_are_finite_at_identical_black_and_white_images(trunk, pairs, dtype):
    lp = trunk[2](dtype=dtype, conv_impl="direct")  # compiles 2x faster than "auto"
    # block5_conv3 switched off: its ReLU features are all zero, the case lpips gets NaN from.
    params = dict(lp.variables["params"])
    params["block5_conv3"] = dict(params["block5_conv3"], bias=params["block5_conv3"]["bias"] - 1e4)
    lp = lp.replace(variables={"params": params})
    x = 2 * pairs[0][:1, :48, :48] - 1  # 48 px: XLA CPU convs are slow on 32..47 px inputs
    black, white = -np.ones_like(x), np.ones_like(x)
    # One batch holds every case (LPIPS is per image): x==y, black, white, black/white, x/black.
    a = np.concatenate([x, black, white, black, x])
    b = np.concatenate([x, black, white, white, black])
    assert float(np.abs(lp.features(a)["block5_conv3"]).max()) == 0
    lpips_grad = jax.grad(lambda a, b: jnp.sum(lp(a, b)), argnums=(0, 1))
    feature_grad = jax.grad(lambda a, b: jnp.sum(perceptual.feature_loss(
        lp.model, lp.variables, a, b, ("block1_conv2_preact", "block5_conv3"))), argnums=(0, 1))
    for grad in (lpips_grad, feature_grad):
        for g in jax.jit(grad)(a, b):
            assert g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
    assert float(np.abs(jax.jit(lpips_grad)(a, b)[0][4]).max()) > 0  # not finite by being cut off


def test_lpips_bf16_agrees_with_fp32(trunk, pairs):
    x0, x1 = pairs
    d32 = np.asarray(trunk[2]()(x0, x1, normalize=True))
    d16 = trunk[2](dtype=jnp.bfloat16)(x0, x1, normalize=True)
    assert d16.dtype == jnp.float32
    # The photo-against-itself pairs have d32 ~ 1e-16 (fp32 noise around 0): relative to that,
    # any rounding is "100%", so only the real pairs are compared.
    real = d32 > 1e-6
    rel = np.abs(np.asarray(d16) - d32)[real] / d32[real]
    print(f"\nLPIPS bf16 vs fp32: max relative difference {rel.max():.2e}")
    assert rel.max() <= 1e-2  # real photos: python -m benchmarks.bench_losses --photos


# --- feature, style and total-variation losses against NumPy ---------------------------------

@pytest.fixture(scope="module")
def vgg11(make_variables):
    rng = np.random.default_rng(5)
    x, y = (rng.standard_normal((2, 40, 48, 3)).astype(np.float32) for _ in range(2))
    return vggjax.create("vgg11", include_top=False), make_variables("vgg11", include_top=False, seed=4), x, y


def np_taps(model, variables, x, layers):
    return {k: np.asarray(v, np.float64) for k, v in model.apply(variables, x, outputs=layers).items()}


def test_feature_loss_equals_numpy(vgg11):
    model, variables, x, y = vgg11
    layers = ("block2_conv1_preact", "block3_conv2")
    fx, fy = np_taps(model, variables, x, layers), np_taps(model, variables, y, layers)
    assert (fx["block2_conv1_preact"] < 0).any() and (fx["block3_conv2"] >= 0).all()
    for kind, op in (("mse", np.square), ("l1", np.abs)):
        want = sum(w * op(fx[k] - fy[k]).mean(axis=(1, 2, 3)) for k, w in zip(layers, (0.3, 2.0)))
        got = perceptual.feature_loss(model, variables, x, y, layers, weights=(0.3, 2.0), kind=kind)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown layer"):
        perceptual.feature_loss(model, variables, x, y, ("block3_conv3",))
    with pytest.raises(ValueError, match="2 weights for 1 layers"):
        perceptual.feature_loss(model, variables, x, y, ("block1_conv1",), weights=(1, 2))
    with pytest.raises(ValueError, match="kind must be"):
        perceptual.feature_loss(model, variables, x, y, ("block1_conv1",), kind="l2")


def test_feature_and_style_losses_refuse_nan_and_nchw_and_warn_on_raw_pixels(vgg11):
    model, variables, x, y = vgg11
    nan = np.array(y)
    nan[1, 2, 3, 0] = np.inf
    layers = ("block1_conv1",)
    for name, loss in (("feature_loss", perceptual.feature_loss), ("style_loss", perceptual.style_loss)):
        with pytest.raises(ValueError, match=rf"^{name} \w+ holds NaN or Inf$"):
            loss(model, variables, x, nan, layers)
        with pytest.raises(ValueError, match=rf"^{name} x expects NHWC .* it looks like NCHW"):
            loss(model, variables, x.transpose(0, 3, 1, 2), y.transpose(0, 3, 1, 2), layers)
        raw = np.zeros(x.shape, np.uint8)
        with pytest.warns(UserWarning, match=rf"{name} x got uint8 images: it expects preprocessed floats"):
            loss(model, variables, raw, y, layers)
    with pytest.raises(ValueError, match=r"^total_variation x holds NaN or Inf$"):
        perceptual.total_variation(nan)


def np_gram(f):
    n, h, w, c = f.shape
    m = f.transpose(0, 3, 1, 2).reshape(n, c, h * w)  # F: (C, h*w) per image
    return m @ m.transpose(0, 2, 1)


def test_style_loss_equals_numpy(vgg11):
    model, variables, x, _ = vgg11
    style = np.random.default_rng(6).standard_normal((1, 56, 36, 3)).astype(np.float32)  # other size
    layers = ("block1_conv1", "block2_conv1", "block3_conv1")
    fx, fs = np_taps(model, variables, x, layers), np_taps(model, variables, style, layers)
    np.testing.assert_allclose(perceptual.gram(jnp.asarray(fx["block2_conv1"], jnp.float32)),
                               np_gram(fx["block2_conv1"]), rtol=1e-5)
    for normalization in ("gatys", "book"):
        want = 0
        for k in layers:
            _, h, w, c = fx[k].shape
            denom = 4 * c ** 2 * (h * w) ** 2 if normalization == "gatys" else 4 * 9 * (40 * 48) ** 2
            want = want + ((np_gram(fx[k]) - np_gram(fs[k])) ** 2).sum(axis=(1, 2)) / denom / 3
        got = perceptual.style_loss(model, variables, x, style, layers, normalization=normalization)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert got.shape == (2,) and got.dtype == jnp.float32


def test_total_variation_equals_numpy():
    x = np.random.default_rng(7).standard_normal((2, 9, 7, 3)).astype(np.float64)
    a = (x[:, :-1, :-1] - x[:, 1:, :-1]) ** 2
    b = (x[:, :-1, :-1] - x[:, :-1, 1:]) ** 2
    np.testing.assert_allclose(perceptual.total_variation(x.astype(np.float32)),
                               ((a + b) ** 1.25).sum(axis=(1, 2, 3)), rtol=1e-5)
    g = jax.grad(lambda v: perceptual.total_variation(v).sum())(jnp.zeros((1, 5, 5, 3)))
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match="power must be >= 1"):
        perceptual.total_variation(x, power=0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_losses_return_float32_with_any_model_dtype(vgg11, dtype):
    model, variables, x, y = vgg11
    model = model.clone(dtype=dtype)
    for value in (perceptual.feature_loss(model, variables, x, y, ("block2_conv1",)),
                  perceptual.style_loss(model, variables, x, y, ("block1_conv1",)),
                  perceptual.total_variation(jnp.asarray(x, dtype))):
        assert value.shape == (2,) and value.dtype == jnp.float32 and np.isfinite(value).all()


# --- the book's style-transfer loss against the book's Keras code ----------------------------

@pytest.fixture(scope="module")
def book_setup(keras, make_variables, tmp_path_factory):
    """A Keras VGG19 and the vggjax conversion of the same seeded h5, with caffe-preprocessed
    content, style and combination images (48x64: non-square catches an H/W swap)."""
    d = tmp_path_factory.mktemp("vgg19")
    params = make_variables("vgg19", include_top=False, seed=8, input_rms=70.0)["params"]
    keras_model = keras_vgg19(keras, params, 48, 64, d / "vgg19.h5")
    vggjax.convert_file("keras", "vgg19", d / "vgg19.h5", d / "converted")
    pretrained = vggjax.load(d / "converted")
    rng = np.random.default_rng(9)
    content, style = (np.repeat(np.repeat(rng.uniform(0, 255, (1, 7, 9, 3)), 8, 1), 8, 2)[:, :48, :64]
                      .astype(np.float32) for _ in range(2))
    content, style = (np.asarray(pretrained.preprocess(a)) for a in (content, style))
    combination = 0.6 * content + 0.4 * style + rng.normal(0, 2, content.shape).astype(np.float32)
    return keras, keras_model, pretrained, content, style, combination


@pytest.mark.parametrize("name", ["book1", "book2"])
def test_style_transfer_presets_equal_the_books_keras_loss(book_setup, name):
    keras, keras_model, pretrained, content, style, combination = book_setup
    p = perceptual.PRESETS[name]
    want = book_loss(keras, keras_model, content, style, combination, p.content_weight,
                     p.style_weight, p.tv_weight)
    targets = perceptual.style_transfer_targets(pretrained.model, pretrained.variables, content, style, name)
    total, parts = perceptual.style_transfer_loss(pretrained.model, pretrained.variables, combination,
                                              targets, name)
    for key, value in dict(parts, total=total).items():
        rel = abs(float(value[0]) - want[key]) / abs(want[key])
        print(f"\n{name} {key}: vggjax {float(value[0]):.6g} keras {want[key]:.6g} relative {rel:.1e}")
        assert rel <= 1e-5, (key, float(value[0]), want[key])
    assert min(want.values()) > 0, want  # every term is there (each one checked above)


if __name__ == "__main__" and sys.argv[1:2] == ["sharded"]:
    _sharded_child()
