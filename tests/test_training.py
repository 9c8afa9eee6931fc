"""The train/eval steps and the resumable fit loop: masking, checkpoints, best epoch, kill -9 and resume."""
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vggjax
from helpers import logged, recorded_steps, tensorboard_scalars
from vggjax.train import augmentation, freezing, loop, metric_writers, steps
from vggjax.inference.heads import Head
from vggjax.train.splits import ArraySplit, epoch_order


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SlowSplit(ArraySplit):
    """The library's in-memory split, `delay` seconds per batch standing for a slow input
    pipeline (gives the kill test its window)."""

    delay: float = 0.0

    def batches(self, epoch=0, skip=0):
        for batch in super().batches(epoch, skip):
            time.sleep(self.delay)
            yield batch


class TinyNet(nn.Module):
    """Conv + BatchNorm + the book's head at 16x16: every kind of state fit has to carry, in milliseconds."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), strides=2, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
        x = nn.avg_pool(x, (4, 4), (4, 4))
        return Head(units=8, name="head")(x, train=train)


RULES = [(r"bn/.*", "freeze"), (r".*", "train")]  # BN scale/bias frozen, running stats still move


def images(n, seed):
    """{"image": uint8 (n, 16, 16, 3), "label": int32 (n,)}."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int32)
    x = rng.integers(0, 200, (n, 16, 16, 3)).astype(np.uint8)
    x[labels == 1, :, :, 0] = 255  # something learnable: dogs are red
    return {"image": x, "label": labels}


def identity(spec, seed=3):
    """What a checkpoint must match to be resumed: the freezing rules and the seed."""
    return {"freeze_spec": [list(r) for r in freezing.resolve(spec)], "seed": seed}


@functools.lru_cache(maxsize=None)
def _tiny_model():
    """(model, initial variables, optimizer, train step, eval step): compiled once for the file."""
    model = TinyNet()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    tx = freezing.make_optimizer(optax.adam(1e-2), variables["params"], RULES)
    train_step = steps.make_train_step(model, tx, augment=augmentation.FIRST_EDITION, preprocess_mode="caffe")
    return model, variables, tx, train_step, steps.make_eval_step(model, preprocess_mode="caffe")


def tiny_run(delay=0.0):
    """(model, fresh state, train step, eval step, train split, val split) of the tiny run."""
    model, variables, tx, train_step, eval_step = _tiny_model()
    state = steps.TrainState.create(variables, tx, seed=3)  # copies: the cached arrays are never donated
    train = SlowSplit(name="train", arrays=images(24, 1), batch_size=4, shuffle=True, seed=1,
                      delay=delay)  # 6 steps per epoch
    val = SlowSplit(name="validation", arrays=images(10, 2), batch_size=4)  # last batch: 2 real, 2 padded
    return model, state, train_step, eval_step, train, val


def child_fit(workdir, out):
    """Subprocess body of the kill test: a 3-epoch fit, then the final state and history to `out`."""
    _, state, train_step, eval_step, train, val = tiny_run(delay=0.05)
    state, history = loop.fit(state, train_step, eval_step, train, val, epochs=3, workdir=workdir,
                                  phase="tiny", identity=identity(RULES), checkpoint_every=2, progress=False)
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}
    np.savez(out + ".npz", **leaves)
    with open(out + ".json", "w") as f:
        json.dump(history, f)


def test_batch_metrics_ignore_padded_examples():
    mask = np.array([True, True, True, False])
    labels = np.array([1, 0, 1, 0], np.int32)
    binary = jnp.array([[2.0], [-1.0], [-3.0], [1e9]])  # the padded logit would dominate
    m = steps.batch_metrics(binary, labels, mask)
    expected = optax.sigmoid_binary_cross_entropy(binary[:3, 0], labels[:3].astype(np.float32)).mean()
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)
    assert float(m["accuracy"]) == pytest.approx(2 / 3) and int(m["count"]) == 3
    classes = jnp.array([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [np.nan] * 3])
    m = steps.batch_metrics(classes, np.array([1, 0, 0, 2], np.int32), mask)
    assert np.isfinite(float(m["loss"])) and float(m["accuracy"]) == pytest.approx(2 / 3)
    empty = steps.batch_metrics(binary, labels, np.zeros(4, bool))
    assert float(empty["loss"]) == 0 and int(empty["count"]) == 0


