"""The workflow's guards, before any work: Config values, data folders, and a workdir's run identity."""
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from vggjax.train import data, run_identity
from vggjax.train.config import Config, PHASES, add_arguments, config_arguments
from vggjax.train.splits import SPLITS
from vggjax.utils import atomic, ownership


def write_folder(root, classes=("cats", "dogs"), per_class=2, splits=SPLITS, size=40):
    """Real JPEGs in the book's layout: root/<split>/<class>/<class>.<i>.jpg."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name}.{i}.jpg")
    return root


@pytest.mark.parametrize("changes, message", [
    (dict(image_size=31), r"image_size \(--image-size\) must be an integer >= 32 .*, found 31"),
    (dict(image_size=0), r"image_size \(--image-size\) must be an integer >= 32 .*, found 0"),
    (dict(batch_size=0), r"batch_size \(--batch-size\) must be an integer >= 1, found 0"),
    (dict(steps_per_epoch=0), r"steps_per_epoch \(--steps-per-epoch\) must be an integer >= 1 or None"),
    (dict(steps_per_epoch=-1), r"steps_per_epoch .* found -1"),
    (dict(epochs=dict.fromkeys(PHASES, -1)), r"^epochs \(--epochs\) must be an integer >= 0 \(0: evaluate only\) "
                                             r"for phase\(s\) features, frozen, finetune, found -1$"),  # said once
    (dict(learning_rates=dict.fromkeys(PHASES, 0.0)), r"learning_rates must be > 0"),
    (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
    (dict(seed=99999999999999999999), r"seed \(--seed\) must be an integer in \[0, 2\*\*32\), found 9999"),
    (dict(batch_size=100000), r"batch_size \(--batch-size\) 100000 at image_size \(--image-size\) 150 needs at "
                              r"least \d+\.\d GiB for its first conv layer alone, more than the \d+\.\d GiB here"),
    (dict(image_size=5000, batch_size=64), r"batch_size \(--batch-size\) 64 at image_size \(--image-size\) 5000"),
    (dict(patience=0), r"patience \(--patience\) must be an integer >= 1 or None, found 0"),
    (dict(evaluate="first"), r"evaluate \(--evaluate\) must be one of \['best', 'last'\], found 'first'"),
], ids=lambda v: str(v)[:30])
def test_config_refuses_values_that_mean_nothing(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(weights="w", workdir="r", **changes)


def test_paths_expand_the_home_directory_as_a_shell_would():
    import os

    config = Config(weights="~/weights", workdir="~/runs/a", data="~/cats")
    assert (config.weights, config.workdir, config.data) == tuple(
        os.path.join(os.path.expanduser("~"), p) for p in ("weights", "runs/a", "cats"))


def test_zero_epochs_is_a_valid_evaluate_only_config():
    config = Config(weights="w", workdir="r", epochs=dict.fromkeys(PHASES, 0))
    assert set(config.epochs.values()) == {0}


def test_a_folder_with_one_class_or_split_specific_classes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train has one class folder \(cats\); a classifier needs at least 2"):
        data.check_image_folder(str(write_folder(tmp_path / "one", classes=("cats",))))
    mixed = write_folder(tmp_path / "mixed", splits=("train", "validation"))
    write_folder(mixed, classes=("Cats", "dogs"), splits=("test",))
    with pytest.raises(ValueError, match=r"different classes: .*train has \['cats', 'dogs'\], .*test has "
                                         r"\['Cats', 'dogs'\]"):
        data.check_image_folder(str(mixed))


def test_empty_splits_and_classes_are_refused(tmp_path):
    root = write_folder(tmp_path / "d")
    for f in (root / "test" / "dogs").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"test: class folder\(s\) \['dogs'\] hold no .jpg/.jpeg/.png image"):
        data.check_image_folder(str(root))
    (root / "test" / "dogs").rmdir()
    (root / "test" / "cats").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"test is empty: expected one folder of images per class"):
        data.check_image_folder(str(root))


def test_ignored_files_are_counted_in_one_warning(tmp_path):
    root = write_folder(tmp_path / "d")
    Image.new("RGB", (40, 40)).save(root / "train" / "cats" / "anim.gif")
    (root / "train" / "dogs" / "more").mkdir()
    (root / "validation" / "notes.txt").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = data.check_image_folder(str(root))
    assert counts["train"] == {"cats": 2, "dogs": 2}
    assert len(caught) == 1 and "ignored 3 file(s) or folder(s)" in str(caught[0].message)
    assert "anim.gif" in str(caught[0].message)


def identity(tmp_path, **changes):
    folder = tmp_path / "data"
    if not folder.exists():
        write_folder(folder)
    config = Config(weights="w", workdir=str(tmp_path), data=str(folder), **changes)
    return run_identity.run_identity(config, {"arch": "vgg11"}, "ab" * 32, "caffe")


def test_a_workdir_resumes_only_its_own_run_and_restart_discards_only_its_outputs(tmp_path):
    workdir = tmp_path / "run"
    first = identity(tmp_path)
    run_identity.claim_workdir(workdir, first)
    (workdir / "checkpoints").mkdir()
    (workdir / "my_notes.txt").write_text("mine")
    run_identity.claim_workdir(workdir, identity(tmp_path))  # the same run: resumes
    for changes, named in [(dict(image_size=64), "--image-size (150 there, 64 now)"),
                           (dict(batch_size=8), "--batch-size (20 there, 8 now)"),
                           (dict(seed=1), "--seed")]:
        with pytest.raises(run_identity.RunMismatchError, match=rf"holds another run: .*{re.escape(named)}"
                                                           r".*use another --workdir, or --restart"):
            run_identity.claim_workdir(workdir, identity(tmp_path, **changes))
    other_weights = dict(first, weights_sha256="cd" * 32)
    with pytest.raises(run_identity.RunMismatchError, match=r"holds another run: the weights \("):
        run_identity.claim_workdir(workdir, other_weights)
    # A run begun before its pipeline's decoder changed (a bump of splits.PIXELS) is not continued.
    with pytest.raises(run_identity.RunMismatchError,
                       match=r"holds another run: how the image pipeline decodes images \(1 there, 2 now\)"):
        run_identity.claim_workdir(workdir, dict(first, pixels=first["pixels"] + 1))
    # Another pipeline: named once, by its flag (its pixel revision follows from it).
    with pytest.raises(run_identity.RunMismatchError,
                       match=r"holds another run: --pipeline \(\"tfdata\" there, \"grain\" now\); use"):
        run_identity.claim_workdir(workdir, dict(first, pipeline="grain", pixels=first["pixels"] + 1))
    (tmp_path / "data" / "test" / "cats" / "cats.0.jpg").write_bytes(b"other image")
    with pytest.raises(run_identity.RunMismatchError, match=r"holds another run: the data's files \("):
        run_identity.claim_workdir(workdir, identity(tmp_path))
    run_identity.claim_workdir(workdir, other_weights, restart=True)
    assert sorted(p.name for p in workdir.iterdir()) == [ownership.OWNED, "my_notes.txt", run_identity.RUN]
    assert json.loads((workdir / run_identity.RUN).read_text()) == other_weights


def test_restart_refuses_before_deleting_anything_when_the_user_s_files_are_among_the_outputs(tmp_path):
    workdir = tmp_path / "run"
    run_identity.claim_workdir(workdir, identity(tmp_path))
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / "mymodel.pt").write_bytes(b"the user's model")
    (workdir / "export").mkdir()
    (workdir / "export" / "report.pdf").write_bytes(b"the user's report")
    (workdir / "config.json").write_text("{}")  # the user's own, under a name vggjax also writes
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    with pytest.raises(atomic.RefusedError, match=r"holds files vggjax did not write .*refusing to delete"):
        run_identity.claim_workdir(workdir, identity(tmp_path, seed=1), restart=True)
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert (workdir / "checkpoints" / "mymodel.pt").read_bytes() == b"the user's model"


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"cannot use --workdir .*file/run: Not a directory"):
        run_identity.claim_workdir(tmp_path / "file" / "run", {"a": 1})


def test_flags_are_the_config_fields_and_zero_stays_zero():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = config_arguments(parser.parse_args(["--epochs", "0", "--image-size", "64"]))
    assert given == {"epochs": dict.fromkeys(PHASES, 0), "image_size": 64}
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    assert "--batch-size" in parser.format_help() and f"(default: {defaults['batch_size']})" in parser.format_help()
