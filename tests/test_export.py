"""tools/export.py: each artifact (jax, savedmodel, onnx) run by its own runtime equals vggjax on real
JPEGs, for batches of 1 and 7; the jax one runs without vggjax/flax/orbax; refusals are one line."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import vggjax
from helpers import random_variables, run_on_small_disk, script_env, write_jpegs
from vggjax.export import artifact
import vggjax.inference.artifact
from vggjax.inference import classifier
from vggjax.inference.heads import Head, init_classifier
from vggjax.utils import ownership
from vggjax.utils.images import load_image

TOOLS = Path(__file__).parents[1] / "tools"
# The commands' main(), in-process (a subprocess where its end matters: exit status, one line).
from vggjax.cli import export  # noqa: E402
from vggjax.cli import predict  # noqa: E402

SIZE = 32
FORMATS = sorted(artifact.FORMATS)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An exported cats-vs-dogs classifier (VGG11 base at 32x32, the workflow's export layout), the
    object it came from, and 7 real JPEGs of other sizes read as the classifier's input."""
    tmp = tmp_path_factory.mktemp("export")
    base = random_variables("vgg11", include_top=False, seed=4, input_rms=1.0)
    model, variables = init_classifier(base, vggjax.VGG11(include_top=False), Head(units=8), SIZE,
                                       jax.random.PRNGKey(0))
    clf = classifier.TrainedClassifier(model=model, variables=variables, preprocessing="caffe",
                                       image_size=SIZE, class_names=("cats", "dogs"))
    directory = tmp / "finetune"
    classifier.save(directory, clf, dict(arch="vgg11", source="keras", include_top=False,
                                           top_input="keras", preprocessing="caffe"))
    paths = write_jpegs(tmp, [(40 + 7 * k, 50 - 3 * k) for k in range(7)], seed=8)
    pixels = np.stack([load_image(p, (SIZE, SIZE)) for p in paths])
    return clf, directory, paths, pixels


