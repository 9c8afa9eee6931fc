"""The Grain pipeline (no TensorFlow): the same batches as the tf.data one for the same seed, the same
photo pixels, Keras' nearest resizing, shards, and the workflow with TensorFlow blocked."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, write_jpegs
from test_data import BATCH, SIZE, _tags, folder  # noqa: F401  (the awkward-files folder fixture)
from vggjax.train import data, grain_data
from vggjax.train.splits import SkippedFilesWarning
from vggjax.utils.images import load_image


def _both(root, split, **kwargs):
    out = []
    for module in (data, grain_data):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = module.load_split(str(root), split, SIZE, BATCH, **kwargs)
        out.append((s, [w for w in caught if issubclass(w.category, SkippedFilesWarning)]))
    return out


def test_a_class_with_no_decodable_image_is_refused_by_both_pipelines(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    write_jpegs(tmp_path / "train" / "cats", [(20, 20)] * 3)
    dogs = tmp_path / "train" / "dogs"
    dogs.mkdir()
    for k in range(3):
        (dogs / f"dog{k}.jpg").write_bytes(b"not a jpeg")
    for module in (data, grain_data):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the one line below, no warning before it
            with pytest.raises(ValueError) as err:
                module.load_split(str(tmp_path), "train", SIZE, BATCH, shuffle=False)
        assert str(err.value) == (
            f"{tmp_path / 'train'}: class 'dogs' has no image that can be decoded (skipped "
            f"{dogs / 'dog0.jpg'}, {dogs / 'dog1.jpg'}, {dogs / 'dog2.jpg'}): fix or remove those files, "
            "or that class"), module


def test_grain_gives_the_tfdata_batches_for_the_same_seed(folder):  # noqa: F811
    root, expected, bad = folder
    (tf_split, tf_warned), (g_split, g_warned) = _both(root, "train", shuffle=True, seed=3)
    assert len(g_warned) == len(tf_warned) == 1 and g_split.skipped == tf_split.skipped
    assert g_split.names == tf_split.names and g_split.class_names == tf_split.class_names
    for epoch, skip in ((0, 0), (1, 0), (1, 1)):
        tf_batches = list(tf_split.batches(epoch, skip=skip))
        g_batches = list(g_split.batches(epoch, skip=skip))
        assert len(g_batches) == len(tf_batches) == tf_split.steps_per_epoch - skip
        for a, b in zip(tf_batches, g_batches):
            assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
            assert _tags(a) == _tags(b)
            # Equal but for the CMYK JPEG, which TurboJPEG cannot turn into RGB: Pillow decodes
            # it, within a step of TensorFlow.
            assert np.abs(a["image"].astype(int) - b["image"]).max() <= 1


def test_photo_pixels_are_tfdata_s_and_nearest_is_load_img(tmp_path):
    root = tmp_path / "photos"
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for k, path in enumerate(write_jpegs(root / "train" / label, [(120, 90), (77, 150), (64, 64)],
                                             seed=len(label) + 3 * (label == "b"))):
            path.rename(root / "train" / label / f"{label}{k}.jpg")
    # The other chroma layouts and a progressive scan: 4:2:2 progressive, 4:4:4.
    for label, options in (("a", dict(progressive=True, subsampling=1)), ("b", dict(subsampling=0))):
        Image.open(root / "train" / label / f"{label}0.jpg").save(root / "train" / label / "more.jpg",
                                                                   quality=90, **options)
    import tensorflow as tf

    tf_split = data.load_split(str(root), "train", 48, 8, shuffle=False)
    g_split = grain_data.load_split(str(root), "train", 48, 8, shuffle=False)
    (a,), (b,) = list(tf_split.batches(0)), list(g_split.batches(0))
    # libjpeg-turbo's fast integer IDCT and fancy upsampling, as tf.io.decode_image: tf.data's pixels.
    np.testing.assert_array_equal(a["image"], b["image"])
    for path in g_split.names:  # and the resize alone is bit-exact, up and down, on TF's float output
        fast = tf.io.decode_image(tf.io.read_file(path), channels=3).numpy()
        for size in ((48, 48), (200, 31), (1, 1)):
            np.testing.assert_array_equal(grain_data.resize_bilinear(fast, *size),
                                          tf.image.resize(fast, size, method="bilinear").numpy())
    near = grain_data.load_split(str(root), "train", 48, 8, shuffle=False, interpolation="nearest")
    (c,) = list(near.batches(0))
    want = np.stack([load_image(p, (48, 48), "nearest") for p in near.names])  # = keras load_img
    np.testing.assert_array_equal(c["image"], want)


@pytest.fixture(scope="module")
def cats_vs_dogs(tmp_path_factory):
    """tfds cats_vs_dogs prepared by tfds' own builder code, in ArrayRecord (what
    tfds.data_source reads) and TFRecord (what tfds.load reads), from a PetImages zip of 7 cat
    and 6 dog JPEGs plus one file that is not a JFIF JPEG (its download swapped for that zip)."""
    import io
    import zipfile
    from unittest import mock

    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cats_vs_dogs as builder_module

    root = tmp_path_factory.mktemp("tfds")
    archive = root / "kagglecatsanddogs.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as z:
        for cls, count in (("Cat", 7), ("Dog", 6)):
            for i in range(count):
                buf = io.BytesIO()
                size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(buf, "JPEG")
                z.writestr(f"PetImages/{cls}/{i}.jpg", buf.getvalue())
        z.writestr("PetImages/Cat/99.jpg", b"GIF89a, not a JPEG")
    with mock.patch.object(builder_module, "_NUM_CORRUPT_IMAGES", 1), \
            mock.patch.object(tfds.download.DownloadManager, "download", lambda self, url: archive):
        for fmt in ("array_record", "tfrecord"):
            tfds.builder("cats_vs_dogs", data_dir=root / fmt, file_format=fmt).download_and_prepare()
    return root


def test_tfds_cats_vs_dogs_through_data_source_gives_the_tfdata_batches(cats_vs_dogs):
    per_class = {"train": 3, "validation": 1, "test": 2}
    for split in per_class:
        kw = dict(shuffle=split == "train", seed=1, per_class=per_class)
        want = data.load_split("tfds", split, SIZE, 4, data_dir=str(cats_vs_dogs / "tfrecord"), **kw)
        got = grain_data.load_split("tfds", split, SIZE, 4, data_dir=str(cats_vs_dogs / "array_record"), **kw)
        assert isinstance(got.encoded, grain_data.Records)  # record numbers, no images held
        assert got.names == want.names and got.class_names == want.class_names == ("cat", "dog")
        assert sorted(got.names)[0].startswith("PetImages") and got.num_examples == 2 * per_class[split]
        for epoch in (0, 1):
            for a, b in zip(want.batches(epoch), got.batches(epoch), strict=True):
                for key in ("label", "mask", "image"):  # the same decoder (libjpeg-turbo fast IDCT)
                    np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match=r"cat.: 7, .dog.: 6\} images per class; split 'test' needs 7"):
        grain_data.load_split("tfds", "test", SIZE, 4, shuffle=False, data_dir=str(cats_vs_dogs / "array_record"),
                              per_class={"train": 5, "test": 2})


# A Python where TensorFlow looks not installed, to both `import` and `importlib.util.find_spec`
# (tfds and etils ask the latter): not merely a failing import.
WITHOUT_TF = """
import importlib.abc, importlib.util, sys
def absent(name):
    return name == "tensorflow" or name.startswith("tensorflow.")
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if absent(name) else _find(name, package)
"""


def test_tfds_records_are_read_without_tensorflow(cats_vs_dogs, tmp_path):
    from helpers import script_env

    kw = dict(shuffle=True, seed=2, data_dir=str(cats_vs_dogs / "array_record"), per_class={"train": 4})
    script = WITHOUT_TF + textwrap.dedent(f"""
        import json
        from vggjax.train import grain_data
        split = grain_data.load_split("tfds", "train", {SIZE}, 3, **{kw!r})
        batches = [{{"label": b["label"].tolist(), "sum": int(b["image"].sum())}} for b in split.batches(1)]
        print(json.dumps({{"batches": batches, "names": split.names, "tf": "tensorflow" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    here = grain_data.load_split("tfds", "train", SIZE, 3, **kw)
    assert got["tf"] is False and tuple(got["names"]) == here.names
    assert got["batches"] == [{"label": b["label"].tolist(), "sum": int(b["image"].sum())}
                              for b in here.batches(1)]


def test_two_shards_see_each_example_once_in_the_same_steps(folder):  # noqa: F811
    root, expected, _ = folder
    whole = grain_data.load_split(str(root), "train", SIZE, BATCH, shuffle=True, seed=5)
    parts = [whole.shard(i, 2) for i in range(2)]
    seen = [[t for b in p.batches(2) for t in _tags(b)] for p in parts]
    assert len(list(parts[0].batches(2))) == len(list(parts[1].batches(2))) == whole.steps_per_epoch
    assert sorted(seen[0] + seen[1]) == sorted(expected["train"]) and not set(seen[0]) & set(seen[1])


def test_bad_settings_are_one_line(folder):  # noqa: F811
    root, _, _ = folder
    temp = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(ValueError, match=r"^tfds cats_vs_dogs is not prepared in ArrayRecord under "
                                         r"[^\n]*tfds build cats_vs_dogs --file_format=array_record`$"):
        grain_data.load_split("tfds", "train", SIZE, BATCH, shuffle=False, data_dir=str(root / "none"))
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.endswith("tfds") and n not in temp]
    with pytest.raises(ValueError, match=r"interpolation must be one of \('bilinear', 'nearest'\)"):
        grain_data.load_split(str(root), "train", SIZE, BATCH, shuffle=False, interpolation="bicubic")
    with pytest.raises(ValueError, match=r"no_such/train: no such folder"):
        grain_data.load_split(str(root / "no_such"), "train", SIZE, BATCH, shuffle=False)


def test_the_workflow_runs_with_tensorflow_blocked(tmp_path):
    """The features phase end to end (conv features cached, head trained, exported, reported) in a
    Python where importing tensorflow fails."""
    from helpers import random_variables, script_env
    from test_workflow import write_folder
    from vggjax import weights

    write_folder(tmp_path / "data", per_class=4)
    meta = dict(arch="vgg11", include_top=False, top_input="torch", preprocessing="caffe")
    weights.save(tmp_path / "w", random_variables("vgg11", False, seed=0, input_rms=70.0), meta)
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
        sys.argv = ["finetune_catsdogs.py", "--pipeline", "grain", "--data", {str(tmp_path / "data")!r},
                    "--weights", {str(tmp_path / "w")!r}, "--workdir", {str(tmp_path / "run")!r},
                    "--phases", "features", "--epochs", "1", "--image-size", "32", "--batch-size", "4"]
        runpy.run_path({REPO + "/examples/finetune_catsdogs.py"!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "features: test accuracy" in proc.stdout
    assert (tmp_path / "run" / "classifiers" / "features" / "classifier.json").is_file()


@pytest.mark.slow  # the smoke job `make demo` runs (--pipeline grain), its three phases twice
def test_the_smoke_workflow_and_its_resume_run_with_tensorflow_blocked(tmp_path):
    from helpers import script_env

    script = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
        sys.argv = ["finetune_catsdogs.py", "--smoke", "--pipeline", "grain", "--workdir", {str(tmp_path / "run")!r}]
        runpy.run_path({REPO + "/examples/finetune_catsdogs.py"!r}, run_name="__main__")
    """)
    runs = [subprocess.run([sys.executable, "-c", script], env=script_env(tmp_path), capture_output=True,
                           text=True, timeout=900) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetune: test accuracy" in runs[0].stdout
    assert "already finished" in runs[1].stdout or "already reported" in runs[1].stdout
    # TensorBoard's event files, written without TensorFlow (tensorboardX).
    assert all(list((tmp_path / "run" / "tensorboard" / phase / "validation").glob("events.out.tfevents.*"))
               for phase in ("features", "frozen", "finetune"))
