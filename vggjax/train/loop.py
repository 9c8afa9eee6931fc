"""Training: the train state, jitted train/eval steps, and the resumable epoch loop with Orbax checkpoints."""
from __future__ import annotations

import dataclasses
import itertools
import math
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from vggjax.train import augmentation, checkpoint
from vggjax.inference.classifier import class_logits
from vggjax.train.parallel import batch_sharding, replicated, shard_batch
from vggjax.model.compute_dtype import with_compute_dtype
from vggjax.train.splits import Batches
from vggjax.weights.preprocessing import preprocess_input

@flax.struct.dataclass
class TrainState:
    """Everything a training phase carries from step to step; a pytree, checkpointed as is.

    step: int32 scalar, optimizer steps taken in this phase. params / batch_stats: the model's
    variables (batch_stats {} without BatchNorm). opt_state: the phase's optimizer state.
    rng: uint32[2] key; step k draws its dropout and augmentation randomness from
    fold_in(rng, k), so a run resumed at step k draws exactly what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, variables: Mapping, tx: optax.GradientTransformation, seed: int = 0) -> "TrainState":
        """Fresh state at step 0 for `variables` ({"params", ["batch_stats"]}) and optimizer `tx`.

        The arrays are copied, so donating the state to a train step never deletes the caller's.
        """
        params = jax.tree.map(jnp.array, variables["params"])
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats=jax.tree.map(jnp.array, dict(variables.get("batch_stats", {}))),
                   opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))

    def variables(self) -> dict:
        """{"params": ..., ["batch_stats": ...]} for model.apply."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def batch_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Masked loss and accuracy of one batch: padded examples (mask False) count zero.

    logits (B, K): softmax cross-entropy against integer labels; a binary head's (B, 1) goes
    through `classifier.class_logits`, the rule predicting uses, which makes this its sigmoid
    cross-entropy against labels in {0, 1} and "correct" mean logit > 0. Returns float32 "loss"
    and "accuracy" means over the real examples (0 when there are none) and int32 "count" of them.
    """
    logits = class_logits(logits)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    count = jnp.sum(mask, dtype=jnp.int32)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    return {"loss": jnp.sum(jnp.where(mask, losses, 0.0)) / denominator,
            "accuracy": jnp.sum(jnp.where(mask, correct, False), dtype=jnp.float32) / denominator,
            "count": count}


def model_inputs(images, key, augment, preprocess_mode, dtype):
    """What a step feeds the model: `images` augmented (when `augment` is a config, drawn from
    `key`), preprocessed (when `preprocess_mode`), as `dtype` (None: float32)."""
    if augment is not None:
        images = augmentation.augment(key, images, augment)
    if preprocess_mode is not None:
        images = preprocess_input(images, preprocess_mode)
    return jnp.asarray(images).astype(dtype or jnp.float32)



def _apply(model, state, x, *, train, rngs=None):
    """(logits, new batch_stats): BatchNorm models return updated running statistics."""
    if not state.batch_stats:
        return model.apply({"params": state.params}, x, train=train, rngs=rngs), state.batch_stats
    logits, updates = model.apply(state.variables(), x, train=train, rngs=rngs, mutable=["batch_stats"])
    return logits, updates["batch_stats"]


def _jit(step, mesh, donate: bool):
    """jax.jit with the state replicated and the batch split over `mesh` (when given)."""
    kwargs = {"donate_argnums": 0} if donate else {}
    if mesh is not None:
        kwargs.update(in_shardings=(replicated(mesh), batch_sharding(mesh)),
                      out_shardings=(replicated(mesh), replicated(mesh)) if donate else replicated(mesh))
    return jax.jit(step, **kwargs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, input_key: str = "image",
                    augment=None, preprocess_mode: str | None = None, mesh=None,
                    compute_dtype=None) -> Callable:
    """One jitted `train_step(state, batch) -> (state, metrics)`; the state's buffers are donated.

    batch: {input_key: (B, ...) inputs, "label": int32 (B,), "mask": bool (B,)}. Inside one
    jit: batch[input_key] -> `augmentation.augment` (when `augment` is a config; uint8 or 0..255
    images) -> `preprocess_input(mode)` (when `preprocess_mode`) -> model.apply(train=True,
    dropout) -> masked loss (`batch_metrics`) -> gradients -> tx.update -> new params. Keeping
    all of it in one program lets XLA drop the backward pass through frozen blocks.
    metrics: {"loss", "accuracy"} float32 means over the real examples, "count" int32.
    With input_key="features" and a `Head` as model, it trains a head on cached conv features.
    compute_dtype=jnp.bfloat16 runs the model in bf16 with fp32 parameters and fp32 loss
    (`with_compute_dtype`); None keeps the model's own dtype.
    With `mesh`, the state must be replicated (`parallel.replicate`) and the batch sharded
    (`parallel.shard_batch`); XLA averages gradients across devices.
    """
    model = with_compute_dtype(model, compute_dtype)

    def train_step(state: TrainState, batch):
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        x = model_inputs(batch[input_key], augment_key, augment, preprocess_mode, compute_dtype)

        def loss_fn(params):
            logits, batch_stats = _apply(model, state.replace(params=params), x, train=True,
                                         rngs={"dropout": dropout_key})
            metrics = batch_metrics(logits, batch["label"], batch["mask"])
            return metrics["loss"], (metrics, batch_stats)

        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                             opt_state=opt_state), metrics

    return _jit(train_step, mesh, donate=True)


def make_eval_step(model: nn.Module, *, input_key: str = "image", preprocess_mode: str | None = None,
                   mesh=None, compute_dtype=None) -> Callable:
    """Jitted `eval_step(state, batch) -> metrics` (inference mode, no augmentation).

    Same batch contract and metrics as the train step: masked means plus the count of real
    examples, so padded examples count zero and `evaluate` can weight batches exactly.
    """
    model = with_compute_dtype(model, compute_dtype)

    def eval_step(state: TrainState, batch):
        x = model_inputs(batch[input_key], None, None, preprocess_mode, compute_dtype)
        logits, _ = _apply(model, state, x, train=False)
        return batch_metrics(logits, batch["label"], batch["mask"])

    return _jit(eval_step, mesh, donate=False)


@jax.jit
def accumulate(totals, metrics):
    """`totals` (`metric_totals`) plus one step's `metrics` ("loss", "accuracy" means and
    "count"), on the device: no host sync per step."""
    count = metrics["count"]
    return {"loss_sum": totals["loss_sum"] + metrics["loss"] * count,
            # accuracy * count is an integer up to float rounding
            "correct": totals["correct"] + jnp.round(metrics["accuracy"] * count).astype(jnp.int32),
            "count": totals["count"] + count}


def metric_totals(loss_sum: float = 0.0, correct: int = 0, count: int = 0) -> dict:
    """Running sums of an epoch's metrics: float32 "loss_sum", int32 "correct" and "count"."""
    return {"loss_sum": jnp.float32(loss_sum), "correct": jnp.int32(correct), "count": jnp.int32(count)}


