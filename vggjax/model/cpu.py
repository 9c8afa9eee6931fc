"""What this CPU offers the conv paths: its feature flags and the ISA oneDNN's kernels use here."""
from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path

from vggjax.model import onednn_build

# The flags that decide the conv's fast paths (vggjax.model.conv.choose_impl).
FAST_PATH_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def isa_bits() -> dict[str, int]:
    """oneDNN's dnnl_cpu_isa_t, read from its installed header (dnnl_types.h), so the table is
    oneDNN's own: {"avx2": 0x7, "avx512_core": 0x27, ...}; each ISA's bits include those of the
    ISAs below it. Empty without oneDNN's headers."""
    prefix = onednn_build.onednn_prefix()
    if prefix is None:
        return {}
    header = (prefix / "include/oneapi/dnnl/dnnl_types.h").read_text()
    enum = header[:header.index("} dnnl_cpu_isa_t;")].rpartition("typedef enum {")[2]
    return {name: int(bits, 16)
            for name, bits in re.findall(r"dnnl_cpu_isa_(\w+) = (0x[0-9a-fA-F]+)", enum)
            if name != "default"}


@functools.cache
def effective_isa() -> str | None:
    """The ISA oneDNN's kernels use in this process, e.g. "avx2", "avx512_core_amx": the CPU's,
    lowered by $ONEDNN_MAX_CPU_ISA (read once, at oneDNN's first use). None without oneDNN."""
    prefix = onednn_build.onednn_prefix()
    if prefix is None:
        return None
    try:
        lib = ctypes.CDLL(str(onednn_build.libdnnl(prefix)))
    except OSError:
        return None
    bits = lib.dnnl_get_effective_cpu_isa()
    return next((name for name, b in isa_bits().items() if b == bits), f"isa 0x{bits:x}")


def has_isa(isa: str) -> bool:
    """True where oneDNN's effective ISA includes `isa` (a key of `isa_bits`, e.g. "avx2")."""
    table = isa_bits()
    want = table.get(isa)
    return want is not None and table.get(effective_isa() or "", 0) & want == want


def describe_cpu() -> str:
    """One line naming what decides the fast paths: the CPU's flags and oneDNN's effective ISA."""
    flags = sorted(cpu_flags() & set(FAST_PATH_FLAGS)) or ["none of avx2/avx512f"]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{' '.join(flags)}; oneDNN ISA {effective_isa() or 'n/a (oneDNN not installed)'}"
            + (f" (capped by ONEDNN_MAX_CPU_ISA={cap})" if cap else ""))
