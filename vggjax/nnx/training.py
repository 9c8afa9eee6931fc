"""Training an NNX VGG or Classifier: the workflow's freeze specs as an `nnx.Optimizer` filter,
its trainable report, and jitted train / eval steps with the workflow's loss, inputs and metrics."""
from __future__ import annotations

import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vggjax.train import freezing
from vggjax.train import loop, steps
from vggjax.train.steps import batch_metrics, model_inputs
from vggjax.train.metric_writers import MetricWriter

GROUPS = ("block1", "block2", "block3", "block4", "block5", "fc1", "fc2", "predictions", "head")


def trainable(*spec, model: nnx.Module | None = None) -> Callable:
    """`wrt=` filter of the parameters to train: group names ("block5", "head", "fc2", ...; a
    parameter's group as the trainable report names it) or one freeze spec of the workflow (a
    preset such as "block5+head", or (regex, "train"|"freeze") rules over '/'-joined paths).

        nnx.Optimizer(model, optax.rmsprop(1e-5), wrt=trainable("block5", "head"))

    Everything else is frozen: nnx.Optimizer keeps no state for it and never changes it. With
    `model` (and in `trainable_report`), a spec that trains none of its parameters, or names a
    group it lacks (e.g. "head" on a VGG without one), is refused: ValueError listing its groups.
    """
    if len(spec) == 1 and not isinstance(spec[0], str) or spec and spec[0] in freezing.PRESETS:
        if len(spec) != 1:
            raise ValueError(f"pass one freeze preset or rule list, found {spec!r}")
        action_of = freezing.matcher(spec[0])

        def trains(path: str) -> bool:
            if (action := action_of(path)) is None:
                raise ValueError(f"no freeze rule matches parameter {path}; add a rule for it "
                                 "(e.g. a final ('.*', 'freeze'))")
            return action == freezing.TRAIN
    else:
        if unknown := [g for g in spec if g not in GROUPS]:
            raise ValueError(f"unknown group(s) {unknown}: expected names from {list(GROUPS)} or "
                             f"one preset of {sorted(freezing.PRESETS)}")
        groups = set(spec)

        def trains(path: str) -> bool:
            return freezing.group_name(path) in groups

    def wrt(path, value) -> bool:
        return isinstance(value, nnx.Param) and trains("/".join(map(str, path)))

    wrt.spec = spec
    if model is not None:
        trainable_report(model, wrt)
    return wrt


def trainable_report(model: nnx.Module, wrt) -> str:
    """The workflow's log line: trainable / total parameters overall and per block and head;
    ValueError when `wrt` (from `trainable`) trains nothing of `model` (see there)."""
    from vggjax.nnx.model import variables
    from vggjax.utils.trees import flatten, unflatten
    params = variables(model)["params"]
    train = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, wrt))}
    labels = {path: freezing.TRAIN if path in train else freezing.FREEZE for path in flatten(params)}
    if (spec := getattr(wrt, "spec", None)) is not None:  # made by `trainable`
        named = spec if all(isinstance(g, str) for g in spec) and spec[0] not in freezing.PRESETS else ()
        freezing.check_selects(f"trainable{spec!r}".replace(",)", ")"), labels, train, named)
    return freezing.trainable_report(params, unflatten(labels))


def make_train_step(*, augment=None, preprocess_mode: str | None = None) -> Callable:
    """`train_step(model, optimizer, batch, key) -> metrics`, jitted with nnx.jit; updates the
    model and optimizer in place. The model must be in train mode (`model.train()`).

    batch: {"image": (B, H, W, 3) uint8 or 0..255 floats, "label": int32 (B,), "mask": bool
    (B,)}; `key` draws the augmentation (`augment`, a vggjax.train.augmentation config), the
    images then go through `preprocess_input(preprocess_mode)`; the loss and metrics are the
    workflow's (`batch_metrics`: masked means, "count" of real examples).
    """
    @nnx.jit
    def train_step(model, optimizer, batch, key):
        x = model_inputs(batch["image"], key, augment, preprocess_mode, None)

        def loss_fn(model):
            metrics = batch_metrics(model(x), batch["label"], batch["mask"])
            return metrics["loss"], metrics

        grads, metrics = nnx.grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)(model)
        optimizer.update(model, grads)
        return metrics

    return train_step