def check_finite(train: dict, where: str, directory: Path | None = None) -> dict:
    """`train` if its loss is finite; else ValueError before this epoch's state is saved (a NaN
    loss stays NaN: every later epoch would be nonsense)."""
    if not math.isfinite(train["loss"]):
        kept = f". The checkpoints before this epoch are kept in {directory}" if directory else ""
        raise ValueError(f"{where}: the training loss is {train['loss']}; lower the learning rate "
                         f"or check the inputs{kept}")
    return train


def epoch_means(totals) -> dict:
    """{"loss", "accuracy"} means (Python floats) and "count" of `totals` (`metric_totals`)."""
    t = jax.device_get(totals)
    n = int(t["count"])
    return {"loss": float(t["loss_sum"]) / max(n, 1), "accuracy": int(t["correct"]) / max(n, 1), "count": n}


def evaluate(state: TrainState, eval_step: Callable, split: Batches, mesh=None) -> dict:
    """{"loss", "accuracy", "count"} over every example of `split` exactly once (padding masked)."""
    totals = metric_totals()
    for batch in split.batches(0):
        totals = accumulate(totals, eval_step(state, shard_batch(batch, mesh) if mesh else batch))
    return epoch_means(totals)


def restore_checkpoint(state: TrainState, workdir: str | Path, phase: str,
                       which: str | int = "best", monitor: str = "val_loss") -> tuple[TrainState, dict]:
    """(state, metadata) of phase `phase` under `workdir`: "best" (by `monitor`, as in `fit`),
    "latest" or a step number.

    `state` is the template (shapes, dtypes, shardings), e.g. the one passed to `fit`.
    metadata: {"phase", "steps_per_epoch", "history", ..., and `fit`'s `identity`}.
    """
    directory = Path(workdir).absolute() / phase
    if not directory.exists():
        raise ValueError(f"no checkpoints for phase {phase!r}: {directory} does not exist")
    mngr = checkpoint.manager(directory, monitor, create=False)
    try:
        return checkpoint.restore(mngr, checkpoint.step_of(mngr, which, monitor, str(directory)), state)
    finally:
        mngr.close()


