"""sha256 digests of files, recorded when an output is written and checked when it is read back: a
truncated, flipped or edited file is refused with one line naming it."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def of_files(directory: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file under it, but `exclude` (relative paths)
    and vggjax's own bookkeeping (`.vggjax-*`: records and locks, which change as it works)."""
    directory, exclude = Path(directory), set(exclude)
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel not in exclude and not name.startswith(".vggjax-"):
                out[rel] = file_digest(os.path.join(root, name))
    return out


def note_unverified(directory: str | os.PathLike, record: str | os.PathLike) -> None:
    """Say once per process (a log line) that `directory` has no digests in `record` to check."""
    if os.fspath(directory) not in _NOTED:
        _NOTED.add(os.fspath(directory))
        logging.getLogger("vggjax").warning(f"note: {record} has no file digests (an older vggjax "
                                            f"wrote it), so the files of {directory} are not verified")


_NOTED: set[str] = set()


def check(directory: str | os.PathLike, recorded: Mapping[str, str], record: str | os.PathLike) -> None:
    """ValueError (one line, naming the file) unless every file `recorded` (as `of_files` gave) is
    under `directory` with its digest. `record`: the file that holds the digests, for the message."""
    directory = Path(directory)
    if not isinstance(recorded, Mapping) or not all(isinstance(v, str) for v in recorded.values()):
        raise ValueError(f"{record} is damaged or was edited: its file digests are not a mapping of "
                         "names to sha256")
    for rel, sha in recorded.items():
        path = directory / rel
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {record})")
        if file_digest(path) != sha:
            raise ValueError(f"{path} is damaged or was changed: its sha256 differs from the one "
                             f"recorded in {record}; export it again")
