"""The resumable epoch loop (`fit`): progress, history, early stopping and Orbax checkpoints around
the steps of `vggjax.train.steps`."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from flax.training.early_stopping import EarlyStopping

from vggjax.train import checkpoint, steps
from vggjax.train.metric_writers import MetricWriter
from vggjax.train.parallel import shard_batch
from vggjax.train.splits import Batches
from vggjax.utils.deprecation import moved_names
from vggjax.utils.progress import advance, progress_bar

logger = logging.getLogger(__name__)
# Moved to `vggjax.train.steps`; `vggjax.train.<name>` is unchanged.
__getattr__ = moved_names(__name__, dict.fromkeys(
    ("TrainState", "make_train_step", "make_eval_step", "batch_metrics", "model_inputs", "accumulate",
     "metric_totals", "epoch_means"), "vggjax.train.steps"))

def check_finite(train: dict, where: str, directory: Path | None = None) -> dict:
    """`train` if its loss is finite; else ValueError before this epoch's state is saved (a NaN
    loss stays NaN: every later epoch would be nonsense)."""
    if not math.isfinite(train["loss"]):
        kept = f". The checkpoints before this epoch are kept in {directory}" if directory else ""
        raise ValueError(f"{where}: the training loss is {train['loss']}; lower the learning rate "
                         f"or check the inputs{kept}")
    return train


def evaluate(state: steps.TrainState, eval_step: Callable, split: Batches, mesh=None, *,
             progress: bool = False, desc: str = "evaluating") -> dict:
    """{"loss", "accuracy", "count"} over every example of `split` exactly once (padding masked);
    `progress`: a bar named `desc` (`vggjax.utils.progress`)."""
    totals = steps.metric_totals()
    with progress_bar(total=split.steps_per_epoch * split.batch_size, desc=desc, unit="img",
                      enabled=progress, leave=False) as bar:
        for batch in split.batches(0):
            totals = steps.accumulate(totals, eval_step(state, shard_batch(batch, mesh) if mesh else batch))
            advance(bar, _images(batch))
    return steps.epoch_means(totals)


def _images(batch) -> int:
    """The examples (padding rows too) of a global batch of which this process holds `batch`."""
    return len(batch["label"]) * jax.process_count()


def restore_checkpoint(state: steps.TrainState, workdir: str | Path, phase: str,
                       which: str | int = "best", monitor: str = "val_loss") -> tuple[steps.TrainState, dict]:
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


def fit(state: steps.TrainState, train_step: Callable, eval_step: Callable, train_split, val_split, *,
        epochs: int, workdir: str | Path, phase: str, identity: Mapping | None = None,
        steps_per_epoch: int | None = None, checkpoint_every: int | None = 100, mesh=None,
        monitor: str = "val_loss", progress: bool = True, writer: MetricWriter | None = None,
        learning_rate: float | Callable[[int], float] | None = None,
        patience: int | None = None) -> tuple[steps.TrainState, list[dict]]:
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


def epoch_bar(split: Batches, total: int, desc: str, progress: bool, done: int = 0):
    """The progress bar of a training epoch of `total` batches of `split` (`done` of them
    already), in images; advance it with `advance_epoch`."""
    size = split.batch_size
    return progress_bar(total=total * size, initial=done * size, desc=desc, unit="img", enabled=progress)


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
    train = check_finite(steps.epoch_means(at.totals), what, directory)
    val = evaluate(state, eval_step, val_split, mesh, progress=progress, desc=f"{what}: validation")
    record = epoch_record(at.epoch + 1, train, val, what, epochs)
    at.history.append(record)
    at.epoch, at.done, at.totals = at.epoch + 1, 0, steps.metric_totals()
    return record


@dataclasses.dataclass
class _Position:
    """Where a phase stands besides its state: what each checkpoint's metadata records."""

    step: int = 0
    epoch: int = 0  # epochs finished
    done: int = 0  # batches done in the current epoch
    history: list = dataclasses.field(default_factory=list)
    totals: dict = dataclasses.field(default_factory=lambda: steps.metric_totals())

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
                            steps.metric_totals(**meta["epoch_totals"]))


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
            at.totals = steps.accumulate(at.totals, metrics)
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
    means = steps.epoch_means(totals)
    return {"loss": f"{means['loss']:.4f}", "accuracy": f"{means['accuracy']:.4f}"}
