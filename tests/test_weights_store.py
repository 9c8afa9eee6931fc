"""vggjax checkpoints: save/load round trip, BatchNorm variables, atomic writes, clear load errors."""
import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from vggjax.weights import store
from vggjax.utils import ownership
from vggjax.utils.trees import digest, flatten

META = dict(arch="vgg11_bn", include_top=False, top_input="torch", preprocessing="torch")


def test_core_install_converts_loads_and_runs_without_tensorflow_or_torch(subprocess_env, tmp_path):
    """The core install: with TensorFlow, torch, Keras, tfds, matplotlib and Pillow impossible to
    import, vggjax saves, loads and runs weights, and a module needing an extra names it."""
    code = f"""
import importlib.machinery as m, sys
BLOCKED = ("tensorflow", "torch", "keras", "tensorflow_datasets", "matplotlib", "PIL")
class NotInstalled(m.PathFinder):  # sys.path as if those packages were not there
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in BLOCKED else m.PathFinder.find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(m.PathFinder)] = NotInstalled
import numpy as np, vggjax, vggjax.weights.keras, vggjax.weights.download, vggjax.inference.classifier
model = vggjax.create("vgg11", include_top=False)
variables = model.init(__import__("jax").random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
vggjax.weights.save({str(tmp_path / "w")!r}, variables, dict(arch="vgg11", include_top=False,
                    top_input="torch", preprocessing="torch"))
pt = vggjax.load({str(tmp_path / "w")!r})
print(pt.model.apply(pt.variables, pt.preprocess(np.zeros((1, 32, 32, 3), np.uint8))).shape)
try:
    import vggjax.train.data
except ImportError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shape, message = out.stdout.strip().splitlines()
    assert shape == "(1, 1, 1, 512)"
    assert "needs tensorflow" in message and "pip install 'vggjax[train]'" in message


@pytest.fixture(scope="module")
def bn_variables(make_variables):
    """A vgg11_bn conv base as training hands it over: JAX arrays in Flax's tree, with
    BatchNorm statistics far from their 0/1 init so that swapping or dropping them would show.
    (Random rather than model.init: same tree, without seconds of CPU random numbers.)"""
    variables = jax.tree.map(jnp.asarray, make_variables("vgg11_bn", include_top=False, seed=0))
    shapes = jax.eval_shape(vggjax.create("vgg11_bn", include_top=False).init,
                            jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    return variables


@pytest.fixture(scope="module")
def saved_bn(bn_variables, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "vgg11_bn_finetuned"
    store.save(directory, bn_variables, {**META, "epochs": 3})
    return directory


def test_round_trip_keeps_every_array_and_the_metadata(bn_variables, saved_bn):
    pt = vggjax.load(saved_bn)
    want, have = flatten(bn_variables), flatten(pt.variables)
    assert sorted(want) == sorted(have)
    for path in want:
        np.testing.assert_array_equal(have[path], want[path], err_msg=path)
    assert pt.batch_stats is not None
    assert pt.meta == {**META, "epochs": 3, "classifier_activation": None, "num_classes": 1000,
                       "vggjax_version": vggjax.__version__,
                       "variables_sha256": digest(jax.tree.map(np.asarray, bn_variables))}
    assert json.loads((saved_bn / "vggjax.json").read_text()) == pt.meta


def test_loaded_bn_model_computes_what_the_saved_one_did(bn_variables, saved_bn):
    pt = vggjax.load(saved_bn)
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pt.preprocess(images), vggjax.preprocess_input(images, "torch"))
    x = pt.preprocess(images)
    want = vggjax.create("vgg11_bn", include_top=False).apply(bn_variables, x)
    np.testing.assert_array_equal(pt.model.apply(pt.variables, x), want)
    assert pt.model.batch_norm and not pt.model.include_top and pt.model.top_input == "torch"


def test_plain_vgg_has_no_batch_stats(make_variables, tmp_path):
    variables = make_variables("vgg11", include_top=False)
    store.save(tmp_path / "ckpt", variables, {**META, "arch": "vgg11"})
    pt = vggjax.load(tmp_path / "ckpt")
    assert pt.batch_stats is None and list(pt.variables) == ["params"]


def test_save_refuses_to_overwrite_unless_asked(bn_variables, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"ckpt already exists.*overwrite=True"):
        store.save(directory, bn_variables, META)
    # overwrite replaces only what vggjax wrote: a folder of the user's files stays.
    with pytest.raises(FileExistsError, match=r"ckpt holds files vggjax did not write \(ckpt/notes.txt\)"):
        store.save(directory, bn_variables, META, overwrite=True)
    assert [p.name for p in directory.iterdir()] == ["notes.txt"]
    (directory / "notes.txt").unlink()
    store.save(directory, bn_variables, {**META, "run": 1})
    store.save(directory, bn_variables, {**META, "run": 2}, overwrite=True)
    assert vggjax.load(directory).meta["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "ckpt"]  # no temp or old dir left


@pytest.mark.parametrize("edit, pattern", [
    (lambda v, m: ({"params": {k: x for k, x in v["params"].items() if k != "block3_conv2"},
                    "batch_stats": v["batch_stats"]}, m),
     r"variables for .*missing \['params/block3_conv2/bias', 'params/block3_conv2/kernel'\]"),
    (lambda v, m: ({"params": v["params"]}, m), r"missing \['batch_stats/block1_conv1_bn/mean'"),
    (lambda v, m: (v, {**m, "preprocessing": "tf"}), r"preprocessing must be one of"),
    (lambda v, m: (v, {k: x for k, x in m.items() if k != "top_input"}), r"lacks \['top_input'\]"),
    (lambda v, m: (v, {**m, "arch": "vgg11"}), r"does not hold vgg11 weights"),
])
def test_save_rejects_bad_input_and_writes_nothing(bn_variables, tmp_path, edit, pattern):
    variables, meta = edit(bn_variables, META)
    with pytest.raises(ValueError, match=pattern):
        store.save(tmp_path / "ckpt", variables, meta)
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_midway_leaves_the_old_dir_and_no_temp(bn_variables, saved_bn,
                                                                  tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    shutil.copytree(saved_bn, directory)
    ownership.record(directory)  # as if written here (a copy is not vggjax's by itself)

    def corrupted_copy(tmp, variables, meta):
        raise RuntimeError(f"checkpoint in {tmp} reloaded differently")  # as a bad disk would

    monkeypatch.setattr(store, "_verify_copy", corrupted_copy)
    with pytest.raises(RuntimeError, match="reloaded differently"):
        store.save(directory, bn_variables, {**META, "run": 2}, overwrite=True)
    with pytest.raises(RuntimeError):
        store.save(tmp_path / "new", bn_variables, META)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "ckpt"]
    assert vggjax.load(directory).meta["epochs"] == 3  # the previous checkpoint, intact


def test_a_vggjax_json_with_the_old_head_key_still_loads(bn_variables, tmp_path):
    """`head` (keras/torch) was renamed `top_input` (the book's new classifier is the head); a
    directory written before the rename loads as the same model."""
    store.save(tmp_path / "w", bn_variables, META)
    meta = json.loads((tmp_path / "w" / "vggjax.json").read_text())
    meta["head"] = meta.pop("top_input")
    (tmp_path / "w" / "vggjax.json").write_text(json.dumps(meta))
    old = vggjax.load(tmp_path / "w")
    assert old.meta["top_input"] == META["top_input"] and "head" not in old.meta
    assert old.model.top_input == META["top_input"]


def _write_json(text):
    return lambda d: (d / "vggjax.json").write_text(text)


def _edit_meta(**changes):
    def edit(d):
        meta = json.loads((d / "vggjax.json").read_text())
        (d / "vggjax.json").write_text(json.dumps({**meta, **changes}))
    return edit


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "vggjax.json").unlink(), r"is not a vggjax checkpoint: vggjax.json is missing"),
    (_write_json("{not json"), r"vggjax.json is corrupt"),
    (_write_json("[1, 2]"), r"vggjax.json must be a JSON object"),
    (_write_json('{"arch": "vgg11_bn"}'), r"vggjax.json lacks \['include_top', 'top_input', 'preprocessing'\]"),
    (_edit_meta(top_input="tf", include_top="yes"), r"include_top must be true or false.*top_input must be one of"),
    (_edit_meta(arch="vgg13_bn"), r"does not hold vgg13_bn weights without top: missing \["),
    (_edit_meta(include_top=True), r"does not hold vgg11_bn weights with top: missing \['params/fc1/bias'"),
    (lambda d: shutil.rmtree(d / "checkpoint"), r"checkpoint/ is missing"),
    (lambda d: (d / "checkpoint" / "manifest.ocdbt").write_bytes(b"garbage"),
     r"checkpoint is damaged and could not be restored: .*manifest"),
    (_edit_meta(arch=["vgg11_bn"]), r"arch \['vgg11_bn'\] is not one of"),
])
def test_load_of_a_damaged_dir_names_it(saved_bn, tmp_path, damage, pattern):
    directory = tmp_path / "damaged"
    shutil.copytree(saved_bn, directory)
    damage(directory)
    with pytest.raises(ValueError, match=pattern) as err:
        vggjax.load(directory)
    assert str(directory) in str(err.value)


def test_flipped_bytes_in_a_checkpoint_are_detected_on_load(saved_bn, tmp_path):
    directory = tmp_path / "flipped"
    shutil.copytree(saved_bn, directory)
    largest = max((p for p in (directory / "checkpoint").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x01 for b in data[middle:middle + 64])  # finite, just wrong
    largest.write_bytes(bytes(data))
    # Whatever the bytes decode to (wrong finite values, NaN, an unreadable chunk), load refuses.
    with pytest.raises(ValueError, match=r"flipped.* (is corrupt: its arrays do not match the "
                                         r"variables_sha256|is damaged|does not hold .*NaN)"):
        vggjax.load(directory)


@pytest.mark.parametrize("value, message", [
    (np.nan, r"params/block2_conv1/kernel: contains NaN or Inf"),
    (0.125, r"is corrupt: its arrays do not match the variables_sha256 recorded in vggjax.json"),
], ids=["nan", "one-changed-value"])
def test_changed_arrays_are_refused_on_load(saved_bn, bn_variables, tmp_path, value, message):
    from vggjax.utils.orbax_tree import save_tree

    directory = tmp_path / "changed"
    shutil.copytree(saved_bn, directory)
    shutil.rmtree(directory / "checkpoint")
    bad = jax.tree.map(np.array, bn_variables)
    bad["params"]["block2_conv1"]["kernel"][0, 0, 0, 0] = value
    save_tree(directory / "checkpoint", bad)
    with pytest.raises(ValueError, match=message):
        vggjax.load(directory)
    if value == 0.125:
        assert vggjax.load(directory, verify=False).params["block2_conv1"]["kernel"][0, 0, 0, 0] == value


def test_load_of_a_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such checkpoint directory"):
        vggjax.load(tmp_path / "nowhere")


def test_paths_starting_with_a_tilde_are_the_home_directory(saved_bn, monkeypatch):
    monkeypatch.setenv("HOME", str(saved_bn.parent))  # the README's vggjax.load("~/...")
    assert vggjax.load(f"~/{saved_bn.name}").meta == vggjax.load(saved_bn).meta
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(saved_bn.parent))}/nowhere: no such"):
        vggjax.load("~/nowhere")
