"""How much memory the devices have, and the words for a forward pass that cannot fit in it."""
from __future__ import annotations

import os

import jax


def memory_bytes(devices=None) -> int:
    """Memory of `devices` (default: this process's local devices): the sum of their
    `bytes_limit`, or the machine's physical RAM for CPU devices (which report none)."""
    devices = jax.local_devices() if devices is None else devices
    limits = [(d.memory_stats() or {}).get("bytes_limit") if d.platform != "cpu" else None
              for d in devices]
    if all(limits):
        return int(sum(limits))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def shortfall(need: int, have: int) -> str | None:
    """The words for `need` bytes of a first conv layer that `have` bytes cannot hold ("needs at
    least X GiB for its first conv layer alone, more than the Y GiB here"); None when they fit."""
    if need <= have:
        return None
    return (f"needs at least {need / 2**30:.1f} GiB for its first conv layer alone, more than the "
            f"{have / 2**30:.1f} GiB here")
