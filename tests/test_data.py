"""vggjax.train.data on a real image folder (JPEG/PNG files written with PIL) and on mocked tfds cats_vs_dogs."""
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggjax.train import data, splits

SIZE, BATCH = 16, 4
CLASSES = ("cats", "dogs")
GREEN = {"cats": 40, "dogs": 200}  # class colour in the G channel of RGB images


def _solid(tag: int, green: int) -> np.ndarray:
    """A 20x24 solid-colour image whose R channel identifies the file: R = 12 * tag + 6."""
    return np.broadcast_to(np.array([12 * tag + 6, green, 128], np.uint8), (20, 24, 3)).copy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The book's layout with good RGB JPEGs plus every awkward kind of file in train/.

    Returns (root, {split: {tag: (class_index, expected RGB)}}, bad file names).
    """
    root = tmp_path_factory.mktemp("cats_vs_dogs_small")
    expected, tag = {}, 0
    for split, per_class in (("train", 3), ("validation", 2), ("test", 1)):
        expected[split] = {}
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for _ in range(per_class):
                rgb = _solid(tag, GREEN[name])
                Image.fromarray(rgb).save(d / f"{name}.{tag}.jpg", quality=95)
                expected[split][tag] = (label, rgb[0, 0])
                tag += 1
    cats, dogs = root / "train" / "cats", root / "train" / "dogs"
    gray = np.full((20, 24), 12 * tag + 6, np.uint8)
    Image.fromarray(gray, "L").save(cats / "gray.jpg", quality=95)
    expected["train"][tag] = (0, np.array([gray[0, 0]] * 3))
    tag += 1
    cmyk = _solid(tag, GREEN["cats"])
    Image.fromarray(cmyk).convert("CMYK").save(cats / "cmyk.JPEG", quality=95)
    expected["train"][tag] = (0, cmyk[0, 0])
    tag += 1
    rgba = np.concatenate([_solid(tag, GREEN["dogs"]), np.full((20, 24, 1), 90, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(dogs / "rgba.png")
    expected["train"][tag] = (1, rgba[0, 0, :3])
    (dogs / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(700))
    (dogs / "empty.jpg").write_bytes(b"")
    whole = (root / "test" / "dogs").glob("*.jpg").__next__().read_bytes()
    (dogs / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (dogs / "album.jpg").mkdir()  # ImageFolder lists it; reading it fails
    (dogs / "notes.txt").write_text("ImageFolder ignores this")  # neither loaded nor counted as skipped
    return root, expected, ("garbage.jpg", "empty.jpg", "truncated.jpg", "album.jpg")


def _load(root, split, shuffle=False, seed=0):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = data.load_split(str(root), split, SIZE, BATCH, shuffle=shuffle, seed=seed)
    return s, [w for w in caught if issubclass(w.category, data.SkippedFilesWarning)]


def _tags(batch) -> list[int]:
    """Identify each real example of a batch by its R channel (the images are solid colours)."""
    r = batch["image"][batch["mask"]][..., 0].mean(axis=(1, 2))
    return [int(round((v - 6) / 12)) for v in r]


def test_bad_files_skipped_with_one_warning_and_the_rest_converted_to_rgb(folder):
    root, expected, bad = folder
    split, caught = _load(root, "train")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 4 of 13 files" in message and all(name in message for name in bad)
    assert sorted(p.rsplit("/", 1)[-1] for p in split.skipped) == sorted(bad)
    assert split.num_examples == 9 and split.class_names == CLASSES
    for batch in split.batches(0):
        for image, tag in zip(batch["image"][batch["mask"]], _tags(batch)):
            # JPEG of a solid colour (and CMYK->RGB) is within a few levels; PNG with alpha is exact.
            np.testing.assert_allclose(image.astype(int), np.broadcast_to(expected["train"][tag][1], image.shape),
                                       atol=4)


def test_eval_sees_every_example_once_with_the_last_batch_padded_and_masked(folder):
    root, expected, _ = folder
    split, caught = _load(root, "train")
    batches = list(split.batches(0))
    assert len(batches) == split.steps_per_epoch == 3  # 9 examples, batch 4
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape == (BATCH, SIZE, SIZE, 3)
        assert b["label"].dtype == np.int32 and b["label"].shape == (BATCH,)
        assert b["mask"].dtype == bool and b["mask"].shape == (BATCH,)
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 1]
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()  # padding is zeros
    tags = [t for b in batches for t in _tags(b)]
    assert sorted(tags) == sorted(expected["train"])  # each good file exactly once
    labels = [int(l) for b in batches for l in b["label"][b["mask"]]]
    assert labels == [expected["train"][t][0] for t in tags]

    val, caught = _load(root, "validation")
    assert not caught and val.num_examples == 4 and val.steps_per_epoch == 1
    (b,) = val.batches(0)
    assert b["mask"].all() and sorted(_tags(b)) == sorted(expected["validation"])


def test_shuffle_is_a_function_of_seed_and_epoch_and_skip_drops_batches(folder):
    root, _, _ = folder
    split, _ = _load(root, "train", shuffle=True, seed=3)
    again, _ = _load(root, "train", shuffle=True, seed=3)
    other_seed, _ = _load(root, "train", shuffle=True, seed=4)

    def tags(s, epoch, skip=0):
        return [t for b in s.batches(epoch, skip=skip) for t in _tags(b)]

    e0, e1 = tags(split, 0), tags(split, 1)
    assert e0 == tags(again, 0) and e1 == tags(again, 1)  # reproducible across loads
    assert e0 != e1 and sorted(e0) == sorted(e1)  # reshuffled per epoch, still every example once
    assert tags(other_seed, 0) != e0
    full = list(split.batches(1))
    for k in range(split.steps_per_epoch + 1):
        resumed = list(split.batches(1, skip=k))
        assert len(resumed) == len(full) - k
        for a, b in zip(resumed, full[k:]):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="skip=4"):
        split.batches(0, skip=4)


def test_process_shards_see_each_example_once_in_the_same_number_of_steps(folder):
    root, _, _ = folder
    split, _ = _load(root, "train", shuffle=True, seed=1)  # 9 examples, global batch 4
    full = list(split.batches(2))
    shards = [list(split.shard(i, 2).batches(2)) for i in range(2)]
    assert [len(s) for s in shards] == [len(full)] * 2  # all processes take the same steps
    for step, global_batch in enumerate(full):
        parts = [s[step] for s in shards]
        assert all(p["image"].shape == (BATCH // 2, SIZE, SIZE, 3) for p in parts)
        # Concatenated in process order, the shards are exactly the single-process batch.
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key])
    # The last global batch holds one example: shard 1 owns none of it and yields pure padding.
    assert [int(p["mask"].sum()) for p in (shards[0][-1], shards[1][-1])] == [1, 0]
    resumed = list(split.shard(1, 2).batches(2, skip=1))
    assert len(resumed) == len(full) - 1
    np.testing.assert_array_equal(resumed[0]["image"], shards[1][1]["image"])
    with pytest.raises(ValueError, match="batch size must divide by the process count"):
        split.shard(0, 3)


def test_folder_errors_name_the_problem(folder, tmp_path):
    root, _, _ = folder
    with pytest.raises(ValueError, match="no split 'valid'.*'test', 'train', 'validation'"):
        data.load_split(str(root), "valid", SIZE, BATCH, shuffle=False)
    with pytest.raises(ValueError, match="does not exist"):
        data.load_split(str(tmp_path / "nowhere"), "train", SIZE, BATCH, shuffle=False)
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "train" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of its 1 files"):
        data.load_split(str(tmp_path), "train", SIZE, BATCH, shuffle=False)


def test_the_folder_is_listed_as_tfds_image_folder_lists_it(folder):
    """`image_folder.list_folder` keeps the rule of tfds' ImageFolder (awkward files included)."""
    import tensorflow_datasets as tfds

    root, _, _ = folder
    with splits.tfds_temp_cleanup():
        info = tfds.folder_dataset.ImageFolder(str(root)).info
    for split in ("train", "validation", "test"):
        class_names, paths, labels = data.list_folder(str(root), split)
        assert class_names == info.features["label"].names
        assert len(paths) == len(labels) == info.splits[split].num_examples


