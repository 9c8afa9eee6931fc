"""A tree of arrays as an Orbax directory, written and read synchronously: what a weights
directory's `checkpoint/` and an NNX checkpoint hold. Training checkpoints (a manager with
latest/best steps) are `vggjax.train.checkpoint`, built on the same lazy import."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from vggjax.utils import atomic


def ocp():
    """The `orbax.checkpoint` module, imported on first use (~1 s: only when a checkpoint is touched)."""
    import orbax.checkpoint

    return orbax.checkpoint


def save_tree(path: Path, tree: Mapping) -> None:
    """Write a nested dict of arrays to `path` (a new directory) and return when it is on disk.

    Synchronous on purpose: no writer thread can still be filling `path` when an interrupt
    makes the caller delete it.
    """
    orbax = ocp()
    with atomic.signals_deferred(), orbax.Checkpointer(orbax.StandardCheckpointHandler()) as ckptr:
        ckptr.save(path, args=orbax.args.StandardSave(dict(tree)))


def restore_tree(path: Path) -> dict:
    """The nested dict of NumPy arrays saved at `path`, with the stored shapes and dtypes."""
    orbax = ocp()
    with orbax.Checkpointer(orbax.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(path)