def test_an_array_split_pads_the_last_batch_and_orders_by_seed_and_epoch(tmp_path):
    """The library's in-memory split (the feature cache's, this file's): each example once per
    epoch in `epoch_order`, a memmap read like an array, the last batch zero-padded and masked,
    `skip` resuming mid-epoch, a skip past the epoch refused."""
    data = images(10, 3)
    np.save(tmp_path / "x.npy", data["image"])
    split = ArraySplit(name="t", arrays=dict(data, image=np.load(tmp_path / "x.npy", mmap_mode="r")),
                       batch_size=4, shuffle=True, seed=5)
    batches = list(split.batches(1))
    assert len(batches) == split.steps_per_epoch == 3
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    order = epoch_order(10, True, 5, 1)
    assert not np.array_equal(order, epoch_order(10, True, 5, 2))
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]), data["image"][order])
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]), data["label"][order])
    assert not batches[-1]["image"][2:].any() and batches[-1]["label"].dtype == np.int32
    np.testing.assert_array_equal(next(split.batches(1, skip=2))["image"], batches[2]["image"])
    with pytest.raises(ValueError, match=r"skip=4 is outside 0..3 \(the batches per epoch of split 't'\)"):
        next(split.batches(1, skip=4))


def test_evaluate_sees_every_example_once_with_a_padded_last_batch(tmp_path):
    """Real JPEGs through `vggjax.train.data`: 7 images in batches of 4 -> one padded batch."""
    from PIL import Image

    from vggjax.train import data

    rng = np.random.default_rng(0)
    for i in range(7):
        cls = ("cat", "dog")[i % 2]
        (tmp_path / "validation" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            tmp_path / "validation" / cls / f"{i}.jpg")
    split = data.load_split(str(tmp_path), "validation", 16, 4, shuffle=False)
    model, state, _, eval_step, _, _ = tiny_run()
    result = loop.evaluate(state, eval_step, split)
    assert result["count"] == split.num_examples == 7
    every = np.concatenate([b["image"][b["mask"]] for b in split.batches(0)])
    logits = model.apply(state.variables(), vggjax.preprocess_input(every, "caffe"))
    labels = np.asarray(split.labels)
    losses = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(np.float32))
    assert result["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float(np.mean((logits[:, 0] > 0) == (labels == 1))))


def test_fit_records_history_keeps_best_and_returns_a_finished_phase(tmp_path):
    _, state, train_step, eval_step, train, val = tiny_run()
    with logged() as lines:
        state, history = loop.fit(state, train_step, eval_step, train, val, epochs=3, workdir=tmp_path,
                                  phase="head", identity=identity(RULES), checkpoint_every=4, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert history[-1]["loss"] < history[0]["loss"]
    assert int(state.step) == 18 and len(lines) == 3
    best, meta = loop.restore_checkpoint(state, tmp_path, "head")
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert meta["epoch"] == best_epoch and int(best.step) == 6 * best_epoch
    assert meta["phase"] == "head" and meta["freeze_spec"] == [list(r) for r in RULES]
    assert meta["history"] == history[:best_epoch]

    def must_not_train(state, batch):
        raise AssertionError("a finished phase was trained again")

    with logged() as lines:
        again, history_again = loop.fit(tiny_run()[1], must_not_train, eval_step, train, val, epochs=3,
                                        workdir=tmp_path, phase="head", identity=identity(RULES),
                                        progress=False)
    assert history_again == history and "already finished" in lines[-1]
    np.testing.assert_array_equal(again.params["head"]["logits"]["kernel"], state.params["head"]["logits"]["kernel"])
    with pytest.raises(ValueError, match="freeze_spec"):
        loop.fit(tiny_run()[1], must_not_train, eval_step, train, val, epochs=3, workdir=tmp_path,
                     phase="head", identity=identity("all"), progress=False)

    # Unfreezing is a new phase: new optimizer, new state from the trained parameters, new step.
    model = TinyNet()
    tx = freezing.make_optimizer(optax.adam(1e-3), state.params, "all")
    tuned = steps.TrainState.create(state.variables(), tx, seed=4)
    tuned, tuned_history = loop.fit(tuned, steps.make_train_step(model, tx), eval_step, train, val,
                                        epochs=1, workdir=tmp_path, phase="all", identity=identity("all", seed=4),
                                        progress=False)
    assert len(tuned_history) == 1 and (tmp_path / "all").is_dir()
    assert not np.array_equal(tuned.params["bn"]["scale"], state.params["bn"]["scale"])


def test_a_flipped_byte_in_the_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    _, state, train_step, eval_step, train, val = tiny_run()
    args = dict(epochs=3, workdir=tmp_path, phase="tiny", identity=identity(RULES), progress=False)
    final, history = loop.fit(state, train_step, eval_step, train, val, **args)
    latest = tmp_path / "tiny" / "18"
    victim = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with logged() as lines:
        again, history_again = loop.fit(tiny_run()[1], train_step, eval_step, train, val, **args)
    assert re.fullmatch(r"checkpoint 18 in .*tiny is damaged \(its files differ from what was written\); "
                        r"set aside as damaged-18, trying the previous one", lines[0]), lines
    assert "resuming at epoch 3" in lines[1] and (tmp_path / "tiny" / "damaged-18").is_dir()
    assert history_again == history  # epoch 3 trained again from epoch 2's checkpoint: bit-exact
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(final.params)):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_stops_as_keras_does_and_a_resumed_run_stops_at_the_same_epoch(tmp_path):
    _, state, train_step, eval_step, train, val = tiny_run()
    args = dict(epochs=12, identity=identity(RULES), progress=False, monitor="val_accuracy", patience=2)
    writer = metric_writers.TensorBoard(tmp_path / "tensorboard")
    final, history = loop.fit(state, train_step, eval_step, train, val, workdir=tmp_path / "a", phase="tiny",
                              checkpoint_every=None, writer=writer,
                              learning_rate=optax.linear_schedule(1e-2, 0.0, 72), **args)
    writer.close()
    # Keras' EarlyStopping(patience=2): stop after 2 epochs in a row without a higher val_accuracy.
    accuracy, wait, stop = [h["val_accuracy"] for h in history], 0, None
    for i, value in enumerate(accuracy):
        wait = 0 if value > max(accuracy[:i], default=-1) else wait + 1
        if wait >= 2:
            stop = i + 1
            break
    assert stop is not None and stop == len(history) < 12, accuracy

    # Every epoch in TensorBoard's event files (read by its own reader) as in the history.
    runs = tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(runs) == ["train", "validation"] and sorted(runs["validation"]) == ["epoch_accuracy", "epoch_loss"]
    for run, prefix in (("train", ""), ("validation", "val_")):
        for metric in ("loss", "accuracy"):  # float32 in the event files
            assert runs[run][f"epoch_{metric}"] == [(h["epoch"], pytest.approx(h[prefix + metric], rel=1e-6))
                                                    for h in history]
    assert runs["train"]["epoch_learning_rate"] == [(e, pytest.approx(1e-2 * (1 - 6 * e / 72)))
                                                    for e in range(1, stop + 1)]  # after 6 steps an epoch
    assert [e for e, v in runs["train"]["epoch_images_per_second"] if v > 0] == list(range(1, stop + 1))

    # Interrupted in the middle of the epoch that stops, then run again with the same arguments.
    steps, kill_at = [], 6 * (stop - 1) + 3

    def interrupted(state, batch):
        if len(steps) == kill_at:
            raise KeyboardInterrupt
        steps.append(1)
        return train_step(state, batch)

    resume = dict(workdir=tmp_path / "b", phase="tiny", checkpoint_every=kill_at - 1, **args)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(tiny_run()[1], interrupted, eval_step, train, val, **resume)
    with logged() as lines:
        resumed, again = loop.fit(tiny_run()[1], train_step, eval_step, train, val, **resume)
    assert again == history and f"resuming at epoch {stop}, batch 2" in lines[0]
    assert re.fullmatch(rf"phase tiny: stopping early after epoch {stop}: val_accuracy has not improved "
                        r"for 2 epochs \(best: epoch \d+, \d\.\d{4}\)", lines[-1]), lines
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(final)):
        np.testing.assert_array_equal(a, b)
    with logged() as lines:  # a stopped phase is finished, whatever --epochs says
        loop.fit(tiny_run()[1], None, eval_step, train, val, **resume)
    assert "already finished" in lines[-1]


