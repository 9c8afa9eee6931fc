"""Writing a file or a directory so that it appears complete or not at all, replacing only what
vggjax itself wrote, and leaving no temporaries behind (not even after kill -9, by the next run).

    with atomic.writing(out_dir, directory=True, overwrite=overwrite, protect=[input_file]) as tmp:
        tmp.mkdir(); ...            # write everything under tmp
    # here out_dir is the new content, fsynced; on any exception, Ctrl-C or SIGTERM, tmp is gone

The temporary is `.<name>.tmp-<pid>-<random>` beside the target; a replaced directory is first
moved to `.<name>.old-<pid>-<random>`. Both are recorded in vggjax's cache while they exist
(`vggjax.utils.temps`): the next vggjax command deletes those of a dead process wherever they are,
and a later `writing` beside the same target deletes those whose process is dead.

A target is replaced only when vggjax can prove it wrote it: the record of `vggjax.utils.ownership`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from vggjax.utils import interrupts, temps
from vggjax.utils.disk import fsync, fsync_tree, no_space
from vggjax.utils.ownership import RefusedError, foreign, listing, record


def check_target(final: str | os.PathLike, *, directory: bool, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise RefusedError (one line, naming the path) unless `final` may be (re)written; return it absolute.

    Absent targets and empty directories may always be written. An existing file is replaced
    only when vggjax wrote it and it is unchanged since (its ownership record matches). A
    non-empty directory is replaced only with `overwrite`, only when every file in it is one
    vggjax wrote, unchanged, and when it holds neither the working directory nor any `protect`
    path (e.g. the input file). A symbolic link is never replaced, and nothing is written inside
    a `protect` directory (an input is read, never changed).
    """
    final = Path(os.path.abspath(final))
    if final.is_symlink():
        raise RefusedError(f"{final} is a symbolic link; vggjax does not replace links: "
                           "give the real path")
    for path in protect:
        if Path(os.path.abspath(path)).resolve() in final.resolve().parents:
            raise RefusedError(f"{final} is inside the input {path}; vggjax does not write into its "
                               "input: choose an output directory outside it")
    if not final.exists():
        return final
    if not directory:
        if final.is_dir():
            raise RefusedError(f"{final} is a directory, expected a file")
        if foreign(final):
            raise RefusedError(f"{final} exists and vggjax did not write it (or it changed "
                               "since); refusing to replace it: move it away or choose another name")
        return final
    if not final.is_dir():
        raise RefusedError(f"{final} exists and is not a directory")
    real = final.resolve()  # even an empty working directory is never renamed over
    for path in (Path.cwd(), *map(Path, protect)):
        inside = Path(os.path.abspath(path)).resolve()
        if inside == real or real in inside.parents:
            raise RefusedError(f"{final} contains {path}; refusing to replace it: choose another "
                               "output directory")
    if not any(final.iterdir()):
        return final
    if not overwrite:
        raise RefusedError(f"{final} already exists and is not empty; pass overwrite=True to "
                           "replace it")
    if others := foreign(final):
        raise RefusedError(f"{final} holds files vggjax did not write ({listing(final, others)}), "
                           "so overwrite=True will not delete it; choose another output directory")
    return final


@contextlib.contextmanager
def writing(final: str | os.PathLike, *, directory: bool = False, overwrite: bool = False,
            protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write a file (or, `directory=True`, a directory) at.

    On normal exit its content is fsynced and renamed to `final` (a replaced directory is moved
    aside first and deleted after) and recorded as vggjax's (`ownership.record`); on an exception,
    KeyboardInterrupt or SIGTERM it is deleted and `final` is left as it was. A Ctrl-C that
    Python swallowed within the block (raised in a gc callback) still stops it before the
    rename (`interrupts.check`). `check_target` rules decide what may be replaced; they are
    checked before the block runs and again just before the rename.
    """
    protect = list(protect)
    final = check_target(final, directory=directory, overwrite=overwrite, protect=protect)
    final.parent.mkdir(parents=True, exist_ok=True)
    temps.remove_stale(final)
    tmp = temps.new(final, temps.TMP)
    with interrupts.handling():
        try:
            yield tmp
            interrupts.check()
            if not tmp.exists():
                raise RuntimeError(f"nothing was written for {final}")
            fsync_tree(tmp)
            check_target(final, directory=directory, overwrite=overwrite, protect=protect)
            # The rename and its record are one step: an interrupt then takes effect after it,
            # saying that `final` was written (Interrupted.written).
            with interrupts.signals_deferred(written=final):
                _replace(tmp, final)
                temps.forget(tmp)
                tmp = final  # from here, a failure (the record on a full disk) takes the output back
                fsync(final.parent)
                record(final)
        except BaseException as err:
            if getattr(err, "written", None) != final:
                temps.discard(tmp)
            full = no_space(err, final, "nothing was written: free some space or choose another place")
            if full is not None:
                raise full from None
            raise


def _replace(tmp: Path, final: Path) -> None:
    if not (final.is_dir() and any(final.iterdir())):
        os.replace(tmp, final)  # a file over a file, or a directory over nothing / an empty one
        return
    old = temps.new(final, temps.OLD)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        temps.forget(old)
        raise
    temps.discard(old)
