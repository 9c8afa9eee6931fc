"""Per-epoch metrics for TensorBoard, through clu's `MetricWriter` API (write_scalars(step,
scalars), flush, close), shared by the Linen loop (`loop.fit`) and the NNX one (`vggjax.nnx.fit`).

`TensorBoard(logdir)` lays the events out as Keras' TensorBoard callback does, so a Keras
user's dashboards read the same: logdir/train and logdir/validation, tags "epoch_loss",
"epoch_accuracy", ... against the epoch; training and validation curves overlay.
Written by tensorboardX (no TensorFlow); view with `tensorboard --logdir WORKDIR`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

from vggjax.utils.extras import require

TENSORBOARD = "tensorboard"  # the workflow's folder of event files in its workdir
VALIDATION_PREFIX = "val_"  # history's validation keys: val_loss -> validation/epoch_loss


class MetricWriter(Protocol):
    """clu.metric_writers.MetricWriter's scalar part: what the training loops write through."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` ({name: float}) at `step`."""

    def flush(self) -> None:
        """Make what was written readable."""

    def close(self) -> None:
        """Flush and release the files."""


class TensorBoard:
    """A `MetricWriter` into Keras' layout under `logdir`: a "val_"-prefixed name goes to
    logdir/validation without the prefix, every other to logdir/train; tags are "epoch_<name>"
    (epoch_loss, epoch_accuracy, epoch_learning_rate, epoch_images_per_second). The event
    files are opened at the first write."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self._writers: dict = {}

    def _writer(self, run: str):
        if run not in self._writers:
            tensorboardX = require("tensorboardX", "writing TensorBoard metrics")
            self._writers[run] = tensorboardX.SummaryWriter(str(self.logdir / run), flush_secs=30)
        return self._writers[run]

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            validation = name.startswith(VALIDATION_PREFIX)
            tag = "epoch_" + (name[len(VALIDATION_PREFIX):] if validation else name)
            self._writer("validation" if validation else "train").add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
