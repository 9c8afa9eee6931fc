"""A directory in use by one vggjax run at a time: an exclusive lock that dies with its process."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from vggjax.utils.atomic import RefusedError

LOCK = ".vggjax-lock"


class BusyError(RefusedError):
    """Another live process holds the lock of a directory vggjax was asked to use."""


@contextlib.contextmanager
def locked(directory: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (its `.vggjax-lock`, which names the holder's pid)
    for the block; BusyError naming that pid when another process holds it, or with `wait`,
    wait for it. The lock dies with its process, so a killed run never leaves a stale lock."""
    path = Path(directory) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BusyError(f"{what} is in use by another vggjax run (pid {holder}); wait for it "
                            "to finish or choose another one") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
