"""vggjax.nnx: the NNX face computes what the Linen one does, loads every weights layout, freezes
by the workflow's specs and round-trips through Orbax and Linen."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import vggjax
import vggjax.nnx as vnnx
from helpers import REPO, TOL, assert_parity, normal_images, random_variables, script_env, tensorboard_scalars
from vggjax.testing.reference import random_vgg
from vggjax.inference import heads
from vggjax.train import freezing, report, steps
from vggjax.utils.trees import flatten

TAPS = ("block1_conv1_preact", "block2_pool", "block3_conv1", "block4_conv2", "block5_pool")


def assert_close(what, ours, theirs, rel=1e-6):
    for path, a in flatten(ours if isinstance(ours, dict) else {"out": ours}).items():
        b = flatten(theirs if isinstance(theirs, dict) else {"out": theirs})[path]
        scale = float(np.max(np.abs(b))) or 1.0
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= rel * scale, f"{what}: {path}"


@pytest.mark.parametrize("arch", sorted(vggjax.ARCHS))
def test_every_arch_computes_what_linen_does(arch):
    linen = vggjax.create(arch, include_top=False)
    v = random_variables(arch, include_top=False, seed=1)
    model = vnnx.from_linen(linen, v)
    assert isinstance(model.block5_conv1.kernel, nnx.Param)  # Keras names as attributes
    x = normal_images(2, 32, seed=2)
    assert_close(f"{arch} features", model(x), linen.apply(v, x))
    assert_close(f"{arch} taps", model(x, outputs=TAPS), linen.apply(v, x, outputs=TAPS))
    if linen.batch_norm:  # train mode: batch statistics used and running ones updated alike
        want, updates = linen.apply(v, x, train=True, mutable=["batch_stats"])
        model.train()
        assert_close(f"{arch} train mode", model(x), want)
        assert_close(f"{arch} updated statistics", vnnx.variables(model)["batch_stats"], updates["batch_stats"])
        assert isinstance(model.block1_conv1_bn.mean, nnx.BatchStat)


# winograd-avg compiles XLA-side Winograd for every layer (~30 s): slow; the others stay default.
@pytest.mark.parametrize("options", [pytest.param(dict(conv_impl="winograd", pooling="avg"),
                                                  marks=pytest.mark.slow),
                                     dict(conv_impl="auto", pooling="max"),
                                     dict(dtype=jax.numpy.bfloat16)], ids=["winograd-avg", "auto-max", "bf16"])
def test_the_linen_keyword_arguments_compute_what_linen_does(options):
    """`vnnx.create` takes the Linen arguments and computes what the Linen VGG built with them does;
    vggjax.summary prints the same Keras table for both faces."""
    linen = vggjax.create("vgg11", include_top=False, **options)
    v = random_variables("vgg11", include_top=False, seed=11)
    model = vnnx.create("vgg11", include_top=False, rngs=nnx.Rngs(0), **options)
    vnnx.set_variables(model, v)
    x = normal_images(2, 32, seed=12)
    got, want = model(x), linen.apply(v, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(f"vgg11 {options}", got.astype(np.float32), want.astype(np.float32))
    table = vggjax.summary(model, (32, 32, 3), print_fn=None)
    assert table == vggjax.summary(linen, (32, 32, 3), print_fn=None) and "block5_conv2 (Conv2D)" in table


@pytest.mark.parametrize("top_input,size", [("keras", 224), ("torch", 64)])
def test_top_of_both_styles_computes_what_linen_does(top_input, size):
    linen = vggjax.create("vgg11", top_input=top_input, classifier_activation=None)
    v = random_variables("vgg11", include_top=True, seed=3)
    model = vnnx.from_linen(linen, v)
    x = normal_images(2, size, seed=4)
    assert_close(f"vgg11 {top_input} logits", model(x), linen.apply(v, x))
    assert_close("fc2 tap", model(x, outputs=("fc2",)), linen.apply(v, x, outputs=("fc2",)))


def test_linen_to_nnx_to_linen_is_exact_and_orbax_round_trips(tmp_path):
    v = random_variables("vgg11_bn", include_top=False, seed=5)
    model = vnnx.from_linen(vggjax.create("vgg11_bn", include_top=False), v)
    jax.tree.map(np.testing.assert_array_equal, vnnx.variables(model), v)
    vnnx.save(tmp_path / "ckpt", model)
    blank = nnx.eval_shape(lambda: vnnx.VGG11_BN(include_top=False, rngs=nnx.Rngs(0)))
    restored = vnnx.restore(tmp_path / "ckpt", blank)
    jax.tree.map(np.testing.assert_array_equal, vnnx.variables(restored), v)
    with pytest.raises(ValueError, match="missing.*block1_conv1_bn"):
        vnnx.set_variables(blank, random_variables("vgg11", include_top=False))
    with pytest.raises(FileExistsError):  # vggjax never writes over a checkpoint without being asked
        vnnx.save(tmp_path / "ckpt", model)
    assert "block5_conv2" in repr(model)  # nnx.display / repr name the layers as Keras does


@pytest.mark.slow  # two VGG16s with top (~30 s); NNX's loading of converted weights is default above
def test_load_reproduces_torchvision_and_timm_files(torch_vgg16_files, tmp_path):
    ref = random_vgg("vgg16", seed=0)  # the weights of the files, written once per run
    x = normal_images(2, 64, seed=7)  # the torch top pools any size to 7x7
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    # The .pth's convert_file(include_top=True) output is the fixture's; the timm file's, here.
    vggjax.convert_file("timm", "vgg16", torch_vgg16_files / "model.safetensors", tmp_path / "timm",
                        include_top=True)
    for source, converted in (("torchvision", torch_vgg16_files / "converted"), ("timm", tmp_path / "timm")):
        model = vnnx.load(converted)
        assert model.preprocessing == "torch"
        assert_parity(f"vggjax.nnx.load of a {source} file, logits", model(x), want, TOL)


def test_load_reproduces_keras_legacy_and_keras3_files(keras, tmp_path):
    from vggjax.weights.keras import write_legacy_h5
    params = random_variables("vgg16", include_top=False, seed=8, input_rms=70.0)["params"]
    net = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    for layer in net.layers:
        if layer.weights:
            layer.set_weights([params[layer.name]["kernel"], params[layer.name]["bias"]])
    net.save_weights(tmp_path / "vgg16_notop.weights.h5")
    write_legacy_h5(params, tmp_path / "vgg16_notop.h5", names="keras2")
    images = np.random.default_rng(9).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want = np.asarray(net(keras.applications.vgg16.preprocess_input(images.copy()), training=False))
    for name in ("vgg16_notop.h5", "vgg16_notop.weights.h5"):
        vggjax.convert_file("keras", "vgg16", tmp_path / name, tmp_path / name.replace(".", "_"),
                            include_top=False)
        model = vnnx.load(tmp_path / name.replace(".", "_"))
        assert_parity(f"vggjax.nnx.load of {name}, features", model(model.preprocess(images)), want,
                      TOL, top1=False)


def _classifier_pair():
    """(NNX classifier, its Linen twin and variables): VGG11 base at 32x32, head without
    dropout so that a train step is deterministic."""
    base_v = random_variables("vgg11", include_top=False, seed=10)
    linen = heads.Classifier(base=vggjax.create("vgg11", include_top=False),
                                        head=heads.Head(units=16, dropout_rate=0.0))
    _, v = heads.init_classifier(base_v, linen.base, linen.head, 32, jax.random.PRNGKey(0))
    return vnnx.from_linen(linen, v), linen, v


def test_trainable_block5_and_head_trains_exactly_those_as_the_workflow_does():
    model, linen, v = _classifier_pair()
    rng = np.random.default_rng(11)
    batch = {"image": rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32),
             "label": np.array([0, 1, 1, 0], np.int32), "mask": np.array([1, 1, 1, 0], bool)}
    wrt = vnnx.trainable("block5", "head")
    assert vnnx.trainable_report(model, wrt) == freezing.trainable_report(
        v["params"], freezing.labels(v["params"], "block5+head"))
    optimizer = nnx.Optimizer(model, freezing.book_rmsprop(1e-3), wrt=wrt)
    n_opt_leaves = len(jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
    trained = [p for p in flatten(v["params"]) if "block5_" in p or p.startswith("head/")]
    assert n_opt_leaves == len(trained) + 1  # RMSprop's nu per trained parameter + the step count
    step = vnnx.make_train_step(preprocess_mode="caffe")
    model.train()
    for k in range(3):
        step(model, optimizer, batch, jax.random.PRNGKey(k))

    tx = freezing.make_optimizer(freezing.book_rmsprop(1e-3), v["params"], "block5+head")
    state = steps.TrainState.create(v, tx)
    linen_step = steps.make_train_step(linen, tx, preprocess_mode="caffe")
    for _ in range(3):
        state, _ = linen_step(state, batch)
    ours, before, theirs = flatten(vnnx.variables(model)["params"]), flatten(v["params"]), flatten(state.params)
    for path in before:
        if "block5_" in path or path.startswith("head/"):
            assert not np.array_equal(ours[path], before[path]), f"{path} did not train"
            np.testing.assert_allclose(ours[path], theirs[path], rtol=1e-5, atol=1e-5, err_msg=path)
        else:
            np.testing.assert_array_equal(ours[path], before[path], err_msg=f"{path} is frozen")


def test_trainable_takes_workflow_specs_and_refuses_unknown_groups():
    model, _, v = _classifier_pair()
    params = flatten(v["params"])
    for spec in ("block4+block5+head", [(r"base/block[12]_.*", "train"), (r".*", "freeze")]):
        wrt = vnnx.trainable(spec)
        chosen = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, wrt))}
        labels = flatten(freezing.labels(v["params"], spec))
        assert chosen == {p for p in params if labels[p] == freezing.TRAIN}
    with pytest.raises(ValueError, match="unknown group.*'block6'"):
        vnnx.trainable("block6")
    with pytest.raises(ValueError, match="no freeze rule matches"):
        nnx.state(model, vnnx.trainable([(r"head/.*", "train")]))


def test_a_trainable_spec_that_selects_nothing_is_refused_naming_what_exists():
    v = random_variables("vgg11", include_top=False, seed=12)
    model = vnnx.from_linen(vggjax.create("vgg11", include_top=False), v)  # no head, no fc layers
    groups = "block1, block2, block3, block4, block5"
    for spec, what in (("head", "trainable('head')"),  # the preset "head"
                       ("fc1", "trainable('fc1'): group(s) ['fc1']"),
                       ("predictions", "trainable('predictions'): group(s) ['predictions']")):
        want = f"{what} matches no parameter of this model, whose parameters are in {groups}; choose from those"
        with pytest.raises(ValueError) as err:
            vnnx.trainable(spec, model=model)
        assert str(err.value) == want
        with pytest.raises(ValueError) as err:  # the report the example prints before the optimizer
            vnnx.trainable_report(model, vnnx.trainable(spec))
        assert str(err.value) == want
    with pytest.raises(ValueError, match=rf"^freeze spec 'head' matches no parameter of this model, "
                                         rf"whose parameters are in {groups}; choose from those$"):
        freezing.labels(v["params"], "head")  # the Linen workflow's specs: the same check
    assert "block5" in vnnx.trainable_report(model, vnnx.trainable("block5", model=model))


def test_losses_and_grad_cam_take_an_nnx_vgg_through_to_linen():
    from vggjax.losses.perceptual import feature_loss
    from vggjax.viz.convnet import grad_cam
    v = random_variables("vgg11", include_top=False, seed=12)
    linen = vggjax.create("vgg11", include_top=False)
    model = vnnx.from_linen(linen, v)
    x, y = normal_images(1, 32, seed=13), normal_images(1, 32, seed=14)
    layers = ("block3_conv2",)
    np.testing.assert_array_equal(feature_loss(*vnnx.to_linen(model), x, y, layers=layers),
                                  feature_loss(linen, v, x, y, layers=layers))
    clf, linen_clf, clf_v = _classifier_pair()
    cam = grad_cam(*vnnx.to_linen(clf), x, layer="block4_conv2")
    np.testing.assert_array_equal(cam, grad_cam(linen_clf, clf_v, x, layer="block4_conv2"))
    assert cam.shape == (1, 4, 4) and float(cam.max()) > 0


def test_data_parallel_nnx_step_on_two_devices(subprocess_env):
    code = """
