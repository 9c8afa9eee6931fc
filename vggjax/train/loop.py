"""Training: the train state, jitted train/eval steps, and the resumable epoch loop with Orbax checkpoints."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training.early_stopping import EarlyStopping

from vggjax.train import augmentation, checkpoint
from vggjax.train.metric_writers import MetricWriter
from vggjax.inference.classifier import class_logits
from vggjax.train.parallel import batch_sharding, replicated, shard_batch
from vggjax.model.compute_dtype import with_compute_dtype
from vggjax.train.splits import Batches
from vggjax.utils.progress import advance, progress_bar
from vggjax.weights.preprocessing import preprocess_input

logger = logging.getLogger(__name__)

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


def evaluate(state: TrainState, eval_step: Callable, split: Batches, mesh=None, *,
             progress: bool = False, desc: str = "evaluating") -> dict:
    """{"loss", "accuracy", "count"} over every example of `split` exactly once (padding masked);
    `progress`: a bar named `desc` (`vggjax.utils.progress`)."""
    totals = metric_totals()
    with progress_bar(total=split.steps_per_epoch * split.batch_size, desc=desc, unit="img",
                      enabled=progress, leave=False) as bar:
        for batch in split.batches(0):
            totals = accumulate(totals, eval_step(state, shard_batch(batch, mesh) if mesh else batch))
            advance(bar, _images(batch))
    return epoch_means(totals)


def _images(batch) -> int:
    """The examples (padding rows too) of a global batch of which this process holds `batch`."""
    return len(batch["label"]) * jax.process_count()


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
        monitor: str = "val_loss", progress: bool = True, writer: MetricWriter | None = None,
        learning_rate: float | Callable[[int], float] | None = None,
        patience: int | None = None) -> tuple[TrainState, list[dict]]:
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
    `patience`: stop after that many epochs without `monitor` improving (Keras'
    EarlyStopping(patience), through flax.training.early_stopping; None: never early).
    Progress (`progress`): a bar per epoch with the running loss and accuracy, images/s and
    ETA, and one per validation pass; a log line (logging, INFO) per epoch. `writer` (a
    `metric_writers.MetricWriter`) gets each epoch's history record plus "learning_rate"
    (`learning_rate`, a float or an optax schedule of the step) and "images_per_second".
    Resume: run again with the same arguments after an interruption (even kill -9) and it
    continues from the latest checkpoint, skipping the batches already done, and ends with
    the same parameters as an uninterrupted run; early stopping replays the history, so it
    stops where the uninterrupted run does. A finished phase is returned as is. A
    checkpoint whose phase, identity or steps_per_epoch differ is refused with a ValueError
    naming what differs, before any training. Unfreezing is a new phase with a new state and
    train step.
    Returns (final state, history): one dict per epoch with epoch, loss, accuracy, val_loss,
    val_accuracy.
    """
    if jax.process_index() != 0:  # one log, one progress bar and one writer per job, not per host
        progress, writer = False, None
    log = logger.info if jax.process_index() == 0 else (lambda line: None)
    spe = steps_per_epoch or train_split.steps_per_epoch
    identity = {"phase": phase, **json.loads(json.dumps(dict(identity or {}))), "steps_per_epoch": spe}
    directory = Path(workdir).absolute() / phase
    mngr = checkpoint.manager(directory, monitor)
    try:
        state, at = _resume(mngr, state, identity, directory)
        if at.epoch >= epochs or stopped_early(at.history, monitor, patience):
            log(f"phase {phase}: already finished ({at.epoch} epochs) in {directory}; not retraining")
            return state, at.history
        if at.step:
            log(f"phase {phase}: resuming at epoch {at.epoch + 1}, batch {at.done} (step {at.step}) from {directory}")

        def save(state, metrics):
            checkpoint.save(mngr, at.step, state, at.meta(identity), metrics)

        while at.epoch < epochs and not stopped_early(at.history, monitor, patience, phase):
            what = f"phase {phase} epoch {at.epoch + 1}"
            bar = epoch_bar(train_split, spe, f"{phase} {at.epoch + 1}/{epochs}", progress, at.done)
            state, speed = _train_epoch(state, at, train_step, train_split, spe, mesh, checkpoint_every,
                                        save, bar)
            record = _end_epoch(state, at, eval_step, val_split, mesh, what, epochs, directory, progress)
            save(state, {k: v for k, v in record.items() if k != "epoch"})
            write_epoch(writer, record, learning_rate, at.step, speed)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return state, at.history


def write_epoch(writer: MetricWriter | None, record: Mapping, learning_rate, step: int,
                images_per_second: float) -> None:
    """Write an epoch's history `record` to `writer` (None: nothing) at step record["epoch"],
    with "learning_rate" (a float, or an optax schedule read at optimizer step `step`; None:
    left out) and "images_per_second"."""
    if writer is None:
        return
    rate = learning_rate(step) if callable(learning_rate) else learning_rate
    writer.write_scalars(record["epoch"], {**{k: v for k, v in record.items() if k != "epoch"},
                                           **({} if rate is None else {"learning_rate": float(rate)}),
                                           "images_per_second": images_per_second})
    writer.flush()


