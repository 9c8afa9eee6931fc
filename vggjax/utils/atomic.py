"""Writing a file or a directory so that it appears complete or not at all, replacing only what
vggjax itself wrote, and leaving no temporaries behind (not even after kill -9, by the next run).

    with atomic.writing(out_dir, directory=True, overwrite=overwrite, protect=[input_file]) as tmp:
        tmp.mkdir(); ...            # write everything under tmp
    # here out_dir is the new content, fsynced; on any exception, Ctrl-C or SIGTERM, tmp is gone

The temporary is `.<name>.tmp-<pid>-<random>` beside the target; a replaced directory is first
moved to `.<name>.old-<pid>-<random>`. Both are recorded in vggjax's cache while they exist
(`vggjax.utils.temps`): the next vggjax command deletes those of a dead process wherever they are,
and a later `writing` beside the same target deletes those whose process is dead.

What vggjax wrote is proven by content, never by a name: every completed write is recorded in
`.vggjax-manifest.json` beside it (each file's size, mtime and sha256). A target is replaced,
and `remove_owned` deletes, only what that record still matches; a user's file put into (or
edited in) a vggjax output makes the whole output foreign to vggjax.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import filelock

from vggjax.utils import interrupts, temps
from vggjax.utils.digests import file_digest  # noqa: F401 (also part of this module's interface)
from vggjax.utils.disk import fsync, fsync_tree, no_space
from vggjax.utils.temps import remove  # noqa: F401 (part of this module's interface)

MANIFEST = ".vggjax-manifest.json"


class RefusedError(FileExistsError):
    """The target exists and is not something vggjax may replace (user files, a link, the cwd)."""


def check_target(final: str | os.PathLike, *, directory: bool, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise RefusedError (one line, naming the path) unless `final` may be (re)written; return it absolute.

    Absent targets and empty directories may always be written. An existing file is replaced
    only when vggjax wrote it and it is unchanged since (its manifest record matches). A
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
        raise RefusedError(f"{final} holds files vggjax did not write ({_listing(final, others)}), "
                           "so overwrite=True will not delete it; choose another output directory")
    return final


@contextlib.contextmanager
def writing(final: str | os.PathLike, *, directory: bool = False, overwrite: bool = False,
            protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write a file (or, `directory=True`, a directory) at.

    On normal exit its content is fsynced and renamed to `final` (a replaced directory is moved
    aside first and deleted after) and recorded in the manifest; on an exception,
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
                tmp = final  # from here, a failure (the manifest on a full disk) takes the output back
                fsync(final.parent)
                record(final)
        except BaseException as err:
            if getattr(err, "written", None) != final:
                temps.discard(tmp)
            full = no_space(err, final, "nothing was written: free some space or choose another place")
            if full is not None:
                raise full from None
            raise


def record(path: str | os.PathLike, unverified: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
    """Record `path` (a file, or a directory with everything under it) as vggjax's, in the
    manifest beside it. Digests are reused for files whose size and mtime did not change, so
    recording a checkpoint directory after each save hashes only the new step.

    `unverified`: regular expressions of names directly under `path` that are vggjax's though
    not digested (being written now, or another library's temporaries: Orbax's); `foreign`
    accepts them, `recorded` leaves them out. `skip`: regular expressions of names directly
    under `path` that are no longer provably vggjax's (set aside as damaged): not recorded."""
    path = Path(os.path.abspath(path))
    unverified, skip = list(unverified), [re.compile(p) for p in skip]
    with _manifest(path.parent) as entries:
        known = entries.get(path.name, {}).get("files", {})
        files = {}
        for rel, file in _files(path):
            if any(p.match(rel) for p in skip):
                continue
            st = file.stat()
            old = known.get(rel)
            same = old is not None and old[:2] == [st.st_size, st.st_mtime_ns]
            files[rel] = old if same else [st.st_size, st.st_mtime_ns, file_digest(file)]
        entries[path.name] = {"files": files, "unverified": unverified}


def recorded(path: str | os.PathLike) -> dict | None:
    """The record of `path`: {"files": {relative file: [size, mtime_ns, sha256]}, "unverified":
    [regular expressions, as `record` took them]}; None when there is none."""
    path = Path(os.path.abspath(path))
    entry = _read_manifest(path.parent).get(path.name)
    return None if entry is None else {"files": entry["files"], "unverified": entry.get("unverified", [])}


