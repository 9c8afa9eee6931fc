"""A directory in use by one vggjax run at a time: an exclusive lock that dies with its process."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import filelock

from vggjax.utils.atomic import RefusedError

LOCK = ".vggjax-lock"
# flock (POSIX) or LockFileEx (Windows): held by an open file, so it dies with its process. Where
# neither exists filelock falls back to a marker file, which it alone writes and deletes.
NATIVE = not issubclass(filelock.FileLock, filelock.SoftFileLock)


class BusyError(RefusedError):
    """Another live process holds the lock of a directory vggjax was asked to use."""


@contextlib.contextmanager
def locked(directory: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (its `.vggjax-lock`, which names the holder's pid)
    for the block; BusyError naming that pid when another process holds it, or with `wait`,
    wait for it. The lock dies with its process, so a killed run never leaves a stale lock."""
    path = Path(directory) / LOCK
    lock = filelock.FileLock(path, blocking=wait, preserve_lock_file=NATIVE,
                             on_acquired=_write_pid if NATIVE else None)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BusyError(f"{what} is in use by another vggjax run (pid {_holder(path)}); wait for "
                        "it to finish or choose another one") from None
    try:
        yield
    finally:
        lock.release()


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())


def _holder(path: Path) -> str:
    """The pid the holder wrote, or "unknown" (not yet written, a marker lock, Windows' lock)."""
    try:
        pid = path.read_text(errors="replace").strip()
    except OSError:
        return "unknown"
    return pid if pid.isdigit() else "unknown"