import jax, numpy as np
from flax import nnx
import vggjax, vggjax.nnx as vnnx
from vggjax.train import freezing, parallel
from helpers import random_variables
mesh = parallel.make_mesh()
model = vnnx.book_classifier(vnnx.from_linen(vggjax.create("vgg11", include_top=False),
                             random_variables("vgg11", include_top=False)), 32)
nnx.update(model, parallel.replicate(nnx.state(model), mesh))
opt = nnx.Optimizer(model, freezing.book_rmsprop(1e-4), wrt=vnnx.trainable("head"))
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32),
         "label": np.array([0, 1, 0, 1], np.int32), "mask": np.ones(4, bool)}
model.train()
m = vnnx.make_train_step(preprocess_mode="caffe")(model, opt, parallel.shard_batch(batch, mesh), jax.random.PRNGKey(0))
assert int(m["count"]) == 4 and np.isfinite(float(m["loss"]))
assert len(model.head.logits.kernel[...].sharding.device_set) == 2
print("OK", jax.device_count())
"""
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{REPO}/tests:{REPO}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK 2" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow  # the whole example (~50 s); its flags' refusals and fit's steps are default tests
def test_finetune_nnx_smoke_trains_both_phases_and_saves_checkpoints(tmp_path):
    env = script_env(tmp_path)
    # One epoch per phase (the smoke job's 2 + 2 add no code path): both phases train and save.
    args = ["--smoke", "--workdir", str(tmp_path / "run"), "--pipeline", "grain", "--epochs", "1", "1"]
    proc = subprocess.run([sys.executable, f"{REPO}/examples/finetune_nnx.py", *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frozen: trainable params 131,585 of 14,846,273" in proc.stdout
    assert "finetune: test accuracy" in proc.stdout
    # The Linen workflow's outputs: history.json, curves.png, TensorBoard files equal to the history.
    history = json.loads((tmp_path / "run" / report.HISTORY).read_text())
    assert [[h["epoch"] for h in history[p]] for p in ("frozen", "finetune")] == [[1], [1]]
    for phase in history:
        runs = tensorboard_scalars(tmp_path / "run" / "tensorboard" / phase)
        assert runs["validation"]["epoch_accuracy"] == [(1, pytest.approx(history[phase][0]["val_accuracy"]))]
    assert (tmp_path / "run" / report.CURVES).read_bytes()[:4] == b"\x89PNG"
    assert "finetune 1/1: 100%" in proc.stderr  # the progress bars' last lines (stderr is a pipe)
    blank = nnx.eval_shape(lambda: vnnx.book_classifier(
        nnx.eval_shape(lambda: vnnx.VGG16(include_top=False, rngs=nnx.Rngs(0))), 48))
    restored = vnnx.restore(tmp_path / "run" / "finetune", blank)
    assert restored.base.block5_conv3.kernel[...].shape == (3, 3, 512, 512)
    bad = subprocess.run([sys.executable, f"{REPO}/examples/finetune_nnx.py", "--batch-size", "0", "--smoke"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "--batch-size: must be an integer >= 1, found '0'" in bad.stderr


def test_finetune_nnx_refuses_a_workdir_another_run_holds(tmp_path):
    from vggjax.utils import locks

    workdir = tmp_path / "run"
    workdir.mkdir()
    with locks.locked(workdir, "held by this test"):  # this process plays the first run
        proc = subprocess.run([sys.executable, f"{REPO}/examples/finetune_nnx.py", "--data", tmp_path / "d",
                               "--weights", tmp_path / "w", "--workdir", workdir], env=script_env(tmp_path),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: --workdir {workdir} is in use by another vggjax run (pid {os.getpid()}); wait for it "
        "to finish or choose another one\n")
    assert [p.name for p in workdir.iterdir()] == [locks.LOCK]


def test_finetune_nnx_refuses_a_size_that_cannot_fit_before_any_work(tmp_path):
    """The Linen example's checks (vggjax.train.config.Config), not a 3.2-billion-parameter head
    built for 70 s before an out-of-memory error."""
    proc = subprocess.run([sys.executable, f"{REPO}/examples/finetune_nnx.py", "--data", tmp_path / "d",
                           "--weights", tmp_path / "w", "--workdir", tmp_path / "run", "--image-size", "5000"],
                          env=script_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith(
        "error: batch_size (--batch-size) 20 at image_size (--image-size) 5000 needs at least ")
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("; lower either\n")
    assert not (tmp_path / "run").exists()
