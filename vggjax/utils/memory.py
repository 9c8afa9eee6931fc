"""How much memory the devices have, and whether one image's forward pass can fit in it."""
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


def check_fits(image_size: int, min_bytes: int, devices=None) -> None:
    """ValueError (one line) when `min_bytes`, the least one image at `image_size` needs
    (`vggjax.model.summary.min_forward_bytes`), exceeds the memory of `devices`."""
    have = memory_bytes(devices)
    if min_bytes > have:
        raise ValueError(f"one {image_size}x{image_size} image needs at least {min_bytes / 2**30:.1f} GiB "
                         f"for its first conv layer alone, more than the {have / 2**30:.1f} GiB here")
