"""Run outputs: JSON files that accumulate phases, the training-curves PNG, and the exported classifier."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

import vggjax
from vggjax import report
from vggjax.classifier import Head, init_classifier
from vggjax.weights import flatten

SIZE = 32


def _history(n, start=0.5):
    return [{"epoch": e, "loss": 1.0 / e, "accuracy": start + 0.04 * e, "val_loss": 1.2 / e,
             "val_accuracy": start + 0.03 * e} for e in range(1, n + 1)]


def test_update_json_accumulates_phases_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / report.HISTORY
    report.update_json(path, "features", _history(2))
    content = report.update_json(path, "frozen", _history(3))
    assert json.loads(path.read_text()) == content == {"features": _history(2), "frozen": _history(3)}
    report.update_json(path, "features", _history(1))  # a rerun replaces only its own phase
    assert json.loads(path.read_text())["features"] == _history(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [report.HISTORY]


def test_curves_png_has_one_column_per_phase(tmp_path):
    one = report.plot_curves({"features": _history(5)}, tmp_path / "one.png")
    three = report.plot_curves({"features": _history(5), "frozen": _history(4), "finetune": _history(6)},
                               tmp_path / "three.png")
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(one) as a, Image.open(three) as b:
        a.load(), b.load()
        assert a.format == b.format == "PNG"
        assert a.height == b.height and b.width > 2.5 * a.width
        # Not a blank canvas: blue curves in every column.
        rgb = np.asarray(b.convert("RGB")).astype(int)
        blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 80) & (rgb[..., 1] < 80)
        thirds = np.array_split(blue, 3, axis=1)
        assert all(t.sum() > 100 for t in thirds)
    with pytest.raises(ValueError, match="no history"):
        report.plot_curves({"features": []}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


@pytest.fixture(scope="module")
def trained(make_variables):
    """A VGG11 base with a head on 32x32 images, parameters perturbed as if fine-tuned."""
    base_variables = make_variables("vgg11", include_top=False, seed=4, input_rms=1.0)
    model, variables = init_classifier(base_variables, vggjax.VGG11(include_top=False),
                                       Head(units=8, dropout_rate=0.5), SIZE, jax.random.PRNGKey(0))
    variables = jax.tree.map(lambda x: x * 1.01, variables)  # the exported base differs from the input
    meta = dict(arch="vgg11", source="torchvision", source_sha256="0" * 64, include_top=False,
                head="torch", preprocessing="torch", classifier_activation=None, num_classes=1000)
    clf = report.TrainedClassifier(model=model, variables=variables, preprocessing="rescale",
                                   image_size=SIZE, class_names=("cats", "dogs"))
    return clf, meta


def test_export_round_trip_predicts_like_the_model_in_memory(trained, tmp_path):
    clf, meta = trained
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    report.export(tmp_path / "export", clf, meta, info={"phase": "finetune"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    # The base is a weights directory vggjax.load reads: same Keras names, same meta except
    # the preprocessing the classifier was trained with, and the trained values.
    base = vggjax.load(tmp_path / "export" / report.BASE)
    assert base.meta == dict(meta, preprocessing="rescale", vggjax_version=vggjax.__version__)
    assert list(base.params) == list(clf.variables["params"]["base"])
    for path, value in flatten(clf.variables["params"]["base"]).items():
        np.testing.assert_array_equal(flatten(base.params)[path], value)

    loaded = report.load_classifier(tmp_path / "export")
    assert loaded.class_names == ("cats", "dogs") and loaded.image_size == SIZE
    assert loaded.meta["phase"] == "finetune"
    expected = jax.nn.sigmoid(clf.model.apply(clf.variables, images.astype(np.float32) / 255.0)[:, 0])
    in_memory = report.predict(clf, images)
    from_disk = report.predict(tmp_path / "export", images)
    assert from_disk.shape == (5,) and from_disk.dtype == np.float32
    np.testing.assert_array_equal(from_disk, in_memory)
    np.testing.assert_allclose(in_memory, expected, rtol=1e-5, atol=1e-6)
    # 3 batches of 2, the last one padded: the same probabilities.
    np.testing.assert_allclose(report.predict(loaded, images, batch_size=2), in_memory, rtol=1e-5, atol=1e-6)
    assert 0.02 < np.std(in_memory)  # the images get different probabilities

    # Exporting again replaces the directory as a whole.
    report.export(tmp_path / "export", clf, meta, info={"phase": "frozen"})
    assert report.load_classifier(tmp_path / "export").meta["phase"] == "frozen"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_predict_names_the_expected_image_shape(trained):
    clf, _ = trained
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\).*found \(2, 48, 48, 3\)"):
        report.predict(clf, np.zeros((2, 48, 48, 3), np.uint8))


def test_load_classifier_of_a_plain_weights_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.json is missing"):
        report.load_classifier(tmp_path)
