"""tools/predict.py (vggjax.inference.predictor) against Keras' own predict, and on an exported classifier."""
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import vggjax
from vggjax.inference import classifier
from vggjax.inference.heads import Head, init_classifier
from vggjax.inference.predictor import load_predictor, predict_files
from vggjax.utils.images import load_image
from vggjax.weights.preprocessing import imagenet_classes
from helpers import write_jpegs

from vggjax.cli import predict  # the command's main(), in-process

TOOLS = Path(__file__).parents[1] / "tools"


@pytest.fixture(scope="module")
def imagenet(keras, vgg16_with_top, tmp_path_factory):
    """Converted VGG16 with top, Keras' model on the same h5, three image files of other sizes
    (one a grayscale PNG) and a corrupt one."""
    tmp = tmp_path_factory.mktemp("predict")
    h5, converted = vgg16_with_top
    model = keras.applications.VGG16(weights=None)
    model.load_weights(h5)
    paths = write_jpegs(tmp, [(300, 260), (180, 240)], seed=2)
    gray = tmp / "gray.png"
    Image.open(paths[0]).convert("L").resize((230, 200)).save(gray)
    broken = tmp / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return model, converted, [*paths, gray], broken


def run_json(capsys, argv):
    assert predict.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_top5_equals_keras_predict_on_load_img(keras, imagenet, capsys, tmp_path):
    model, weights, paths, broken = imagenet
    batch = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(224, 224)))
                      for p in paths])
    want = model.predict(keras.applications.vgg16.preprocess_input(batch), verbose=0)
    top6 = -np.sort(-want, axis=1)[:, :6]
    assert np.min(-np.diff(top6, axis=1)) > 1e-4  # the top-5 and its order mean something

    records = run_json(capsys, [*map(str, paths[:1]), str(broken), *map(str, paths[1:]),
                                "--weights", str(weights), "--cam", str(tmp_path / "cams")])
    assert [r["file"] for r in records] == [str(paths[0]), str(broken), *map(str, paths[1:])]
    assert "broken.jpg" in records[1]["error"]
    classes = imagenet_classes()
    for r, probs in zip(records[:1] + records[2:], want):
        order = np.argsort(-probs)[:5]
        assert [t["index"] for t in r["top"]] == order.tolist()
        err = np.max(np.abs([t["probability"] for t in r["top"]] - probs[order]))
        print(f"\nparity predict top-5 {r['file'].split('/')[-1]}: max abs error {err:.1e}")
        assert err <= 1e-5
        assert [(t["wnid"], t["name"]) for t in r["top"]] == [classes[i] for i in order]
        with Image.open(r["cam"]) as cam, Image.open(r["file"]) as original:
            assert cam.format == "PNG" and cam.mode == "RGB" and cam.size == original.size


def test_text_output_names_the_classes_and_interpolation_changes_the_pixels(imagenet, capsys):
    _, weights, paths, _ = imagenet
    assert predict.main([str(paths[0]), "--weights", str(weights), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(paths[0]) and len(lines) == 3
    nearest = run_json(capsys, [str(paths[0]), "--weights", str(weights), "--top", "1"])
    bicubic = run_json(capsys, [str(paths[0]), "--weights", str(weights), "--top", "1",
                                "--interpolation", "bicubic"])
    assert lines[1].split(maxsplit=2)[2] == nearest[0]["top"][0]["name"]
    assert nearest[0]["top"][0]["probability"] != bicubic[0]["top"][0]["probability"]


@pytest.mark.parametrize("extra, pattern", [
    (["--top", "0"], "must be >= 1"),
    (["--top", "1001"], "exceeds the 1000 classes"),
    (["--interpolation", "area"], "invalid choice"),
    (["--cam", "FILE"], "exists and is not a directory"),
])
def test_bad_flags_are_refused_before_any_work(imagenet, capsys, extra, pattern, tmp_path):
    _, weights, paths, _ = imagenet
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / "FILE") if e == "FILE" else e for e in extra]
    with pytest.raises(SystemExit) as exit_:
        predict.main([str(paths[0]), "--weights", str(weights), *extra])
    assert exit_.value.code == 2 and pattern in capsys.readouterr().err


