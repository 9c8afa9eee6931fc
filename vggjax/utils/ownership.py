"""What vggjax wrote, proven by content, never by a name: every completed output is recorded in
`.vggjax-owned.json` beside it (each file's size, mtime and sha256). `vggjax.utils.atomic` replaces,
and `remove_owned` deletes, only what that record still matches; a user's file put into (or edited
in) a vggjax output makes the whole output foreign to vggjax.

Folders that an earlier vggjax wrote hold the same record as `.vggjax-manifest.json`: it is read
when there is no `.vggjax-owned.json`, and replaced by one the next time the folder's record is
written.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import filelock

from vggjax.utils import temps
from vggjax.utils.digests import file_digest
from vggjax.utils.temps import remove

OWNED = ".vggjax-owned.json"
LEGACY_OWNED = ".vggjax-manifest.json"  # its earlier name (manifest.json is an artifact's)
_RECORDS = (OWNED, LEGACY_OWNED)


class RefusedError(FileExistsError):
    """The target exists and is not something vggjax may replace (user files, a link, the cwd)."""


def record(path: str | os.PathLike, unverified: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
    """Record `path` (a file, or a directory with everything under it) as vggjax's, in the
    record beside it. Digests are reused for files whose size and mtime did not change, so
    recording a checkpoint directory after each save hashes only the new step.

    `unverified`: regular expressions of names directly under `path` that are vggjax's though
    not digested (being written now, or another library's temporaries: Orbax's); `foreign`
    accepts them, `recorded` leaves them out. `skip`: regular expressions of names directly
    under `path` that are no longer provably vggjax's (set aside as damaged): not recorded."""
    path = Path(os.path.abspath(path))
    unverified, skip = list(unverified), [re.compile(p) for p in skip]
    with _updating(path.parent) as entries:
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
    entry = _read(path.parent).get(path.name)
    return None if entry is None else {"files": entry["files"], "unverified": entry.get("unverified", [])}


def foreign(path: str | os.PathLike) -> list[str]:
    """The files under `path` (relative; "" for `path` itself) that vggjax did not write or
    that changed since: all of them when `path` has no record."""
    path = Path(os.path.abspath(path))
    entry = _read(path.parent).get(path.name)
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
    entry = _read(path.parent).get(path.name)
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
            raise RefusedError(f"{path} holds files vggjax did not write ({listing(path, others)}); "
                               "refusing to delete it: move them away first")
    for path in paths:
        _remove_tree(path)


def unowned(root: str | os.PathLike, names: Iterable[str]) -> str | None:
    """The files under `root`/<each of `names`> that vggjax cannot prove it wrote, as a short
    listing ("run/config.json, run/checkpoints/mymodel.pt"), or None when there are none."""
    root = Path(os.path.abspath(root))
    found = [os.path.join(name, rel) if rel else name for name in names
             if os.path.lexists(root / name) for rel in _foreign_tree(root / name)]
    return listing(root, found) if found else None


def _foreign_tree(path: Path) -> list[str]:
    """`foreign`, where a directory without a record of its own may hold recorded outputs."""
    if path.name in _RECORDS:
        return []
    if path.name in _read(path.parent) or not path.is_dir() or path.is_symlink():
        return foreign(path)
    return [f"{child.name}/{rel}".rstrip("/") for child in sorted(path.iterdir())
            for rel in _foreign_tree(child)]


def _remove_tree(path: Path) -> None:
    if path.is_dir() and path.name not in _read(path.parent):
        for child in path.iterdir():
            if child.name not in _RECORDS:
                _remove_tree(child)
        for name in _RECORDS:
            remove(path / name)
    remove(path)
    with _updating(path.parent) as entries:
        entries.pop(path.name, None)


def listing(root: Path, rels: list[str], shown: int = 4) -> str:
    """`rels` (paths relative to `root`) as one short line: "run/a.txt, run/b.pt and 3 more"."""
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


def _read(directory: Path) -> dict:
    name = OWNED if os.path.lexists(directory / OWNED) else LEGACY_OWNED
    try:
        return json.loads((directory / name).read_text())
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
def _updating(directory: Path) -> Iterator[dict]:
    """The record of `directory` to update in place: under an exclusive lock (concurrent
    writers beside each other), rewritten through a temp file and rename."""
    if not directory.is_dir():
        yield {}
        return
    fd = _lock_directory(directory)
    try:
        entries = _read(directory)
        yield entries
        entries = {k: v for k, v in entries.items() if os.path.lexists(directory / k)}
        if not entries:
            (directory / OWNED).unlink(missing_ok=True)
        else:
            tmp = temps.new(directory / OWNED, temps.TMP, recorded=False)
            try:
                tmp.write_text(json.dumps(entries, sort_keys=True))
                os.replace(tmp, directory / OWNED)
            except BaseException:  # a full disk: the previous record stays, no temp beside it
                tmp.unlink(missing_ok=True)
                raise
        (directory / LEGACY_OWNED).unlink(missing_ok=True)  # its entries are in OWNED now
    finally:
        if fd is not None:
            os.close(fd)