@pytest.fixture(scope="module")
def artifacts(source, tmp_path_factory):
    """{format: artifact directory}, each written by tools/export.py."""
    _, directory, _, _ = source
    out = tmp_path_factory.mktemp("artifacts")
    for fmt in FORMATS:
        assert export.main([str(directory), "--format", fmt, "--output", str(out / fmt)]) == 0
    return {fmt: out / fmt for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_artifact_predicts_like_the_classifier_for_batches_of_1_and_7(source, artifacts, fmt):
    clf, _, _, pixels = source
    want = classifier.predict(clf, pixels)[:, 1]  # P(dogs), (7,)
    art = vggjax.inference.artifact.load(artifacts[fmt])
    for batch in (pixels, pixels[:1]):
        out = art.outputs(batch)
        assert out["probabilities"].shape == (len(batch), 2) and out["class_ids"].dtype == np.int32
        np.testing.assert_allclose(out["probabilities"][:, 1], want[:len(batch)], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out["class_ids"], (want[:len(batch)] > 0.5).astype(np.int32))
    manifest = json.loads((artifacts[fmt] / vggjax.inference.artifact.MANIFEST).read_text())
    assert manifest["input"] == {"dtype": "uint8", "shape": [None, SIZE, SIZE, 3], "layout": "NHWC",
                                 "values": "RGB 0..255", "preprocessing": "caffe, inside the artifact"}
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["kind"] == "classifier"
    assert "no custom calls" in manifest["conv"] and manifest["vggjax_version"] == vggjax.__version__


def _run_without_vggjax(script: str, env) -> dict:
    """Run `script` in a fresh Python where importing vggjax, flax or orbax fails."""
    guard = "import sys\nfor m in ('vggjax', 'flax', 'orbax', 'orbax.checkpoint'):\n    sys.modules[m] = None\n"
    proc = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_jax_artifact_runs_with_jax_alone(source, artifacts, tmp_path, subprocess_env):
    clf, _, _, pixels = source
    np.save(tmp_path / "x.npy", pixels)
    got = _run_without_vggjax(f"""
        import json, jax, numpy as np
        exported = jax.export.deserialize(open({str(artifacts['jax'] / 'model.jaxexport')!r}, 'rb').read())
        p, ids = exported.call(np.load({str(tmp_path / 'x.npy')!r}))
        print(json.dumps({{"p": np.asarray(p)[:, 1].tolist(), "platforms": list(exported.platforms)}}))
    """, subprocess_env)
    np.testing.assert_allclose(got["p"], classifier.predict(clf, pixels)[:, 1], atol=1e-5, rtol=0)
    assert got["platforms"] == ["cpu", "cuda", "tpu"]


def test_the_savedmodel_runs_under_tensorflow_without_vggjax(source, artifacts, tmp_path, subprocess_env):
    clf, _, _, pixels = source
    np.save(tmp_path / "x.npy", pixels)
    got = _run_without_vggjax(f"""
        import json, numpy as np, tensorflow as tf
        serve = tf.saved_model.load({str(artifacts['savedmodel'])!r}).signatures["serving_default"]
        out = serve(images=tf.constant(np.load({str(tmp_path / 'x.npy')!r})))
        print(json.dumps({{"p": out["probabilities"].numpy()[:, 1].tolist(), "ids": out["class_ids"].numpy().tolist()}}))
    """, subprocess_env)
    want = classifier.predict(clf, pixels)[:, 1]
    np.testing.assert_allclose(got["p"], want, atol=1e-5, rtol=0)
    assert got["ids"] == (want > 0.5).astype(int).tolist()


def test_the_onnx_file_passes_the_checker_with_a_dynamic_batch(artifacts):
    import onnx

    model = onnx.load(str(artifacts["onnx"] / "model.onnx"))
    onnx.checker.check_model(model)
    (images,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    assert images.name == "images" and dims == ["batch", SIZE, SIZE, 3]
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["probabilities", "class_ids"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_runs_the_artifact_and_prints_what_the_source_gives(source, artifacts, fmt, capsys):
    _, directory, paths, _ = source
    files = [str(p) for p in paths[:3]]
    assert predict.main([*files, "--weights", str(directory)]) == 0
    want = capsys.readouterr().out
    assert predict.main([*files, "--weights", str(artifacts[fmt])]) == 0
    assert capsys.readouterr().out == want and "P(dogs)" in want
    assert predict.main([*files, "--weights", str(artifacts[fmt]), "--cam", "cams"]) == 1
    assert "Grad-CAM needs the model's gradients" in capsys.readouterr().err


def test_conv_features_of_weights_without_top_and_a_bf16_artifact(tmp_path, capsys):
    variables = random_variables("vgg11", include_top=False, seed=2, input_rms=70.0)
    meta = dict(arch="vgg11", include_top=False, top_input="torch", preprocessing="caffe")
    vggjax.weights.save(tmp_path / "w", variables, meta)
    pixels = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    want = vggjax.VGG11(include_top=False).apply(variables, vggjax.preprocess_input(pixels, "caffe"))
    with pytest.raises(ValueError, match="--image-size must be an integer >= 32, found 0"):
        artifact.export(tmp_path / "w", "jax", tmp_path / "features", image_size=0)  # not "default"
    with pytest.raises(ValueError, match=r"one 100000x100000 image needs at least \d+\.\d GiB for its "
                                         r"first conv layer alone, more than the \d+\.\d GiB here"):
        artifact.export(tmp_path / "w", "jax", tmp_path / "features", image_size=100_000)
    assert not (tmp_path / "features").exists()
    artifact.export(tmp_path / "w", "jax", tmp_path / "features", image_size=64)
    got = vggjax.inference.artifact.load(tmp_path / "features").outputs(pixels)["features"]
    assert got.shape == (3, 2, 2, 512)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)
    artifact.export(tmp_path / "w", "jax", tmp_path / "bf16", image_size=64, precision="bf16")
    half = vggjax.inference.artifact.load(tmp_path / "bf16").outputs(pixels)["features"]
    assert (tmp_path / "bf16" / "model.jaxexport").stat().st_size < 0.6 * (
        tmp_path / "features" / "model.jaxexport").stat().st_size
    np.testing.assert_allclose(half, want, atol=0.05 * float(np.abs(want).max()), rtol=0)
    (photo,) = write_jpegs(tmp_path, [(64, 64)], seed=1)
    assert "export jax: writing" in capsys.readouterr().err  # the exports' progress bars
    for top in ([], ["--top", "1"]):  # predict on features: one sentence, no traceback
        assert predict.main([str(photo), "--weights", str(tmp_path / "features"), *top]) == 1
        assert capsys.readouterr().err == (f"error: {tmp_path / 'features'} holds conv features, not a "
                                           "classifier: export weights with their top, or a classifier, "
                                           "to predict classes\n")


def test_refusals_are_one_line_and_write_nothing(source, artifacts, tmp_path, capsys):
    _, directory, _, _ = source
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cases = [
        ([str(mine), "--format", "jax", "--output", str(tmp_path / "a")],
         "is neither a classifier directory (classifier.json) nor converted weights (vggjax.json)"),
        ([str(directory), "--format", "jax", "--output", str(mine), "--overwrite"],
         "mine holds files vggjax did not write (mine/notes.txt)"),
        ([str(directory), "--format", "onnx", "--output", str(tmp_path / "b"), "--precision", "bf16"],
         "the onnx format carries precision fp32, found 'bf16'"),
        ([str(directory), "--format", "jax", "--output", str(tmp_path / "c"), "--image-size", "64"],
         "classifies 32x32 images (its top fixes the size); found --image-size 64"),
        ([str(directory), "--format", "jax", "--output", str(artifacts["jax"])],
         "already exists and is not empty; add --overwrite to replace it"),
        ([str(directory), "--format", "jax", "--output", str(directory / "inside")],
         f"is inside the input {directory}; vggjax does not write into its input"),
    ]
    for argv, message in cases:
        assert export.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and (mine / "notes.txt").is_file()
    assert not (directory / "inside").exists() and ownership.foreign(directory) == []
    with pytest.raises(SystemExit):
        export.main([str(directory), "--format", "tflite", "--output", str(tmp_path / "d")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    # --overwrite replaces a vggjax export (and only that).
    assert export.main([str(directory), "--format", "jax", "--output", str(artifacts["jax"]), "--overwrite"]) == 0


@pytest.mark.slow  # 3 x 528 MB of VGG16 with top
def test_vgg16_with_top_in_every_format_equals_the_model(tmp_path):
    from helpers import write_vgg16

    _, _, converted = write_vgg16(tmp_path, seed=5, logit_scale=3.0)
    pretrained = vggjax.load(converted)
    pixels = np.random.default_rng(1).integers(0, 256, (7, 224, 224, 3), dtype=np.uint8)
    want = np.asarray(pretrained.model.apply(pretrained.variables, pretrained.preprocess(pixels)))
    for fmt in FORMATS:
        artifact.export(converted, fmt, tmp_path / fmt)
        art = vggjax.inference.artifact.load(tmp_path / fmt)
        for batch in (pixels, pixels[:1]):
            np.testing.assert_allclose(art.probabilities(batch), want[:len(batch)], atol=1e-5, rtol=0)
        ownership.remove_owned([tmp_path / fmt])


def test_a_full_disk_is_one_line_even_from_tensorflow(source, tmp_path, subprocess_env):
    _, directory, _, _ = source  # SavedModel's writer raises TensorFlow's own error: was a traceback
    out = tmp_path / "disk" / "sm"
    (full,) = run_on_small_disk(out.parent, [("1m", [sys.executable, TOOLS / "export.py", directory,
                                                     "--format", "savedmodel", "--output", out])], subprocess_env)
    assert full["rc"] == 1 and full["left"] == [] and full["stderr"].splitlines()[-1:] == [
        f"error: no space left on device while writing {out}; nothing was written: free some space or "
        "choose another place"] and "Traceback" not in full["stderr"], full["stderr"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _edit_manifest(change):
    def edit(path: Path) -> None:
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return edit


@pytest.mark.parametrize("fmt, name, damage, message", [
    ("onnx", "model.onnx", _truncate, "{file} is damaged or was changed: its sha256 differs from the one "
                                      "recorded in {manifest}; export it again"),
    ("jax", "model.jaxexport", _truncate, "{file} is damaged or was changed: its sha256 differs from "
                                          "the one recorded in {manifest}; export it again"),
    ("onnx", "manifest.json", _edit_manifest(lambda m: m["input"].update(shape=[None, 64, 64, 3])),
     "{manifest} does not match {dir}/model.onnx: it says uint8 (N, 64, 64, 3), the model takes uint8 "
     "(N, 32, 32, 3); was it edited?"),
    ("savedmodel", "manifest.json", _edit_manifest(lambda m: m["input"].update(shape=[None, 64, 64, 3])),
     "{manifest} does not match {dir}: it says uint8 (N, 64, 64, 3), the model takes uint8 "
     "(N, 32, 32, 3); was it edited?"),
    ("jax", "manifest.json", _edit_manifest(lambda m: m.pop("input")),
     "{manifest} is damaged or was edited: its 'input' entry is missing"),
], ids=["truncated-onnx", "truncated-jaxexport", "onnx-input-size-edited", "savedmodel-input-size-edited",
        "no-input-key"])
def test_a_damaged_or_edited_artifact_is_one_line_naming_the_file(source, artifacts, tmp_path, capsys,
                                                                   fmt, name, damage, message):
    _, _, paths, _ = source
    directory = tmp_path / fmt
    shutil.copytree(artifacts[fmt], directory)
    damage(directory / name)
    assert predict.main([str(paths[0]), "--weights", str(directory)]) == 1
    want = message.format(file=directory / name, manifest=directory / "manifest.json", dir=directory)
    assert capsys.readouterr().err == f"error: {want}\n"


def test_an_artifact_without_digests_still_loads_with_a_note(artifacts, tmp_path, caplog):
    directory = tmp_path / "jax"
    shutil.copytree(artifacts["jax"], directory)
    _edit_manifest(lambda m: m.pop("files"))(directory / "manifest.json")  # as an older vggjax wrote it
    for _ in range(2):
        assert vggjax.inference.artifact.load(directory).image_size == SIZE
    assert [r.getMessage() for r in caplog.records] == [
        f"note: {directory / 'manifest.json'} has no file digests (an older vggjax wrote it), so the "
        f"files of {directory} are not verified"]
    _truncate(directory / "model.jaxexport")  # no digest to catch it: the runtime's failure, in one line
    with pytest.raises(ValueError, match=rf"^{directory / 'model.jaxexport'} is damaged: jax.export cannot "
                                         r"load it \(\w+: [^\n]*\)$"):
        vggjax.inference.artifact.load(directory)


@pytest.mark.slow  # two onnx exports in subprocesses; tests/test_console.py is the fast check
def test_an_onnx_export_shows_third_party_logs_only_with_verbose(source, tmp_path):
    """onnx_ir's 12 "value type ... not known" warnings, TensorFlow's C++ lines: kept out of sight
    at their source (loggers, TF_CPP_MIN_LOG_LEVEL), shown with --verbose."""
    _, directory, _, _ = source
    env = {k: v for k, v in script_env(tmp_path).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for extra, noisy in (([], False), (["--verbose"], True)):
        out = tmp_path / f"onnx{len(extra)}"
        proc = subprocess.run([sys.executable, TOOLS / "export.py", directory, "--format", "onnx", "--output",
                               out, "--quiet", *extra], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith(f"wrote onnx artifact to {out}"), proc.stderr
        assert ("onnx_ir" in proc.stderr) == noisy, proc.stderr
        if not noisy:  # --quiet: no progress bar either
            assert proc.stderr == ""