def test_weights_without_top_are_refused(make_variables, capsys, tmp_path):
    from vggjax.weights.keras import write_legacy_h5

    write_legacy_h5(make_variables("vgg16", include_top=False)["params"], tmp_path / "w.h5")
    vggjax.convert_file("keras", "vgg16", tmp_path / "w.h5", tmp_path / "notop")
    assert predict.main(["x.jpg", "--weights", str(tmp_path / "notop")]) == 1
    assert "--include-top" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(make_variables, tmp_path_factory):
    """An exported cats-vs-dogs classifier (VGG11 base, 32x32 images) and the object it came from."""
    base = make_variables("vgg11", include_top=False, seed=4, input_rms=1.0)
    model, variables = init_classifier(base, vggjax.VGG11(include_top=False), Head(units=8),
                                       32, jax.random.PRNGKey(0))
    clf = classifier.TrainedClassifier(model=model, variables=variables, preprocessing="rescale",
                                   image_size=32, class_names=("cats", "dogs"))
    meta = dict(arch="vgg11", source="keras", include_top=False, top_input="keras",
                preprocessing="caffe")
    directory = tmp_path_factory.mktemp("export") / "finetune"
    classifier.save(directory, clf, meta)
    return clf, directory


def test_exported_classifier_prints_p_dog_and_writes_a_cam(exported, capsys, tmp_path):
    clf, directory = exported
    paths = write_jpegs(tmp_path, [(50, 70), (40, 40)], seed=3)
    records = run_json(capsys, [*map(str, paths), "--weights", str(directory),
                                "--cam", str(tmp_path / "cams")])
    pixels = np.stack([load_image(p, (32, 32)) for p in paths])
    p_dog = classifier.predict(clf, pixels)[:, 1]
    for r, want in zip(records, p_dog):
        assert r["top"][0]["name"] in ("cats", "dogs") and len(r["top"]) == 2
        got = {t["name"]: t["probability"] for t in r["top"]}
        np.testing.assert_allclose(got["dogs"], want, atol=1e-6)
        with Image.open(r["cam"]) as cam, Image.open(r["file"]) as original:
            assert cam.size == original.size
    assert predict.main([str(paths[0]), "--weights", str(directory)]) == 0
    name, p = ("dogs", p_dog[0]) if p_dog[0] >= 0.5 else ("cats", 1 - p_dog[0])
    assert capsys.readouterr().out.splitlines()[1] == f"  {name} ({p:.4f}); P(dogs) = {p_dog[0]:.4f}"


def test_top_1_names_the_winning_class_whichever_it_is(exported, capsys, tmp_path):
    clf, directory = exported
    paths = write_jpegs(tmp_path, [(40, 40), (44, 52), (60, 36), (36, 36)], seed=9)
    p_dog = classifier.predict(clf, np.stack([load_image(p, (32, 32)) for p in paths]))[:, 1]
    assert predict.main([*map(str, paths), "--weights", str(directory), "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()[1::2]
    for line, p in zip(lines, p_dog):
        assert line.startswith("  dogs (" if p >= 0.5 else "  cats (") and line.endswith(f"P(dogs) = {p:.4f}")


def test_a_cam_file_the_user_made_survives_and_vggjax_s_own_is_replaced(exported, capsys, tmp_path):
    _, directory = exported
    paths = write_jpegs(tmp_path, [(40, 40), (48, 40)], seed=5)
    cams = tmp_path / "cams"
    args = [*map(str, paths), "--weights", str(directory), "--cam", str(cams)]
    assert predict.main(args) == 0  # vggjax's own CAMs: a second run replaces them
    first = {p.name: p.read_bytes() for p in cams.glob("*.png")}
    assert len(first) == 2 and predict.main(args) == 0
    capsys.readouterr()
    user = cams / f"{paths[1].stem}_cam.png"
    user.write_bytes(b"the user's drawing")
    assert predict.main(args) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: .*{user.name} exists and vggjax did not write it .*\n", err), err
    assert user.read_bytes() == b"the user's drawing"
    assert (cams / f"{paths[0].stem}_cam.png").read_bytes() == first[f"{paths[0].stem}_cam.png"]


def test_the_script_skips_unreadable_files_and_fails_when_none_is_readable(
        exported, subprocess_env, tmp_path):
    _, directory = exported
    good = write_jpegs(tmp_path, [(40, 40)])[0]
    bad = tmp_path / "truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    run = lambda *files: subprocess.run([sys.executable, str(TOOLS / "predict.py"), *map(str, files), "--weights",
                                         str(directory)], env=subprocess_env, capture_output=True,
                                        text=True, timeout=300)
    ok = run(bad, good)
    assert ok.returncode == 0 and "P(dogs)" in ok.stdout
    assert "skipped" in ok.stderr and "truncated.png" in ok.stderr
    none = run(bad, tmp_path / "missing.jpg")
    assert none.returncode != 0 and "truncated.png" in none.stderr and "missing.jpg" in none.stderr


