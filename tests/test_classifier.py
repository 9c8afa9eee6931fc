"""The book's head on a pretrained VGG base: parameter layout, pretrained weights kept, dropout,
BatchNorm mode; the exported classifier round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from vggjax.inference import classifier, heads
from vggjax.inference.heads import Classifier, Head, init_classifier
from vggjax.utils.trees import digest, flatten
from vggjax.utils import ownership

SIZE = 32


@pytest.fixture(scope="module")
def base_variables():
    from conftest import random_variables
    return random_variables("vgg11", include_top=False, seed=3)


def test_head_is_flatten_dense_relu_dropout_dense():
    head = Head(units=8, dropout_rate=0.5, num_outputs=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 5))
    variables = head.init(jax.random.PRNGKey(1), x)
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes == {"hidden": {"kernel": (20, 8), "bias": (8,)}, "logits": {"kernel": (8, 1), "bias": (1,)}}
    p = variables["params"]
    hidden = np.maximum(np.asarray(x).reshape(3, -1) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    expected = hidden @ p["logits"]["kernel"] + p["logits"]["bias"]
    np.testing.assert_allclose(head.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    # Dropout only in training, and then with the rng it is given.
    a, b = (head.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)}) for k in (2, 3))
    assert not np.allclose(a, b)


def test_init_classifier_keeps_pretrained_base_and_keras_names(base_variables):
    base = vggjax.VGG11(include_top=False)
    model, variables = init_classifier(base_variables, base, Head(units=16), 32, jax.random.PRNGKey(0))
    assert model == Classifier(base=base, head=Head(units=16))
    assert set(variables["params"]) == {"base", "head"}
    assert list(variables["params"]["base"]) == list(base_variables["params"])
    for path, value in flatten(base_variables["params"]).items():
        np.testing.assert_array_equal(flatten(variables["params"]["base"])[path], value)
    # 32x32 -> (1, 1, 512) features -> hidden kernel (512, 16).
    assert variables["params"]["head"]["hidden"]["kernel"].shape == (512, 16)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))

    @jax.jit
    def both(variables, x):
        features = base.apply({"params": variables["params"]["base"]}, x)
        return model.apply(variables, x), Head(units=16).apply({"params": variables["params"]["head"]}, features)

    logits, direct = both(variables, x)
    assert logits.shape == (2, 1)
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    # 150x150 gives the book's 4x4x512 features: the head's input is 8192 wide.
    _, book = init_classifier(base_variables, base, Head(), (150, 150), jax.random.PRNGKey(0))
    assert book["params"]["head"]["hidden"]["kernel"].shape == (4 * 4 * 512, 256)


def test_init_classifier_refuses_a_mismatched_base(base_variables):
    with pytest.raises(ValueError, match="include_top=False"):
        init_classifier(base_variables, vggjax.VGG11(include_top=True), Head(), 224, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"missing \['params/block1_conv2/bias'"):
        init_classifier(base_variables, vggjax.VGG16(include_top=False), Head(), 32, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="at least 32x32"):
        init_classifier(base_variables, vggjax.VGG11(include_top=False), Head(), 16, jax.random.PRNGKey(0))


def test_batchnorm_base_keeps_running_statistics_unless_asked():
    from conftest import random_variables
    base_vars = random_variables("vgg11_bn", include_top=False, seed=4)
    base = vggjax.VGG11_BN(include_top=False)
    model, variables = init_classifier(base_vars, base, Head(units=4), 32, jax.random.PRNGKey(0))
    assert set(variables["batch_stats"]) == {"base"}
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))

    @jax.jit
    def new_stats(variables, x):
        rngs = {"dropout": jax.random.PRNGKey(2)}
        return [m.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[1]["batch_stats"]
                for m in (model, model.clone(train_base_batch_norm=True))]

    frozen, trained = new_stats(variables, x)
    for path, value in flatten(variables["batch_stats"]).items():
        np.testing.assert_array_equal(flatten(frozen)[path], value)
    mean = trained["base"]["block1_conv1_bn"]["mean"]
    assert not np.allclose(mean, variables["batch_stats"]["base"]["block1_conv1_bn"]["mean"])


@pytest.fixture(scope="module")
def trained(make_variables):
    """A VGG11 base with a head on 32x32 images, parameters perturbed as if fine-tuned."""
    base_variables = make_variables("vgg11", include_top=False, seed=4, input_rms=1.0)
    model, variables = init_classifier(base_variables, vggjax.VGG11(include_top=False),
                                       Head(units=8, dropout_rate=0.5), SIZE, jax.random.PRNGKey(0))
    variables = jax.tree.map(lambda x: x * 1.01, variables)  # the exported base differs from the input
    meta = dict(arch="vgg11", source="torchvision", source_sha256="0" * 64, include_top=False,
                top_input="torch", preprocessing="torch", classifier_activation=None, num_classes=1000)
    clf = classifier.TrainedClassifier(model=model, variables=variables, preprocessing="rescale",
                                   image_size=SIZE, class_names=("cats", "dogs"))
    return clf, meta


def test_export_round_trip_predicts_like_the_model_in_memory(trained, tmp_path):
    clf, meta = trained
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    classifier.save(tmp_path / "export", clf, meta, info={"phase": "finetune"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "export"]

    # The base is a weights directory vggjax.load reads: same Keras names, same meta except
    # the preprocessing the classifier was trained with, and the trained values.
    base = vggjax.load(tmp_path / "export" / classifier.BASE)
    assert base.meta == dict(meta, preprocessing="rescale", vggjax_version=vggjax.__version__,
                             variables_sha256=digest({"params": clf.variables["params"]["base"]}))
    assert list(base.params) == list(clf.variables["params"]["base"])
    for path, value in flatten(clf.variables["params"]["base"]).items():
        np.testing.assert_array_equal(flatten(base.params)[path], value)

    loaded = classifier.load_classifier(tmp_path / "export")
    assert loaded.class_names == ("cats", "dogs") and loaded.image_size == SIZE
    assert loaded.meta["phase"] == "finetune"
    p_dogs = jax.nn.sigmoid(clf.model.apply(clf.variables, images.astype(np.float32) / 255.0)[:, 0])
    expected = np.stack([1 - p_dogs, p_dogs], axis=-1)  # a binary head gives both columns
    in_memory = classifier.predict(clf, images)
    from_disk = classifier.predict(tmp_path / "export", images)
    assert from_disk.shape == (5, 2) and from_disk.dtype == np.float32
    np.testing.assert_array_equal(from_disk, in_memory)
    np.testing.assert_allclose(in_memory, expected, rtol=1e-5, atol=1e-6)
    # 3 batches of 2, the last one padded: the same probabilities.
    np.testing.assert_allclose(classifier.predict(loaded, images, batch_size=2), in_memory, rtol=1e-5, atol=1e-6)
    assert 0.02 < np.std(in_memory[:, 1])  # the images get different probabilities

    # Exporting again (overwrite) replaces the directory as a whole.
    classifier.save(tmp_path / "export", clf, meta, info={"phase": "frozen"}, overwrite=True)
    assert classifier.load_classifier(tmp_path / "export").meta["phase"] == "frozen"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "export"]


def test_predict_names_the_expected_image_shape(trained):
    clf, _ = trained
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\).*found \(2, 48, 48, 3\)"):
        classifier.predict(clf, np.zeros((2, 48, 48, 3), np.uint8))


def test_load_classifier_of_a_plain_weights_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.json is missing"):
        classifier.load_classifier(tmp_path)


@pytest.mark.parametrize("images, message", [
    (np.full((2, SIZE, SIZE, 3), 0.5, np.float32), r"look scaled to 0..1, expected 0..255"),
    (np.full((2, SIZE, SIZE, 3), -0.5, np.float32), r"range over -0.5..-0.5, expected RGB in 0..255"),
    (np.full((2, SIZE, SIZE, 3), 1000, np.uint16), r"dtype uint16: expected uint8 or floats in 0..255"),
    (np.full((2, SIZE, SIZE, 3), np.nan, np.float32), r"contain NaN or Inf"),
], ids=["floats-0..1", "floats-negative", "uint16", "nan"])
def test_predict_refuses_images_that_cannot_be_0_255_rgb(trained, images, message):
    clf, _ = trained
    with pytest.raises(ValueError, match=message):
        classifier.predict(clf, images)


def test_predict_takes_dark_float_images_when_told_and_refuses_bad_batch_sizes(trained):
    clf, _ = trained
    dark = np.full((2, SIZE, SIZE, 3), 0.5, np.float32)
    p_dogs = np.asarray(jax.nn.sigmoid(clf.model.apply(clf.variables, dark / 255.0)[:, 0]))
    want = np.stack([1 - p_dogs, p_dogs], axis=-1)
    np.testing.assert_allclose(classifier.predict(clf, dark, assume_range="0..255"), want,
                               rtol=1e-5, atol=1e-6)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            classifier.predict(clf, dark, batch_size=bad, assume_range="0..255")


def test_a_damaged_export_is_refused_on_load(trained, tmp_path):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    clf, meta = trained
    classifier.save(tmp_path / "export", clf, meta)
    config = json.loads((tmp_path / "export" / classifier.CLASSIFIER).read_text())
    # classifier.json may only name a base inside the export, unless the caller passes one.
    outside = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "export" / classifier.BASE, outside)
    (tmp_path / "export" / classifier.CLASSIFIER).write_text(json.dumps({**config, "base": "../elsewhere"}))
    with pytest.raises(ValueError, match=r"names base '../elsewhere', outside the export"):
        classifier.load_classifier(tmp_path / "export")
    assert classifier.load_classifier(tmp_path / "export", base=outside).image_size == SIZE
    (tmp_path / "export" / classifier.CLASSIFIER).write_text(json.dumps(config))
    # Every file has its sha256 in classifier.json: a changed or truncated one is named.
    head_file = tmp_path / "export" / classifier.HEAD
    head, pristine = load_file(str(head_file)), head_file.read_bytes()
    head["logits/bias"] = np.full_like(head["logits/bias"], 0.25)
    save_file(head, str(head_file))
    changed = (f"{head_file} is damaged or was changed: its sha256 differs from the one recorded in "
               f"{tmp_path / 'export' / classifier.CLASSIFIER}; export it again")
    with pytest.raises(ValueError) as err:
        classifier.load_classifier(tmp_path / "export")
    assert str(err.value) == changed
    base_file = tmp_path / "export" / classifier.BASE / "vggjax.json"
    base_file.write_text(base_file.read_text() + " ")
    head_file.write_bytes(pristine)
    with pytest.raises(ValueError, match=rf"{base_file} is damaged or was changed"):
        classifier.load_classifier(tmp_path / "export")
    # An export without digests (an older vggjax's) still loads; its other checks still hold.
    (tmp_path / "export" / classifier.CLASSIFIER).write_text(json.dumps(
        {k: v for k, v in config.items() if k != "files"}))
    assert classifier.load_classifier(tmp_path / "export").image_size == SIZE
    head["logits/bias"] = np.full_like(head["logits/bias"], np.nan)
    save_file(head, str(head_file))
    with pytest.raises(ValueError, match=r"head.safetensors is corrupt: logits/bias: contains NaN"):
        classifier.load_classifier(tmp_path / "export")
    head["logits/bias"] = np.full_like(head["logits/bias"], 0.25)
    save_file(head, str(head_file))
    with pytest.raises(ValueError, match=r"do not match the head_sha256"):
        classifier.load_classifier(tmp_path / "export")
    head_file.write_bytes(pristine[:100])
    with pytest.raises(ValueError, match=rf"^{head_file} is damaged: SafetensorError: "):
        classifier.load_classifier(tmp_path / "export")


@pytest.mark.parametrize("pooling", ["avg", "max", "torch"])
def test_head_pools_and_stacks_hidden_layers_as_imported_models_need(pooling):
    """The heads of imported models: global or torchvision pooling, two hidden layers without
    activation, Dropout in front of every Dense but the first; classifier.json round trip."""
    head = Head(units=(6, 4), dropout_rate=0.5, num_outputs=3, pooling=pooling, activation=None)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 5))
    p = head.init(jax.random.PRNGKey(1), x)["params"]
    assert sorted(p) == ["hidden", "hidden_1", "logits"]
    v = np.asarray(x)
    # On a 7x7 grid torchvision's adaptive pool is the identity: the features are flattened.
    v = {"avg": v.mean((1, 2)), "max": v.max((1, 2)), "torch": v.reshape(2, -1)}[pooling]
    for name in ("hidden", "hidden_1", "logits"):
        v = v @ p[name]["kernel"] + p[name]["bias"]
    np.testing.assert_allclose(head.apply({"params": p}, x), v, rtol=1e-5, atol=1e-5)
    assert heads.head_from_config(heads.head_config(head)) == head
    with pytest.raises(ValueError, match=r"head pooling must be one of"):
        Head(pooling="mean").apply({"params": p}, x)
