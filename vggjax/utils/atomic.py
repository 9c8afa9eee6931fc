"""Writing a file or a directory so that it appears complete or not at all, replacing only what
vggjax itself wrote, and leaving no temporaries behind (not even after kill -9, by the next run).

    with atomic.writing(out_dir, directory=True, marker="vggjax.json", overwrite=overwrite,
                        protect=[input_file]) as tmp:
        tmp.mkdir(); ...            # write everything under tmp
    # here out_dir is the new content, fsynced; on any exception, Ctrl-C or SIGTERM, tmp is gone

The temporary is `.<name>.tmp-<pid>-<random>` beside the target; a replaced directory is first
moved to `.<name>.old-<pid>-<random>`. Both carry the writer's pid, so a later `writing` beside
the same target deletes those whose process is dead.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

_KINDS = ("tmp", "old")


class RefusedError(FileExistsError):
    """The target exists and is not something vggjax may replace (user files, a link, the cwd)."""


def check_target(final: str | os.PathLike, *, directory: bool, marker: str | None = None,
                 overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise RefusedError (one line, naming the path) unless `final` may be (re)written; return it absolute.

    Absent targets and empty directories may always be written. A file target may replace a
    file. A non-empty directory is replaced only with `overwrite`, and only when it holds
    `marker` (what vggjax writes into every directory it owns) and holds neither the working
    directory nor any `protect` path (e.g. the input file). A symbolic link is never replaced.
    """
    final = Path(os.path.abspath(final))
    if final.is_symlink():
        raise RefusedError(f"{final} is a symbolic link; vggjax does not replace links: "
                           "give the real path")
    if not final.exists():
        return final
    if not directory:
        if final.is_dir():
            raise RefusedError(f"{final} is a directory, expected a file")
        return final
    if not final.is_dir():
        raise RefusedError(f"{final} exists and is not a directory")
    if not any(final.iterdir()):
        return final
    if not overwrite:
        raise RefusedError(f"{final} already exists and is not empty; pass overwrite=True "
                           "(--overwrite) to replace it")
    if marker is None or not (final / marker).is_file():
        raise RefusedError(f"{final} is not a vggjax output ({marker or 'no marker'} missing), so "
                           "--overwrite will not delete it; choose another output directory")
    real = final.resolve()
    for path in (Path.cwd(), *map(Path, protect)):
        inside = Path(os.path.abspath(path)).resolve()
        if inside == real or real in inside.parents:
            raise RefusedError(f"{final} contains {path}; refusing to replace it: choose another "
                               "output directory")
    return final


@contextlib.contextmanager
def writing(final: str | os.PathLike, *, directory: bool = False, marker: str | None = None,
            overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write a file (or, `directory=True`, a directory) at.

    On normal exit its content is fsynced and renamed to `final` (a replaced directory is moved
    aside first and deleted after); on an exception, KeyboardInterrupt or SIGTERM it is deleted
    and `final` is left as it was. `check_target` rules decide what may be replaced; they are
    checked before the block runs and again just before the rename.
    """
    protect = list(protect)
    final = check_target(final, directory=directory, marker=marker, overwrite=overwrite,
                         protect=protect)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = _sibling(final, "tmp")
    with _sigterm_raises():
        try:
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"nothing was written for {final}")
            _fsync_tree(tmp)
            check_target(final, directory=directory, marker=marker, overwrite=overwrite,
                         protect=protect)
            _replace(tmp, final)
            _fsync(final.parent)
        except BaseException:
            remove(tmp)
            raise


def remove(path: Path) -> None:
    """Delete a file or directory tree if present. Deleting again if it reappears: a writer thread
    (Orbax's) may still be finishing a file in it when an interrupt arrives."""
    for _ in range(5):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            time.sleep(0.05)
            if not os.path.lexists(path):
                return
        time.sleep(0.1)


def remove_stale(final: Path) -> list[Path]:
    """Delete the temporaries beside `final` whose writing process is dead; return them."""
    removed = []
    for kind in _KINDS:
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[-1].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                remove(path)
                removed.append(path)
    return removed


def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace(tmp: Path, final: Path) -> None:
    if not (final.is_dir() and any(final.iterdir())):
        os.replace(tmp, final)  # a file over a file, or a directory over nothing / an empty one
        return
    old = _sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    remove(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (the data, then the names), so a crash after
    the rename cannot leave a complete-looking but empty output."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    else:
        _fsync(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (exit status 143) so the cleanup above runs;
    Ctrl-C already raises KeyboardInterrupt. Signal handlers live in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)
