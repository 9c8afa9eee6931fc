"""The oneDNN custom calls' shared library: found, compiled with g++ on first use into a cache
keyed by the source, the oneDNN headers' version and jaxlib's version, loaded and registered.

Installing vggjax stays pure Python. oneDNN itself comes from PyPI: `pip install "vggjax[onednn]"`
(onednn-cpu-gomp + onednn-devel-cpu-gomp: the OpenMP CPU build; the plain `onednn` package is
the SYCL/TBB build, which needs Intel's compiler runtime).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax

from vggjax.utils import atomic, locks
from vggjax.utils.cache import cache_dir

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = {"vggjax_onednn_conv_fwd": "VggjaxConvFwd",
           "vggjax_onednn_conv_bwd_data": "VggjaxConvBwdData",
           "vggjax_onednn_conv_bwd_weights": "VggjaxConvBwdWeights",
           "vggjax_onednn_winograd_fwd": "VggjaxWinogradFwd"}


def onednn_prefix() -> Path | None:
    """The install prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so (the
    environment's own, where pip puts onednn-devel-cpu-gomp, or the system's)."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, "/usr", "/usr/local")):
        p = Path(prefix)
        if (p / "include/oneapi/dnnl/dnnl.hpp").is_file() and libdnnl(p) is not None:
            return p
    return None


def libdnnl(prefix: Path) -> Path | None:
    """oneDNN's shared library under an install prefix (lib/ or lib64/), None if absent."""
    return next(prefix.glob("lib*/libdnnl.so*"), None)


def build() -> Path:
    """Compile onednn_conv.cc (once per source/oneDNN/jaxlib version); the shared library's path."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the oneDNN conv is built for Linux x86-64, not {platform.system()} "
                           f"{platform.machine()}")
    prefix = onednn_prefix()
    if prefix is None:
        raise RuntimeError('oneDNN headers/library not found: pip install "vggjax[onednn]"')
    version = (prefix / "include/oneapi/dnnl/dnnl_version.h").read_bytes()
    key = hashlib.sha256(SOURCE.read_bytes() + version + jax.__version__.encode()).hexdigest()[:16]
    out = cache_dir() / "onednn" / f"onednn_conv-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Processes starting together (pytest workers, data-parallel hosts) build once: the others
    # wait for the lock, then find the library. Built beside its final name and renamed
    # (vggjax.utils.atomic): an interrupted build never leaves a half-written library behind.
    with locks.locked(out.parent, "the oneDNN build cache", wait=True):
        if not out.is_file():
            _compile(prefix, out)
    return out


def _compile(prefix: Path, out: Path) -> None:
    """g++ onednn_conv.cc against the oneDNN under `prefix` into the shared library `out`."""
    libdir = libdnnl(prefix).parent
    with atomic.writing(out) as tmp:
        cmd = [os.environ.get("CXX", "g++"), "-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", f"-I{prefix / 'include'}", str(SOURCE),
               f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}", "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"building the oneDNN conv failed ({cmd[0]}): "
                               f"{proc.stderr.strip().splitlines()[-1:]}")


@functools.cache
def load() -> str | None:
    """Build, load and register the custom calls once per process; None on success, else why not."""
    if os.environ.get("VGGJAX_ONEDNN", "1") == "0":
        return "disabled by VGGJAX_ONEDNN=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, RuntimeError) as e:
        return str(e)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None