def fit(state: TrainState, train_step: Callable, eval_step: Callable, train_split, val_split, *,
        epochs: int, workdir: str | Path, phase: str, identity: Mapping | None = None,
        steps_per_epoch: int | None = None, checkpoint_every: int | None = 100, mesh=None,
        log: Callable[[str], Any] = print, monitor: str = "val_loss",
        progress: bool = True) -> tuple[TrainState, list[dict]]:
    """Train `epochs` epochs of one phase, resumable, with checkpoints under workdir/<phase>/.

    train_split / val_split: `splits.Batches` (a `Split`, an `ArraySplit`, cached features)
    yielding batch dicts (see `make_train_step`) in an order fixed by (their seed, epoch).
    Consumes `state` (its buffers are donated to `train_step`).
    Checkpoints: every `checkpoint_every` steps (None: epoch ends only) and at every epoch end,
    keeping the 2 latest and the best epoch by `monitor` ("val_loss" lowest, as the book's
    ModelCheckpoint, or "val_accuracy" highest); `restore_checkpoint(..., which="best")` loads it.
    Each checkpoint holds the state and JSON metadata: phase, `identity` (JSON: whatever makes
    two runs the same run, e.g. weights digest, freeze rules, seed), steps_per_epoch, history so
    far and the position in the epoch.
    Resume: run again with the same arguments after an interruption (even kill -9) and it
    continues from the latest checkpoint, skipping the batches already done, and ends with
    the same parameters as an uninterrupted run. A finished phase is returned as is. A
    checkpoint whose phase, identity or steps_per_epoch differ is refused with a ValueError
    naming what differs, before any training. Unfreezing is a new phase with a new state and
    train step.
    Returns (final state, history): one dict per epoch with epoch, loss, accuracy, val_loss,
    val_accuracy.
    """
    if jax.process_index() != 0:  # one log and one progress bar per job, not per host
        log, progress = (lambda line: None), False
    spe = steps_per_epoch or train_split.steps_per_epoch
    identity = {"phase": phase, **json.loads(json.dumps(dict(identity or {}))), "steps_per_epoch": spe}
    directory = Path(workdir).absolute() / phase
    mngr = checkpoint.manager(directory, monitor)
    try:
        state, at = _resume(mngr, state, identity, directory, log)
        if at.epoch >= epochs:
            log(f"phase {phase}: already finished ({at.epoch} epochs) in {directory}; not retraining")
            return state, at.history
        if at.step:
            log(f"phase {phase}: resuming at epoch {at.epoch + 1}, batch {at.done} (step {at.step}) from {directory}")

        def save(state, metrics):
            checkpoint.save(mngr, at.step, state, at.meta(identity), metrics)

        while at.epoch < epochs:
            bar = dict(desc=f"{phase} {at.epoch + 1}/{epochs}", disable=not progress)
            state = _train_epoch(state, at, train_step, train_split, spe, mesh, checkpoint_every, save, bar)
            record = _end_epoch(state, at, eval_step, val_split, mesh, f"phase {phase} epoch {at.epoch + 1}",
                                epochs, directory, log)
            save(state, {k: v for k, v in record.items() if k != "epoch"})
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return state, at.history