def foreign(path: str | os.PathLike) -> list[str]:
    """The files under `path` (relative; "" for `path` itself) that vggjax did not write or
    that changed since: all of them when `path` has no manifest record."""
    path = Path(os.path.abspath(path))
    entry = _read_manifest(path.parent).get(path.name)
    found = []
    for rel, file in _files(path):
        if entry is None:
            found.append(rel)
        elif rel and any(re.match(p, Path(rel).parts[0]) for p in entry.get("unverified", ())):
            continue
        elif (old := entry["files"].get(rel)) is None or old[0] != file.stat().st_size \
                or old[2] != file_digest(file):
            found.append(rel)
    return found


def changed(path: str | os.PathLike) -> list[str] | None:
    """The files under `path` (relative) whose content differs from what vggjax recorded writing
    (a flipped byte, a truncation), or that vanished; None when `path` has no record to compare."""
    path = Path(os.path.abspath(path))
    entry = _read_manifest(path.parent).get(path.name)
    if entry is None:
        return None
    out = []
    for rel, (size, _, sha) in sorted(entry["files"].items()):
        file = path / rel if rel else path
        if not file.is_file() or file.stat().st_size != size or file_digest(file) != sha:
            out.append(rel)
    return out


def remove_owned(paths: Iterable[str | os.PathLike]) -> None:
    """Delete `paths` (files or directories) if they are vggjax's: recorded and unchanged, or
    directories holding only such outputs. Checks all of them before deleting any; RefusedError
    naming the foreign files otherwise."""
    paths = [Path(os.path.abspath(p)) for p in paths if os.path.lexists(p)]
    for path in paths:
        if others := _foreign_tree(path):
            raise RefusedError(f"{path} holds files vggjax did not write ({_listing(path, others)}); "
                               "refusing to delete it: move them away first")
    for path in paths:
        _remove_tree(path)


def unowned(root: str | os.PathLike, names: Iterable[str]) -> str | None:
    """The files under `root`/<each of `names`> that vggjax cannot prove it wrote, as a short
    listing ("run/config.json, run/checkpoints/mymodel.pt"), or None when there are none."""
    root = Path(os.path.abspath(root))
    found = [os.path.join(name, rel) if rel else name for name in names
             if os.path.lexists(root / name) for rel in _foreign_tree(root / name)]
    return _listing(root, found) if found else None


def _foreign_tree(path: Path) -> list[str]:
    """`foreign`, where a directory without a record of its own may hold recorded outputs."""
    if path.name == MANIFEST:
        return []
    if path.name in _read_manifest(path.parent) or not path.is_dir() or path.is_symlink():
        return foreign(path)
    return [f"{child.name}/{rel}".rstrip("/") for child in sorted(path.iterdir())
            for rel in _foreign_tree(child)]


def _remove_tree(path: Path) -> None:
    if path.is_dir() and path.name not in _read_manifest(path.parent):
        for child in path.iterdir():
            if child.name != MANIFEST:
                _remove_tree(child)
        remove(path / MANIFEST)
    remove(path)
    with _manifest(path.parent) as entries:
        entries.pop(path.name, None)


def _listing(root: Path, rels: list[str], shown: int = 4) -> str:
    names = [os.path.join(root.name, rel) if rel else root.name for rel in rels]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _files(path: Path) -> Iterator[tuple[str, Path]]:
    if not path.is_dir():
        yield "", path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield os.path.relpath(os.path.join(root, name), path), Path(root) / name


def _read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}  # absent, or damaged: then nothing there is provably vggjax's


def _lock_directory(directory: Path) -> int | None:
    """A descriptor of `directory` holding its exclusive lock (filelock's flock), so writers
    beside each other take turns; None where a directory cannot be opened or locked (Windows,
    a platform without fcntl): there one vggjax writer a folder at a time."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except PermissionError:
        return None
    try:
        filelock.lock_descriptor(fd)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _manifest(directory: Path) -> Iterator[dict]:
    """The manifest of `directory` to update in place: under an exclusive lock (concurrent
    writers beside each other), rewritten through a temp file and rename."""
    if not directory.is_dir():
        yield {}
        return
    fd = _lock_directory(directory)
    try:
        entries = _read_manifest(directory)
        yield entries
        entries = {k: v for k, v in entries.items() if os.path.lexists(directory / k)}
        if not entries:
            (directory / MANIFEST).unlink(missing_ok=True)
            return
        tmp = temps.new(directory / MANIFEST, temps.TMP, recorded=False)
        try:
            tmp.write_text(json.dumps(entries, sort_keys=True))
            os.replace(tmp, directory / MANIFEST)
        except BaseException:  # a full disk: the previous manifest stays, no temp beside it
            tmp.unlink(missing_ok=True)
            raise
    finally:
        if fd is not None:
            os.close(fd)


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