def test_tfds_temp_folders_are_removed_and_tempfile_left_alone():
    """Only the empty tmp*tfds folders made inside the block go; the process' temp folder stays."""
    temp = tempfile.gettempdir()
    older = tempfile.mkdtemp("tfds")
    with splits.tfds_temp_cleanup():
        assert tempfile.gettempdir() == temp and tempfile.tempdir == temp
        leaked, filled, other = tempfile.mkdtemp("tfds"), tempfile.mkdtemp("tfds"), tempfile.mkdtemp()
        Path(filled, "metadata.json").write_text("{}")
    assert [os.path.isdir(p) for p in (older, leaked, filled, other)] == [True, False, True, True]
    for path in (older, filled, other):
        shutil.rmtree(path)


def test_tfds_slicing_gives_the_books_balanced_disjoint_splits():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4600):  # about 2300 per class, deterministic
        splits = {name: data.load_split("tfds", name, SIZE, 20, shuffle=name == "train")
                  for name in ("train", "validation", "test")}
    with tfds.testing.mock_data(num_examples=30):
        with pytest.raises(ValueError, match="needs 25 of each"):
            data.load_split("tfds", "test", SIZE, 20, shuffle=False, per_class={"train": 20, "test": 5})
    sizes = {name: s.num_examples for name, s in splits.items()}
    assert sizes == {"train": 2000, "validation": 1000, "test": 1000}
    for s in splits.values():
        assert s.class_names == ("cat", "dog")
        assert np.bincount(s.labels).tolist() == [s.num_examples // 2] * 2
    encoded = [set(s.encoded) for s in splits.values()]
    assert sum(map(len, encoded)) == 4000 and len(set.union(*encoded)) == 4000  # disjoint
    batch = next(splits["test"].batches(0))
    assert batch["image"].shape == (20, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        data.load_split("tfds", "valid", SIZE, 20, shuffle=False)


def test_predict_reads_a_16_bit_png_as_training_does(tmp_path):
    """Pillow's own convert clips 16-bit grayscale to white; both readers must scale it alike."""
    import tensorflow as tf

    from vggjax.utils.images import load_image

    ramp = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # really 16 bits on disk
    trained = np.asarray(data._decode(tf.constant(path.read_bytes())))
    assert trained.shape == (40, 48, 3) and trained.max() > 250 and trained.min() == 0
    np.testing.assert_array_equal(load_image(path), trained)
