"""The training checkpoint manager (Orbax): latest + best epoch, state plus JSON metadata,
damaged checkpoints set aside. A plain tree of arrays on disk is `vggjax.utils.orbax_tree`."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from vggjax.utils import disk, interrupts, ownership, temps
from vggjax.utils.orbax_tree import ocp as _ocp, quiet as _quiet

logger = logging.getLogger(__name__)
MONITORS = {"val_loss": "min", "val_accuracy": "max"}
DAMAGED = "damaged-"  # prefix of a checkpoint step set aside as unreadable
# Orbax's own temporaries of an interrupted save (`<step>.orbax-checkpoint-tmp-<n>`) have no
# finished content to digest; inside a checkpoint directory vggjax recorded they are its own.
_ORBAX_TMP = r"\d+\.orbax-checkpoint-tmp"


def manager(directory: Path, monitor: str, create: bool = True):
    """An Orbax CheckpointManager keeping the 2 latest checkpoints (for resuming) and the best
    epoch-end one by `monitor` ("val_loss" lowest or "val_accuracy" highest); items "state" and
    "meta" (JSON). Temporaries of a save cut short by a kill are removed when it opens."""
    ocp = _ocp()
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {sorted(MONITORS)}, found {monitor!r}")
    mode = MONITORS[monitor]
    # Mid-epoch checkpoints are saved with empty metrics: ranked worst, never "best".
    worst = float("inf") if mode == "min" else float("-inf")

    def score(metrics):
        return metrics.get(monitor, worst)

    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=2),
        ocp.checkpoint_managers.BestN(get_metric_fn=score, reverse=mode == "min", n=1),
    ])
    options = ocp.CheckpointManagerOptions(best_fn=score, best_mode=mode, preservation_policy=policy,
                                           create=create, cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


def save(mngr, step: int, state: Any, meta: Mapping, metrics: Mapping) -> None:
    """Save `state` (a pytree) and `meta` (JSON) as checkpoint `step` with `metrics` for ranking.

    Saving and recording are one step: `step` is recorded as vggjax's before Orbax writes it
    (unverified: no digests yet), and with the digests of its files once written
    (`ownership.record`), all with Ctrl-C deferred. A kill -9 in between leaves a step that
    `restore_latest` removes (never loads) and `--restart` may delete, since it is recorded.
    """
    ocp = _ocp()
    directory = Path(str(mngr.directory))
    try:
        # Waited for: Orbax writes in the background otherwise; the state is small next to an
        # epoch's work. Ctrl-C waits for the write (interrupts.signals_deferred): no half step.
        with interrupts.signals_deferred(), _quiet():
            _record(directory, writing=step)
            mngr.save(step, metrics=dict(metrics), force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))))
            mngr.wait_until_finished()
            _record(directory)
    except Exception as err:
        for tmp in directory.glob(f"{step}.orbax-checkpoint-tmp*"):  # the half-written step
            temps.remove(tmp)
        full = disk.no_space(err, f"checkpoint {step} in {directory}", "any checkpoints before it "
                               "are intact: free some space and run the same command to resume")
        if full is not None:
            raise full from None
        raise


def _record(directory: Path, writing: int | None = None) -> None:
    """Record the checkpoints in `directory` as vggjax's; `writing`: a step about to be saved."""
    if jax.process_index() == 0:  # multi-host: one process writes the record
        mine = [_ORBAX_TMP] + ([rf"{writing}$"] if writing is not None else [])
        ownership.record(directory, unverified=mine, skip=[DAMAGED])


def read_meta(mngr, step: int) -> dict:
    """The JSON metadata of checkpoint `step`, without touching its arrays."""
    ocp = _ocp()
    with interrupts.signals_deferred():  # see `restore`
        return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def restore(mngr, step: int, template: Any) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`; `template` gives the state's structure, shapes,
    dtypes and shardings (e.g. a freshly created state)."""
    ocp = _ocp()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    # Deferred: Orbax re-raises anything its reads meet, Ctrl-C included, as a plain Exception,
    # which would pass for a damaged checkpoint (set aside by `restore_latest`) or a traceback.
    with interrupts.signals_deferred():
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)


def restore_latest(mngr, template: Any, check_meta: Callable[[dict], None]) -> tuple[Any, dict] | None:
    """(state, meta) of the newest intact checkpoint, or None when there is no checkpoint.

    `check_meta(meta)` runs on the metadata before the arrays are read (it raises to refuse
    another run's checkpoint). A checkpoint whose files differ from the digests recorded when
    it was written, or that Orbax cannot read, is set aside as `damaged-<step>` (not deleted:
    vggjax cannot prove a changed file is still its own) with one log line, and the previous one
    is tried. ValueError naming the directory when every checkpoint is damaged.
    """
    directory = Path(str(mngr.directory))
    differ = {Path(rel).parts[0] for rel in ownership.changed(directory) or ()}
    entry = ownership.recorded(directory)
    for step in sorted(mngr.all_steps(), reverse=True):
        reason = "its files differ from what was written" if str(step) in differ else None
        if entry is not None and _unrecorded(directory / str(step), entry["files"]):
            if any(re.fullmatch(p, str(step)) for p in entry["unverified"]):
                temps.remove(directory / str(step))  # vggjax's, killed before it was recorded
                mngr.reload()
                logger.warning(f"checkpoint {step} in {directory} was cut short by a kill as it was "
                               "saved; removed it, trying the previous one")
                continue
            reason = "vggjax has no record of writing it"
        if reason is None:
            try:
                meta = read_meta(mngr, step)
            except Exception as err:  # Orbax and TensorStore raise many types for damaged files
                reason = _first_line(err)
        if reason is None:
            check_meta(meta)
            try:
                return restore(mngr, step, template)
            except Exception as err:
                reason = _first_line(err)
        aside = directory / f"{DAMAGED}{step}"
        os.replace(directory / str(step), aside)
        mngr.reload()
        logger.warning(f"checkpoint {step} in {directory} is damaged ({reason}); set aside as "
                       f"{aside.name}, trying the previous one")
    if any(directory.glob(f"{DAMAGED}*")):
        raise ValueError(f"every checkpoint in {directory} is damaged (set aside as damaged-<step>); "
                         f"remove {directory} to train this phase from the start")
    return None


def _unrecorded(step_dir: Path, files: Mapping) -> bool:
    """Whether any file of the checkpoint at `step_dir` is missing from the record `files`."""
    rel = step_dir.name
    return any(os.path.join(rel, os.path.relpath(os.path.join(root, name), step_dir)) not in files
               for root, _, names in os.walk(step_dir) for name in names)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def step_of(mngr, which: str | int, monitor: str, where: str) -> int:
    """The step `which` ("best", "latest" or a step number) names in `mngr`; ValueError naming
    `where` when there is none (no checkpoint, or no finished epoch for "best")."""
    step = {"best": mngr.best_step, "latest": mngr.latest_step}[which]() if isinstance(which, str) else which
    if step is None or step not in mngr.all_steps():
        raise ValueError(f"no checkpoint {which!r} in {where}; steps there: {list(mngr.all_steps())}")
    if which == "best" and monitor not in (mngr.metrics(step) or {}):
        raise ValueError(f"no epoch has finished yet in {where}: no best checkpoint")
    return step