def test_a_nan_training_loss_stops_the_phase_before_it_is_saved(tmp_path):
    model, state, _, eval_step, train, val = tiny_run()
    tx = freezing.make_optimizer(optax.sgd(1e30), state.params, "all")  # diverges at the first step
    state = steps.TrainState.create(state.variables(), tx, seed=3)
    train_step = steps.make_train_step(model, tx, preprocess_mode="caffe")
    with pytest.raises(ValueError, match=r"^phase diverge epoch 1: the training loss is (nan|inf); lower "
                                         r"the learning rate"):
        loop.fit(state, train_step, eval_step, train, val, epochs=2, workdir=tmp_path,
                     phase="diverge", identity=identity("all"), progress=False)
    assert not [p for p in (tmp_path / "diverge").iterdir() if p.name.isdigit()]  # nothing saved


def test_head_on_cached_features_in_bf16():
    features = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 512))
    batch = {"features": features, "label": np.arange(8, dtype=np.int32) % 2, "mask": np.ones(8, bool)}
    head = Head(units=32)
    variables = head.init(jax.random.PRNGKey(1), features)
    tx = freezing.make_optimizer(freezing.book_rmsprop(2e-5), variables["params"], "all")
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        step = steps.make_train_step(head, tx, input_key="features", compute_dtype=dtype)
        new, metrics = step(steps.TrainState.create(variables, tx), batch)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
        losses[dtype] = float(metrics["loss"])
    assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)
    assert losses[jnp.bfloat16] != losses[jnp.float32]  # really computed in bf16
    # The state was copied: donating it did not delete the caller's arrays.
    assert np.isfinite(np.asarray(variables["params"]["hidden"]["kernel"])).all()


