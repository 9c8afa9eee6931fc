"""The Grain pipeline (no TensorFlow): the same batches as the tf.data one for the same seed, the same
photo pixels, Keras' nearest resizing, shards, and the workflow with TensorFlow blocked."""
import subprocess
import sys
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


def test_two_shards_see_each_example_once_in_the_same_steps(folder):  # noqa: F811
    root, expected, _ = folder
    whole = grain_data.load_split(str(root), "train", SIZE, BATCH, shuffle=True, seed=5)
    parts = [whole.shard(i, 2) for i in range(2)]
    seen = [[t for b in p.batches(2) for t in _tags(b)] for p in parts]
    assert len(list(parts[0].batches(2))) == len(list(parts[1].batches(2))) == whole.steps_per_epoch
    assert sorted(seen[0] + seen[1]) == sorted(expected["train"]) and not set(seen[0]) & set(seen[1])


def test_bad_settings_are_one_line(folder):  # noqa: F811
    root, _, _ = folder
    with pytest.raises(ValueError, match="the grain pipeline reads image folders"):
        grain_data.load_split("tfds", "train", SIZE, BATCH, shuffle=False)
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
    assert (tmp_path / "run" / "export" / "features" / "classifier.json").is_file()


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