def test_a_decompression_bomb_is_one_line_and_the_other_images_are_classified(exported, tmp_path,
                                                                               monkeypatch, capsys):
    from PIL import Image as PILImage

    _, directory = exported
    good, bomb = write_jpegs(tmp_path, [(40, 40), (120, 100)], seed=7)
    # Pillow's own limit, lowered so that a small file trips it (its real check, not a stand-in).
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 40 * 40)
    # --quiet: stderr is then the skip line alone (without it the progress bar ends there too).
    assert predict.main([str(bomb), str(good), "--weights", str(directory), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(rf"skipped {re.escape(str(bomb))}: too large to decode safely \(.*\)\n", err), err
    assert str(good) in out and "P(dogs)" in out


class ShapeSpy:
    """A predictor that records the shape of every batch the model is run on."""

    def __init__(self, predictor):
        self.predictor, self.shapes = predictor, []

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def probabilities(self, pixels):
        self.shapes.append(pixels.shape)
        return self.predictor.probabilities(pixels)


def test_batched_records_equal_per_image_ones_in_order_with_one_shape(exported, tmp_path):
    clf, directory = exported
    paths = write_jpegs(tmp_path, [(40 + 4 * i, 36 + 3 * i) for i in range(6)], seed=11)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files = [*paths[:4], broken, *paths[4:]]  # 7 files, batches of 3: the last batch holds one
    batched = ShapeSpy(load_predictor(directory))
    records = predict_files(batched, files, top=2, batch_size=3, progress=False)
    one_by_one = predict_files(load_predictor(directory), files, top=2, batch_size=1, progress=False)

    assert [r["file"] for r in records] == [r["file"] for r in one_by_one] == list(map(str, files))
    assert records[4] == one_by_one[4] and "broken.jpg" in records[4]["error"] and "top" not in records[4]
    assert batched.shapes == [(3, 32, 32, 3)] * 3  # the short batches padded: one compiled shape
    want = classifier.predict(clf, np.stack([load_image(p, (32, 32)) for p in paths]))
    by_class = lambda record: [p for _, p in sorted((t["index"], t["probability"]) for t in record["top"])]
    for r, single, p in zip(records[:4] + records[5:], one_by_one[:4] + one_by_one[5:], want):
        assert [t["name"] for t in r["top"]] == [t["name"] for t in single["top"]]
        np.testing.assert_allclose(by_class(r), by_class(single), atol=1e-6, rtol=0)
        np.testing.assert_allclose(by_class(r), p, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        predict_files(batched, files, top=2, batch_size=0)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_the_bar_is_on_stderr_quiet_removes_it_and_stdout_stays(exported, capsys, tmp_path, json_flag):
    _, directory = exported
    paths = write_jpegs(tmp_path, [(40, 40), (44, 52), (60, 36)], seed=12)
    args = [*map(str, paths), "--weights", str(directory), *json_flag]
    assert predict.main(args) == 0
    shown = capsys.readouterr()
    # stderr is no terminal here: the log-file form, the bar's last state as one line
    assert re.fullmatch(r"predict: 100%\|#{10}\| 3/3 \[.*img/s\]\n", shown.err), shown.err
    assert predict.main(args + ["--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out == shown.out
    assert str(paths[0]) in shown.out and "predict" not in shown.out
