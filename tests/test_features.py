"""Feature extraction on a real JPEG folder: equal to a direct forward pass, cached, reused, never half-written."""
import json

import jax
import numpy as np
import pytest

import vggjax
from vggjax.train import data, feature_cache, synthetic
from vggjax.utils.trees import digest
from vggjax.utils import ownership

SIZE, BATCH = 32, 4
MODE = "caffe"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 5 + 5 training images: batches of 4 leave a padded last batch of 2.
    return synthetic.make_image_folder(tmp_path_factory.mktemp("smoke") / "data",
                                   sizes={"train": 5, "test": 2})


@pytest.fixture(scope="module")
def base():
    model = vggjax.VGG11(include_top=False)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32))


def _splits(folder, shuffle=True):
    return {name: data.load_split(str(folder), name, SIZE, BATCH, shuffle=shuffle and name == "train", seed=3)
            for name in ("train", "test")}


def _count_forward_passes(monkeypatch) -> list:
    """Wrap make_extract_step so each call of the step it returns is recorded."""
    calls, real = [], feature_cache.make_extract_step

    def counting(model, mode):
        step = real(model, mode)

        def counted(variables, images):
            calls.append(images.shape)
            return step(variables, images)
        return counted
    monkeypatch.setattr(feature_cache, "make_extract_step", counting)
    return calls


def test_features_equal_a_direct_forward_pass_and_batches_follow_the_split(folder, base, tmp_path):
    model, variables = base
    splits = _splits(folder)
    feats = feature_cache.extract(model, variables, splits, tmp_path, preprocess_mode=MODE)
    train = feats["train"]
    assert not train.reused and train.features.shape == (10, 1, 1, 512) and train.num_examples == 10
    # Stored in file order: equal to the model applied to the unshuffled images.
    images = np.concatenate([b["image"][b["mask"]] for b in data.load_split(
        str(folder), "train", SIZE, BATCH, shuffle=False).batches(0)])
    direct = model.apply(variables, vggjax.preprocess_input(images, MODE))
    np.testing.assert_allclose(train.features, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(train.labels, splits["train"].labels)
    # Batches: the split's own seeded order, full static shapes, padding masked, skip resumes.
    for epoch in (0, 1):
        order = splits["train"].order(epoch)
        batches = list(train.batches(epoch))
        assert len(batches) == train.steps_per_epoch == 3
        assert all(b["features"].shape == (BATCH, 1, 1, 512) for b in batches)
        got = np.concatenate([b["features"][b["mask"]] for b in batches])
        np.testing.assert_array_equal(got, np.asarray(train.features)[order])
        np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                      train.labels[order])
        assert batches[-1]["mask"].tolist() == [True, True, False, False]
        assert not batches[-1]["features"][2:].any()
        np.testing.assert_array_equal(next(train.batches(epoch, skip=2))["features"], batches[2]["features"])
    assert not np.array_equal(splits["train"].order(0), splits["train"].order(1))


def test_second_run_reuses_the_cache_without_a_forward_pass(folder, base, tmp_path, monkeypatch):
    model, variables = base
    calls = _count_forward_passes(monkeypatch)
    first = feature_cache.extract(model, variables, _splits(folder), tmp_path, preprocess_mode=MODE, progress=False)
    assert len(calls) == 3 + 1  # train: 3 batches of 4, test: 1 batch
    mtime = (first["train"].directory / feature_cache.FEATURES).stat().st_mtime_ns
    info = json.loads((first["train"].directory / feature_cache.INFO).read_text())
    assert info["shape"] == [10, 1, 1, 512] and info["inputs"]["preprocessing"] == MODE

    again = feature_cache.extract(model, variables, _splits(folder), tmp_path, preprocess_mode=MODE, progress=False)
    assert len(calls) == 4 and again["train"].reused and again["test"].reused
    assert (again["train"].directory / feature_cache.FEATURES).stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again["train"].features, first["train"].features)

    # Other weights, other preprocessing, other image size: each a new cache entry.
    other = jax.tree.map(lambda x: x * 1.5, variables)
    changed = [feature_cache.extract(model, other, _splits(folder), tmp_path, preprocess_mode=MODE)["test"],
               feature_cache.extract(model, variables, _splits(folder), tmp_path, preprocess_mode="rescale")["test"]]
    assert len(calls) == 4 + 3 + 1 + 3 + 1
    assert len({f.directory for f in changed} | {first["test"].directory}) == 3
    assert not np.allclose(changed[0].features, first["test"].features)

    # New pixels from the pipeline (a bump of splits.PIXELS): the old entry is not reused.
    monkeypatch.setitem(feature_cache.PIXELS, "tfdata", feature_cache.PIXELS["tfdata"] + 1)
    test_only = {"test": _splits(folder)["test"]}
    assert not feature_cache.extract(model, variables, test_only, tmp_path, preprocess_mode=MODE)["test"].reused


def test_a_failed_extraction_leaves_no_cache_and_dead_temporaries_are_removed(folder, base, tmp_path,
                                                                               monkeypatch):
    model, variables = base
    splits = _splits(folder)
    real = feature_cache.make_extract_step

    def failing(model, mode):
        step, calls = real(model, mode), []

        def fails_on_third(variables, images):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt("interrupted mid-split")
            return step(variables, images)
        return fails_on_third
    monkeypatch.setattr(feature_cache, "make_extract_step", failing)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.extract(model, variables, {"train": splits["train"]}, tmp_path, preprocess_mode=MODE)
    assert list(tmp_path.iterdir()) == []

    # What a kill -9 leaves: a temp dir of a process that no longer exists. The next run removes it.
    key, _ = feature_cache.cache_key(model, digest(variables), splits["train"], MODE)
    leftover = tmp_path / f".train-{key}.tmp-999999999-0123abcd"
    leftover.mkdir()
    (leftover / feature_cache.FEATURES).write_bytes(b"half")
    monkeypatch.setattr(feature_cache, "make_extract_step", real)
    done = feature_cache.extract(model, variables, {"train": splits["train"]}, tmp_path, preprocess_mode=MODE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, done["train"].directory.name]


def test_extraction_refuses_a_model_with_its_classifier():
    with pytest.raises(ValueError, match="include_top=False"):
        feature_cache.make_extract_step(vggjax.VGG11(include_top=True), MODE)
