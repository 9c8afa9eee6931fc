"""A tree of arrays as an Orbax directory, written and read synchronously: what a weights
directory's `checkpoint/` and an NNX checkpoint hold. Training checkpoints (a manager with
latest/best steps) are `vggjax.train.checkpoint`, built on the same lazy import."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator, Mapping

from vggjax.utils import interrupts


def ocp():
    """The `orbax.checkpoint` module, imported on first use (slow to import: only when a checkpoint is touched)."""
    import orbax.checkpoint

    return orbax.checkpoint


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Orbax's log records held back while a save runs: shown after it succeeds, dropped when it
    fails (the exception raised says it once). Also dropped, for the rest of the process once a
    save failed (a full disk): the "Event loop is closed" reports of TensorStore writes that
    finish after the failed save closed their loop, and asyncio's unretrieved-exception logs."""
    absl, held = logging.getLogger("absl"), []
    previous_hook = sys.unraisablehook

    def hold(record):
        held.append(record)
        return False

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            previous_hook(unraisable)

    absl.addFilter(hold)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        # The failed save's TensorStore futures are collected later, and asyncio logs each one's
        # exception ("Future exception was never retrieved"): dropped for the process too.
        logging.getLogger("asyncio").addFilter(_unretrieved)
        raise
    finally:
        absl.removeFilter(hold)
    # Only now: after a failed save, late writes keep reporting (the hook stays for the process).
    sys.unraisablehook = previous_hook
    for record in held:  # the save succeeded: its warnings are worth seeing
        absl.handle(record)


def _unretrieved(record: logging.LogRecord) -> bool:
    """False for asyncio's reports of an exception nobody retrieved (a logging filter)."""
    return "exception was never retrieved" not in record.getMessage()


def save_tree(path: Path, tree: Mapping) -> None:
    """Write a nested dict of arrays to `path` (a new directory) and return when it is on disk.

    Synchronous on purpose: no writer thread can still be filling `path` when an interrupt
    makes the caller delete it.
    """
    orbax = ocp()
    with interrupts.signals_deferred(), quiet(), orbax.Checkpointer(orbax.StandardCheckpointHandler()) as ckptr:
        ckptr.save(path, args=orbax.args.StandardSave(dict(tree)))


def restore_tree(path: Path) -> dict:
    """The nested dict of NumPy arrays saved at `path`, with the stored shapes and dtypes."""
    orbax = ocp()
    # Deferred as a save is: Ctrl-C inside TensorStore's reads prints "Event loop is closed".
    with interrupts.signals_deferred(), orbax.Checkpointer(orbax.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore(path)