def epoch_record(epoch: int, train: Mapping, val: Mapping, what: str, epochs: int) -> dict:
    """An epoch's history record {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"} from
    its training and validation means; logged as one line "<what>/<epochs>: loss ..."."""
    record = {"epoch": epoch, "loss": train["loss"], "accuracy": train["accuracy"],
              "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
    if jax.process_index() == 0:
        logger.info(f"{what}/{epochs}: loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} "
                    f"val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}")
    return record


def epoch_bar(split: Batches, steps: int, desc: str, progress: bool, done: int = 0):
    """The progress bar of a training epoch of `steps` batches of `split` (`done` of them
    already), in images; advance it with `advance_epoch`."""
    size = split.batch_size
    return progress_bar(total=steps * size, initial=done * size, desc=desc, unit="img", enabled=progress)


def advance_epoch(bar, batch, totals) -> None:
    """Count `batch` on an `epoch_bar`, the running loss and accuracy of `totals` beside it."""
    advance(bar, _images(batch), postfix=lambda: _running(totals))


def stopped_early(history: list[dict], monitor: str, patience: int | None, phase: str | None = None) -> bool:
    """Whether early stopping (`fit`'s `patience`) ends a phase after `history`: flax's
    EarlyStopping fed the history's `monitor` values (so a resumed run stops where an
    uninterrupted one does); with `phase`, says so in a log line."""
    if patience is None:
        return False
    if patience < 1:
        raise ValueError(f"patience must be an integer >= 1 or None, found {patience!r}")
    sign = 1.0 if checkpoint.MONITORS[monitor] == "min" else -1.0  # flax's EarlyStopping minimises
    # flax counts the epochs without improvement before the one that stops, Keras these and it.
    stopper = EarlyStopping(patience=patience - 1)
    for record in history:
        stopper = stopper.update(sign * record[monitor])
    if stopper.should_stop and phase is not None:
        best = min(history, key=lambda r: sign * r[monitor])
        logger.info(f"phase {phase}: stopping early after epoch {len(history)}: {monitor} has not "
                    f"improved for {patience} epochs (best: epoch {best['epoch']}, {best[monitor]:.4f})")
    return stopper.should_stop


def _end_epoch(state, at, eval_step, val_split, mesh, what: str, epochs: int, directory: Path,
               progress: bool) -> dict:
    """Close the epoch `at` is in: its training means (refused if not finite), the validation
    metrics, one history record (returned) and its log line; `at` moves to the next epoch."""
    train = check_finite(epoch_means(at.totals), what, directory)
    val = evaluate(state, eval_step, val_split, mesh, progress=progress, desc=f"{what}: validation")
    record = epoch_record(at.epoch + 1, train, val, what, epochs)
    at.history.append(record)
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


def _resume(mngr, state, identity: Mapping, directory: Path) -> tuple[Any, _Position]:
    """(state, position) of the newest intact checkpoint (`checkpoint.restore_latest`), or the
    fresh `state` at step 0. Another run's checkpoint: ValueError naming what differs."""
    def same_run(meta):  # the metadata first: another run's state may not even fit the template
        differs = {k: (meta.get(k), v) for k, v in identity.items() if meta.get(k) != v}
        if differs:
            raise ValueError(f"{directory} holds a checkpoint of another run: "
                             + "; ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in differs.items())
                             + ". Use another workdir or phase name.")

    restored = checkpoint.restore_latest(mngr, state, same_run)
    if restored is None:
        return state, _Position()
    state, meta = restored
    return state, _Position(meta["step"], meta["epoch"], meta["batches_done"], list(meta["history"]),
                            metric_totals(**meta["epoch_totals"]))


def _train_epoch(state, at: _Position, train_step, train_split, spe: int, mesh, checkpoint_every,
                 save: Callable, bar) -> tuple[Any, float]:
    """The rest of epoch `at.epoch` from batch `at.done`, advancing `at`; a mid-epoch checkpoint
    every `checkpoint_every` steps. Returns (state, images per second of this pass).
    ValueError when the split runs out of batches."""
    batches = itertools.islice(train_split.batches(at.epoch, skip=at.done), spe - at.done)
    images, start = 0, time.perf_counter()
    with bar:
        for batch in batches:
            state, metrics = train_step(state, shard_batch(batch, mesh) if mesh else batch)
            at.totals = accumulate(at.totals, metrics)
            at.step, at.done = at.step + 1, at.done + 1
            images += _images(batch)
            advance_epoch(bar, batch, at.totals)
            if checkpoint_every and at.step % checkpoint_every == 0 and at.done < spe:
                save(state, {})
        jax.block_until_ready(at.totals)
    if at.done < spe:
        raise ValueError(f"train split gave {at.done} batches in epoch {at.epoch + 1}, expected {spe}")
    return state, images / max(time.perf_counter() - start, 1e-9)


def _running(totals) -> dict:
    """The progress bar's postfix: the epoch's running loss and accuracy (a device sync)."""
    means = epoch_means(totals)
    return {"loss": f"{means['loss']:.4f}", "accuracy": f"{means['accuracy']:.4f}"}