def make_eval_step(*, preprocess_mode: str | None = None) -> Callable:
    """`eval_step(model, batch) -> metrics` (call `model.eval()` first); batch and metrics as
    in `make_train_step`."""
    @nnx.jit
    def eval_step(model, batch):
        x = model_inputs(batch["image"], None, None, preprocess_mode, None)
        return batch_metrics(model(x), batch["label"], batch["mask"])

    return eval_step


def evaluate(model: nnx.Module, eval_step: Callable, split, *, progress: bool = False,
             desc: str = "evaluating") -> dict:
    """{"loss", "accuracy", "count"} over every example of `split` once, in eval mode (the
    workflow's `loop.evaluate`, with the NNX model where the train state goes)."""
    model.eval()
    return loop.evaluate(model, eval_step, split, progress=progress, desc=desc)


def fit(model: nnx.Module, optimizer: nnx.Optimizer, train_step: Callable, eval_step: Callable,
        train_split, val_split, *, epochs: int, key: jax.Array, where: str = "training",
        progress: bool = True, writer: MetricWriter | None = None,
        learning_rate: float | Callable[[int], float] | None = None) -> list[dict]:
    """`epochs` passes over `train_split` (step k draws its augmentation from fold_in(key, k)),
    each followed by `evaluate` on `val_split`; returns one {"epoch", "loss", "accuracy",
    "val_loss", "val_accuracy"} per epoch. A NaN training loss stops it with ValueError.
    As the Linen loop (`loop.fit`): progress bars (`progress`), a log line per epoch, and
    each epoch to `writer` with `learning_rate` and images/s (`loop.write_epoch`)."""
    history, step = [], 0
    for epoch in range(epochs):
        what, images, start = f"{where} epoch {epoch + 1}", 0, time.perf_counter()
        model.train()
        totals = steps.metric_totals()
        with loop.epoch_bar(train_split, train_split.steps_per_epoch, f"{where} {epoch + 1}/{epochs}",
                            progress) as bar:
            for batch in train_split.batches(epoch):
                totals = steps.accumulate(totals, train_step(model, optimizer, batch, jax.random.fold_in(key, step)))
                step, images = step + 1, images + len(batch["label"])
                loop.advance_epoch(bar, batch, totals)
            jax.block_until_ready(totals)
        speed = images / max(time.perf_counter() - start, 1e-9)
        train = loop.check_finite(steps.epoch_means(totals), what)
        val = evaluate(model, eval_step, val_split, progress=progress, desc=f"{what}: validation")
        history.append(loop.epoch_record(epoch + 1, train, val, what, epochs))
        loop.write_epoch(writer, history[-1], learning_rate, step, speed)
    return history


def book_splits(data: str, image_size: int, batch_size: int, pipeline: str = "tfdata",
                seed: int = 0) -> dict:
    """{"train" (shuffled), "validation", "test"}: the workflow's `Split`s (`splits.load_book_splits`)."""
    from vggjax.train import splits
    return splits.load_book_splits(data, image_size, batch_size, pipeline=pipeline, seed=seed)


def book_classifier(base, image_size: int, num_classes: int = 2, units: int = 256,
                    dropout_rate: float = 0.5, seed: int = 0):
    """NNX Classifier: the headless `base` (an NNX VGG) under a fresh book head (Dense(units)
    relu, dropout, one logit for two classes), sized for `image_size` inputs."""
    from vggjax.nnx.model import Classifier, Head, variables
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    base.config.check_input(images.shape)
    features = jax.eval_shape(base.config.apply, variables(base), images)
    head = Head(math.prod(features.shape[1:]), units=units, dropout_rate=dropout_rate,
                num_outputs=1 if num_classes == 2 else num_classes, rngs=nnx.Rngs(seed))
    return Classifier(base, head)
