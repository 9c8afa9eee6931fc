"""What makes a run itself (`run_identity`, run.json) and the workdir it owns (`claim_workdir`): a
workdir resumes only the run it holds, and --restart removes only what vggjax wrote."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping

import jax

from vggjax.utils import atomic, ownership
from vggjax.train.splits import PIXELS
from vggjax.train import report
from vggjax.train.config import Config
from vggjax.train.metric_writers import TENSORBOARD

logger = logging.getLogger(__name__)

CLASSIFIERS = "classifiers"  # <workdir>/classifiers/<phase>: each phase's classifier directory
RUN = "run.json"  # the run's identity, written into its workdir before any work
# What a workdir holds for a run: all that `--restart` deletes (nothing else in the workdir).
# "export": where CLASSIFIERS were written before 0.1 (older workdirs).
RUN_OUTPUTS = (RUN, "config.json", "checkpoints", "features_cache", CLASSIFIERS, "export", report.HISTORY,
               report.RESULTS, report.CURVES, TENSORBOARD)
# Config fields that do not change what a run computes: not part of its identity. `weights` and
# `data` enter as the weights' digest and the data's fingerprint, not as paths.
_NOT_IDENTITY = {"weights", "workdir", "data", "phases", "epochs", "progress", "checkpoint_every",
                 "data_parallel", "tfds_data_dir", "evaluate", "patience"}


class RunMismatchError(ValueError):
    """The workdir holds another run; resuming there would mix two runs."""


def data_fingerprint(data: str) -> str:
    """sha256 of every file's path, size and mtime under the folder `data` (or of "tfds")."""
    h = hashlib.sha256()
    if data == "tfds":
        h.update(b"tfds cats_vs_dogs")  # its slicing is fixed per vggjax version, also in the identity
        return h.hexdigest()
    root = Path(data)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def run_identity(config: Config, weights_meta: Mapping, weights_sha256: str, mode: str) -> dict:
    """What makes two runs the same run: weights digest, data fingerprint, every Config field
    that changes the computation (image size, batch size, seed, augmentation, ...), the
    preprocessing mode, the pipeline's pixel revision (`splits.PIXELS`) and the vggjax version. Stored as workdir/run.json."""
    from vggjax import __version__

    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IDENTITY}
    return json.loads(json.dumps({"weights_sha256": weights_sha256, "arch": weights_meta["arch"],
                                  "data": data_fingerprint(config.data), **fields,
                                  "preprocess": mode, "pixels": PIXELS[config.pipeline],
                                  "vggjax_version": __version__}, default=str))


def claim_workdir(workdir: Path, identity: Mapping, restart: bool = False) -> None:
    """Make `workdir` this run's: resume only when its run.json is `identity`.

    A workdir of another run (or of a run without run.json) raises RunMismatchError naming what
    differs, unless `restart`, which deletes that run's outputs: what vggjax wrote there,
    proven by the ownership records (`ownership.remove_owned`); a user's file among them is refused before
    anything is deleted. Outputs without run.json that no ownership record proves vggjax's (an older
    vggjax's, or the user's under vggjax's names) are refused even with `restart`. OSError (one line) when the workdir cannot be created or written.
    """
    make_workdir(workdir)
    path = workdir / RUN
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None and any((workdir / name).exists() for name in RUN_OUTPUTS[1:]):
        old = {}  # outputs without an identity: made by an older vggjax, or damaged
    if old == {} and (others := ownership.unowned(workdir, RUN_OUTPUTS)):
        # An older vggjax wrote no ownership records: --restart could not delete these either.
        raise RunMismatchError(f"--workdir {workdir} holds outputs without {RUN} that vggjax did not "
                               f"write ({others}): an older vggjax's or your own; remove them by hand "
                               "or use another --workdir")
    if old is not None and old != identity:
        if not restart:
            differs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            if "pipeline" in differs:  # another pipeline decodes differently: saying so once is enough
                differs.remove("pixels") if "pixels" in differs else None
            shown = ", ".join(f"{_what(k)} ({_short(old.get(k))} there, {_short(identity.get(k))} now)"
                              for k in differs[:6]) + (" ..." if len(differs) > 6 else "")
            if not old:
                shown = f"vggjax's outputs without their {RUN}"
            raise RunMismatchError(f"--workdir {workdir} holds another run: {shown}; use another "
                                   "--workdir, or --restart to discard that run")
    if jax.process_index() != 0:  # multi-host: every process checks, one writes
        return
    if restart:
        ownership.remove_owned([workdir / name for name in RUN_OUTPUTS])
        logger.info(f"--restart: discarded the run in {workdir}")
    with atomic.writing(path) as tmp:
        tmp.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")


def make_workdir(workdir: Path) -> None:
    """Create `workdir`; OSError (one line) when it cannot be created or written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise PermissionError(f"--workdir {workdir} is not writable")
    except OSError as err:
        raise OSError(f"cannot use --workdir {workdir}: {err.strerror or err}") from None


# Identity keys that are not Config fields (those are named by their flag), in words.
_WORDS = {"weights_sha256": "the weights", "arch": "the architecture", "data": "the data's files",
          "preprocess": "the preprocessing", "pixels": "how the image pipeline decodes images",
          "vggjax_version": "the vggjax version"}


def _what(key: str) -> str:
    return _WORDS.get(key) or f"--{key.replace('_', '-')}"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if value is not None else "absent"
    return text if len(text) <= 40 else text[:16] + "..."
