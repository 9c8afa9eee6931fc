"""Memory checkers over the oneDNN custom calls (issue 29): a small model's forward and backward,
eager and jitted, fp32 and bf16 (tests/memcheck_workload.py), on this CPU's ISA and capped to AVX2.

- AddressSanitizer (`slow`, about a minute each): vggjax's handlers built with -fsanitize=address
  (the build honours $CXX), the runtime preloaded into Python. It also reports oneDNN's own
  faults with their stack: on the old code, capped to AVX2, "SEGV on unknown address 0x0" in
  gemm_convolution_bwd_weights_t, the write through a null scratchpad.
- valgrind's memcheck (`memcheck` marker, by hand: `pytest -m memcheck`, about 15 minutes): the
  eager passes only; valgrind 3.19 aborts ("VEX temporary storage exhausted") translating the
  code XLA compiles for a jitted VGG. `VGGJAX_MEMCHECK_LOG=FILE` keeps its log.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import script_env
from vggjax.model import onednn

pytestmark = pytest.mark.skipif(onednn.unavailable() is not None,
                                reason=f"oneDNN conv unavailable: {onednn.unavailable()}")
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memcheck_workload.py")
CAPS = {"this CPU": {}, "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}}
# An error block of valgrind's log is a run of "==PID== " lines ending at an empty one.
BLOCK = re.compile(r"^==\d+== (\S.*?)(?=^==\d+== ?$)", re.M | re.S)
OURS = ("onednn_conv-", "libdnnl")  # frames in vggjax's handlers or in oneDNN itself
KINDS = ("Invalid read", "Invalid write", "Invalid free", "Mismatched free", "Source and destination overlap",
         "Use of uninitialised value", "Conditional jump or move depends on uninitialised")


def memcheck_errors(log: str) -> list[str]:
    """The error blocks of a valgrind log that pass through vggjax's handlers or oneDNN."""
    return [b for b in BLOCK.findall(log)
            if b.startswith(KINDS) and any(lib in b for lib in OURS)]


def test_the_filter_keeps_our_errors_only():
    log = ("==7== Invalid write of size 4\n==7==    at 0x1: im2col (in /x/libdnnl.so.3)\n==7== \n"
           "==7== Invalid read of size 8\n==7==    at 0x2: PyObject_Free (in /usr/bin/python)\n==7== \n")
    assert memcheck_errors(log) == ["Invalid write of size 4\n==7==    at 0x1: im2col (in /x/libdnnl.so.3)\n"]


@pytest.mark.slow
@pytest.mark.parametrize("cap", CAPS)
def test_address_sanitizer_finds_nothing(cap, tmp_path):
    cxx = os.environ.get("CXX", "g++")
    runtime = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
               for lib in ("libasan.so", "libstdc++.so.6")]  # without libstdc++ preloaded too, ASan's
    # __cxa_throw hook finds no real one and aborts at jaxlib's first exception
    if not all(os.path.isabs(lib) for lib in runtime):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime")
    wrapper = tmp_path / "asan-cxx"
    wrapper.write_text(f'#!/bin/sh\nexec {cxx} -fsanitize=address -fno-omit-frame-pointer "$@"\n')
    wrapper.chmod(0o755)
    env = script_env(tmp_path, onednn_built=False, CXX=str(wrapper), LD_PRELOAD=" ".join(runtime),
                     ASAN_OPTIONS="detect_leaks=0", **CAPS[cap])  # its own cache: the ASan build
    proc = subprocess.run([sys.executable, WORKLOAD], env=env, capture_output=True, text=True, timeout=600)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "float32 jit: forward and backward done" in proc.stdout, proc.stdout


@pytest.mark.memcheck
@pytest.mark.timeout(3600)
def test_valgrind_finds_nothing_in_the_eager_passes(tmp_path, subprocess_env):
    from vggjax.utils.cache import cache_dir

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed")
    log = os.environ.get("VGGJAX_MEMCHECK_LOG") or str(tmp_path / "memcheck.log")
    env = dict(subprocess_env, VGGJAX_CACHE=str(cache_dir()), PYTHONMALLOC="malloc")
    proc = subprocess.run(
        [valgrind, "--tool=memcheck", "--error-limit=no", "--smc-check=all-non-file",
         f"--log-file={log}", sys.executable, WORKLOAD, "--eager-only"],
        env=env, capture_output=True, text=True, timeout=3500)
    text = open(log).read()
    assert proc.returncode == 0, f"the workload failed under valgrind: {proc.stderr[-2000:]}\n{text[-2000:]}"
    assert "float32 eager: forward and backward done" in proc.stdout
    errors = memcheck_errors(text)
    assert not errors, f"{len(errors)} memcheck errors in the custom calls; the first:\n{errors[0][:3000]}"