def wait_for_checkpoint(directory, newer_than, proc, timeout=120):
    """Poll until a checkpoint newer than `newer_than` is saved and recorded (`recorded_steps`)."""
    end = time.time() + timeout
    while time.time() < end:
        steps = [n for n in recorded_steps(directory) if n > newer_than]
        if steps:
            return max(steps)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_kill_9_and_resume_gives_bit_identical_parameters(tmp_path, subprocess_env):
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess_env["PYTHONPATH"] += os.pathsep + here
    # One compilation for the four runs; what is compiled is the same program either way.
    subprocess_env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          PYTHONUNBUFFERED="1")  # a killed run's log lines are not lost

    def start(workdir, out):
        return subprocess.Popen([sys.executable, __file__, str(workdir), str(out)], env=subprocess_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = start(tmp_path / "ref", tmp_path / "ref_out")
    assert reference.wait(timeout=300) == 0, reference.communicate()[1][-3000:]

    workdir, out = tmp_path / "run", tmp_path / "run_out"
    checkpoints = workdir / "tiny"
    seen, logs = -1, []
    # First kill right as the first checkpoint (step 2) lands, the second a little after a later one.
    for delay in (0.0, 0.12):
        proc = start(workdir, out)
        seen = wait_for_checkpoint(checkpoints, seen, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        logs.append(proc.stdout.read())
        assert not os.path.exists(str(out) + ".npz")
    # The second run resumed in the middle of epoch 1 (from step 2 unless the poll was late).
    assert re.search(r"resuming at epoch 1, batch [1-5] ", logs[1]), logs[1]
    proc = start(workdir, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming at epoch" in stdout

    want, got = np.load(str(tmp_path / "ref_out") + ".npz"), np.load(str(out) + ".npz")
    assert sorted(want) == sorted(got) and any("params" in k for k in want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    ref_history = json.loads((tmp_path / "ref_out.json").read_text())
    assert json.loads((tmp_path / "run_out.json").read_text()) == ref_history
    assert len(ref_history) == 3


if __name__ == "__main__":
    from vggjax.utils import console

    console.show_logs()
    child_fit(sys.argv[1], sys.argv[2])
