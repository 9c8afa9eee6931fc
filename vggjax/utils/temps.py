"""vggjax's temporaries (a file or directory being written beside its target), each recorded in
$VGGJAX_CACHE/temps/ while it exists, so that the next vggjax command removes those a killed
process left, wherever they are (`sweep`), and a command ending on an interrupt removes its own
(`remove_mine`).

A temporary is `.<target>.<kind>-<pid>-<token>`; its record is the file `<pid>-<token>` holding
its absolute path. A temporary is removed only when both agree (the name ends in the record's
`<pid>-<token>`) and that process is dead: proof that vggjax made it, not a name alone.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from vggjax.utils.cache import cache_dir


TMP, OLD = "tmp", "old"  # kinds: a new output being written, a replaced one being deleted


def registry() -> Path:
    """The directory of the records: $VGGJAX_CACHE/temps."""
    return cache_dir() / "temps"


def new(final: Path, kind: str, recorded: bool = True) -> Path:
    """A fresh temporary path beside `final` (not created), recorded unless `recorded=False` (a
    temporary short enough not to matter, e.g. an ownership record's). The record is best effort: a
    read-only cache leaves only the cleanup beside the same target (`remove_stale`)."""
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path = final.parent / f".{final.name}.{kind}-{token}"
    if recorded:
        try:
            registry().mkdir(parents=True, exist_ok=True)
            (registry() / token).write_text(os.fspath(path.absolute()))
        except OSError:
            pass
    return path


def forget(path: Path) -> None:
    """Drop the record of the temporary `path` (renamed into place or removed)."""
    try:
        (registry() / _token(path)).unlink(missing_ok=True)
    except OSError:
        pass


def discard(path: Path) -> None:
    """Remove the temporary `path` and its record."""
    remove(path)
    if not os.path.lexists(path):
        forget(path)


def sweep() -> list[Path]:
    """Remove the recorded temporaries of processes that are dead (killed, or ended before their
    cleanup); return them. Cheap when there are none: one directory listing."""
    return _recorded(lambda pid: not alive(pid))


def remove_mine() -> list[Path]:
    """Remove this process's recorded temporaries: what an interrupt left while writer threads
    (Orbax's) were still busy. Called as a command ends on an interrupt."""
    return _recorded(lambda pid: pid == os.getpid())


def remove_stale(final: Path) -> list[Path]:
    """Delete the temporaries beside `final` whose process is dead, recorded or not (the record
    may be in another $VGGJAX_CACHE); return them."""
    removed = []
    for kind in (TMP, OLD):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[-1].split("-")[0]
            if pid.isdigit() and not alive(int(pid)):
                discard(path)
                removed.append(path)
    return removed


def _recorded(which) -> list[Path]:
    try:
        records = list(registry().iterdir())
    except OSError:
        return []
    removed = []
    for record in records:
        pid = record.name.split("-")[0]
        if not pid.isdigit() or not which(int(pid)):
            continue
        try:
            path = Path(record.read_text())
        except OSError:
            continue
        if path.is_absolute() and _token(path) == record.name:
            remove(path)
            removed.append(path)
        record.unlink(missing_ok=True)
    return removed


def _token(path: Path) -> str:
    """`<pid>-<token>` of a temporary's name."""
    return "-".join(path.name.rsplit("-", 2)[-2:])


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


def alive(pid: int) -> bool:
    """Whether process `pid` exists (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
