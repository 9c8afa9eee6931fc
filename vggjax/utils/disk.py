"""A full disk as one line that says what happened to the output, disk blocks reserved up front, and
what was written forced to the disk (fsync)."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path


_FULL = (errno.ENOSPC, errno.EDQUOT)


def no_space(err: BaseException, where: str | os.PathLike, outcome: str) -> OSError | None:
    """A one-line OSError (errno ENOSPC or EDQUOT) for `err` when it says that the disk or the
    quota is full, naming `where` and ending in `outcome` (what is left, what to do); else None.
    Orbax and TensorStore raise ValueErrors whose text carries the OS code (os_error_code='28'),
    TensorFlow errors whose text has the OS's words ("No space left on device")."""
    code, text = getattr(err, "errno", None), str(err)
    if code not in _FULL:  # TensorFlow's errors carry only the OS's words
        found = re.search(r"os_error_code='(\d+)'", text)
        code = int(found.group(1)) if found else next((c for c in _FULL if os.strerror(c) in text), None)
    if code not in _FULL:
        return None
    full = OSError(f"{os.strerror(code).lower()} while writing {where}; {outcome}")
    full.errno = code
    return full


def reserve(path: str | os.PathLike) -> None:
    """Allocate the disk blocks of the file at `path` (its current size) now, so that a full disk is
    an OSError here rather than a SIGBUS later, when a memory map of the (sparse) file is written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    """fsync the file or directory at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (the data, then the names), so a crash after
    the rename cannot leave a complete-looking but empty output."""
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                fsync(Path(root) / name)
            fsync(Path(root))
    else:
        fsync(path)