def _end_epoch(state, at, eval_step, val_split, mesh, what: str, epochs: int, directory: Path,
               log) -> dict:
    """Close the epoch `at` is in: its training means (refused if not finite), the validation
    metrics, one history record (returned) and its log line; `at` moves to the next epoch."""
    train = check_finite(epoch_means(at.totals), what, directory)
    val = evaluate(state, eval_step, val_split, mesh)
    record = {"epoch": at.epoch + 1, "loss": train["loss"], "accuracy": train["accuracy"],
              "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    at.history.append(record)
    log(f"{what}/{epochs}: loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} "
        f"val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}")
    at.epoch, at.done, at.totals = at.epoch + 1, 0, metric_totals()
    return record


@dataclasses.dataclass
class _Position:
    """Where a phase stands besides its state: what each checkpoint's metadata records."""

    step: int = 0
    epoch: int = 0  # epochs finished
    done: int = 0  # batches done in the current epoch
    history: list = dataclasses.field(default_factory=list)
    totals: dict = dataclasses.field(default_factory=lambda: metric_totals())

    def meta(self, identity: Mapping) -> dict:
        t = jax.device_get(self.totals)
        return {**identity, "step": self.step, "epoch": self.epoch, "batches_done": self.done,
                "history": list(self.history),  # a copy: the save may be written after the next append
                "epoch_totals": {"loss_sum": float(t["loss_sum"]), "correct": int(t["correct"]),
                                 "count": int(t["count"])}}


def _resume(mngr, state, identity: Mapping, directory: Path, log) -> tuple[Any, _Position]:
    """(state, position) of the newest intact checkpoint (`checkpoint.restore_latest`), or the
    fresh `state` at step 0. Another run's checkpoint: ValueError naming what differs."""
    def same_run(meta):  # the metadata first: another run's state may not even fit the template
        differs = {k: (meta.get(k), v) for k, v in identity.items() if meta.get(k) != v}
        if differs:
            raise ValueError(f"{directory} holds a checkpoint of another run: "
                             + "; ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in differs.items())
                             + ". Use another workdir or phase name.")

    restored = checkpoint.restore_latest(mngr, state, same_run, log)
    if restored is None:
        return state, _Position()
    state, meta = restored
    return state, _Position(meta["step"], meta["epoch"], meta["batches_done"], list(meta["history"]),
                            metric_totals(**meta["epoch_totals"]))


def _train_epoch(state, at: _Position, train_step, train_split, spe: int, mesh, checkpoint_every,
                 save: Callable, bar: dict):
    """The rest of epoch `at.epoch` from batch `at.done`, advancing `at`; a mid-epoch checkpoint
    every `checkpoint_every` steps. ValueError when the split runs out of batches."""
    from tqdm import tqdm

    batches = itertools.islice(train_split.batches(at.epoch, skip=at.done), spe - at.done)
    with tqdm(total=spe, initial=at.done, leave=False, **bar) as progress:
        for batch in batches:
            state, metrics = train_step(state, shard_batch(batch, mesh) if mesh else batch)
            at.totals = accumulate(at.totals, metrics)
            at.step, at.done = at.step + 1, at.done + 1
            progress.update()
            if checkpoint_every and at.step % checkpoint_every == 0 and at.done < spe:
                save(state, {})
    if at.done < spe:
        raise ValueError(f"train split gave {at.done} batches in epoch {at.epoch + 1}, expected {spe}")
    return state
